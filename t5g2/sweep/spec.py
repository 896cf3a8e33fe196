"""A sweep as data: a base config file and the overrides of each member.

A sweep file (configs/sweeps/*.py) defines `get_sweep()` returning `sweep(...)`: a base config,
either a grid (field -> list of values: every combination) or a list of override dicts, optional
overrides common to every member (shorter runs, say) and a baseline member (default: the first)
that results report deltas against. Each member's name is derived from its own overrides only,
so it is stable across runs and names its workdir: `<sweep workdir>/<member name>`.

`load_sweep` validates the whole sweep before anything runs, with the same parser `launch.train`
uses: every member's flags are parsed by ml_collections against the base config (an unknown
field or a value of the wrong type fails there), each value must come back from the command line
unchanged, and the resulting config must build a `RunConfig`. Every error is a `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from t5g2.configlib import ConfigError

REPO = Path(__file__).resolve().parents[2]
BASELINE_NAME = "baseline"  # the name of a member without overrides of its own
MAX_NAME_LENGTH = 96
_UNSAFE = re.compile(r"[^a-z0-9._-]+")

Overrides = tuple[tuple[str, Any], ...]


def flag_value(value: Any) -> str:
    """`value` as text that ml_collections' `--config.<field>=<text>` parses back to it."""
    if isinstance(value, (bool, int, float, tuple)):
        return repr(value)
    if isinstance(value, str):
        return value
    raise ConfigError(f"override value {value!r} ({type(value).__name__}): a sweep value must be "
                      "a bool, int, float, str or tuple (what a command line carries)")


def _flags(overrides: Overrides) -> list[str]:
    return [f"--config.{field}={flag_value(value)}" for field, value in overrides]


def _token(value: Any) -> str:
    if isinstance(value, tuple):
        return "_".join(_token(v) for v in value) or "none"
    return str(value).lower()


def member_name(overrides: Overrides) -> str:
    """A filesystem-safe name from the overrides alone: `field-value` pairs joined by `__`,
    each field its last dotted component (the full path where two would clash); a name whose
    text had to be altered (unsafe characters, case) or cut short ends in a hash of the
    overrides, so distinct overrides keep distinct names."""
    if not overrides:
        return BASELINE_NAME
    leaves = [field.rsplit(".", 1)[-1] for field, _ in overrides]
    parts, lossy = [], False
    for (field, value), leaf in zip(overrides, leaves):
        key = leaf if leaves.count(leaf) == 1 else field
        raw = f"{key}-{_token(value)}"
        safe = _UNSAFE.sub("_", raw).strip("_") or "_"
        lossy |= safe != raw or (isinstance(value, str) and value != value.lower())
        parts.append(safe)
    name = "__".join(parts)
    if lossy or len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha256(repr(overrides).encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME_LENGTH - 9]}-{digest}"
    return name


@dataclasses.dataclass(frozen=True)
class Member:
    """One run of a sweep: its own overrides (besides the sweep's common ones)."""

    name: str
    overrides: Overrides

    def flags(self) -> list[str]:
        """The member's overrides as `launch.train` flags."""
        return _flags(self.overrides)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A base config, overrides common to every member, the members, and the baseline member."""

    name: str
    config: str
    common: Overrides
    members: tuple[Member, ...]
    baseline: str

    def flags(self, member: Member) -> list[str]:
        """Common and member overrides, as `launch.train` takes them (the member's last: they
        win over a common override of the same field)."""
        return _flags(self.common) + member.flags()

    def member(self, name: str) -> Member:
        for member in self.members:
            if member.name == name:
                return member
        raise ConfigError(f"sweep {self.name}: no member {name!r}; members: "
                          f"{', '.join(m.name for m in self.members)}")


def member_workdir(sweep_workdir: str, member: Member) -> str:
    """`<sweep_workdir>/<member.name>`."""
    return os.path.join(sweep_workdir, member.name)


def _overrides(values: Mapping[str, Any], what: str) -> Overrides:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{what}={values!r}: expected a dict of field -> value")
    out = []
    for field, value in values.items():
        if not isinstance(field, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*",
                                                          field):
            raise ConfigError(f"{what}: field {field!r} is not a dotted config path such as "
                              "'model.tie_embeddings'")
        if isinstance(value, list):
            value = tuple(value)
        flag_value(value)  # a type a command line carries
        out.append((field, value))
    return tuple(out)


def sweep(name: str, config: str, *, grid: Mapping[str, Sequence[Any]] | None = None,
          members: Sequence[Mapping[str, Any]] | None = None,
          common: Mapping[str, Any] | None = None, baseline: str | None = None) -> Sweep:
    """A Sweep from a grid (field -> values: the product, in the grid's order) or a list of
    override dicts; structural checks only (`load_sweep`/`validate` check the fields)."""
    if (grid is None) == (members is None):
        raise ConfigError(f"sweep {name!r}: give either grid= or members=, not "
                          f"{'both' if grid is not None else 'neither'}")
    if grid is not None:
        if not isinstance(grid, Mapping) or not grid:
            raise ConfigError(f"sweep {name!r}: grid={grid!r} is empty: give field -> values")
        for field, values in grid.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
                raise ConfigError(f"sweep {name!r}: grid[{field!r}]={values!r} must be a "
                                  "non-empty list of values")
        members = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    if isinstance(members, Mapping) or not members:
        raise ConfigError(f"sweep {name!r}: members={members!r} is empty: give a list of "
                          "override dicts (an empty dict is the base config)")
    built = tuple(Member(member_name(o), o)
                  for o in (_overrides(m, f"sweep {name!r} member") for m in members))
    seen: dict[str, Member] = {}
    for member in built:
        if member.name in seen:
            raise ConfigError(f"sweep {name!r}: two members are named {member.name!r} "
                              f"(overrides {dict(seen[member.name].overrides)} and "
                              f"{dict(member.overrides)}): make their overrides differ")
        seen[member.name] = member
    baseline = built[0].name if baseline is None else baseline
    if baseline not in seen:
        raise ConfigError(f"sweep {name!r}: baseline={baseline!r} is not a member; members: "
                          f"{', '.join(seen)}")
    if not isinstance(config, str) or not config:
        raise ConfigError(f"sweep {name!r}: config={config!r} must be a config file path")
    return Sweep(name=name, config=config, common=_overrides(common or {}, f"sweep {name!r} "
                 "common"), members=built, baseline=baseline)


def config_path(sweep: Sweep) -> str:
    """The sweep's base config file: as given if it exists, else relative to the repository."""
    if os.path.exists(sweep.config):
        return sweep.config
    candidate = REPO / sweep.config
    if candidate.exists():
        return str(candidate)
    raise ConfigError(f"sweep {sweep.name}: config {sweep.config!r} does not exist (relative "
                      f"to the working directory or to {REPO})")


def parse_member_config(sweep: Sweep, member: Member):
    """The member's config exactly as `launch.train --config <config> <flags>` parses it
    (ml_collections, locked); ConfigError naming the flag that fails."""
    from absl import flags
    from ml_collections import config_flags
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    argv = ["launch.train", f"--config={config_path(sweep)}", *sweep.flags(member)]
    base = ConfigFileFlagParser(name="config").parse(argv[1].split("=", 1)[1])
    for field, value in sweep.common + member.overrides:
        _check_field(sweep, member, base, field, value)
    values = flags.FlagValues()
    handle = config_flags.DEFINE_config_file("config", None, "base config", flag_values=values,
                                             lock_config=True, sys_argv=argv)
    try:
        values(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"sweep {sweep.name}, member {member.name}: "
                          f"{_first_line(e)} (flags: {' '.join(argv[2:])})") from e
    return handle.value


def _check_field(sweep: Sweep, member: Member, base, field: str, value: Any) -> None:
    node, where = base, "config"
    for part in field.split("."):
        if not hasattr(node, "keys"):
            raise ConfigError(f"sweep {sweep.name}, member {member.name}: {field}={value!r}: "
                              f"{where} is a value, not a section")
        if part not in node:
            raise ConfigError(f"sweep {sweep.name}, member {member.name}: {field}={value!r}: "
                              f"{where} has no field {part!r}; valid: "
                              f"{', '.join(sorted(node.keys()))}")
        node, where = node[part], f"{where}.{part}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    detail = text[0] if text else ""
    if isinstance(error, (AttributeError, KeyError)):
        return f"no such config field {detail} in the base config"
    return detail


def _get(config, field: str) -> Any:
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def validate(sweep: Sweep) -> dict[str, Any]:
    """Checks every member against the base config (see the module docstring); returns each
    member's parsed config by name."""
    from t5g2.run_config import RunConfig

    configs = {}
    for member in sweep.members:
        config = parse_member_config(sweep, member)
        for field, value in dict(sweep.common + member.overrides).items():  # member's win
            parsed = _get(config, field)
            if isinstance(parsed, list):
                parsed = tuple(parsed)
            if parsed != value or isinstance(parsed, bool) != isinstance(value, bool):
                raise ConfigError(
                    f"sweep {sweep.name}, member {member.name}: {field}={value!r} comes back "
                    f"from the command line (--config.{field}={flag_value(value)}) as "
                    f"{parsed!r}: give the value in the field's type")
        try:
            RunConfig.from_config(config)
        except ConfigError as e:
            raise ConfigError(f"sweep {sweep.name}, member {member.name}: {e}") from e
        configs[member.name] = config
    return configs


def load_sweep(path: str) -> Sweep:
    """The Sweep that the file's `get_sweep()` returns, validated; ConfigError otherwise."""
    if not os.path.exists(path):
        raise ConfigError(f"--sweep={path!r} does not exist (a file such as "
                          "configs/sweeps/ablations.py)")
    module_name = "_t5g2_sweep_" + hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:8]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(f"--sweep={path!r} defines no get_sweep() (see "
                          "configs/sweeps/ablations.py)")
    result = module.get_sweep()
    if not isinstance(result, Sweep):
        raise ConfigError(f"--sweep={path!r}: get_sweep() returned {type(result).__name__}, "
                          "not t5g2.sweep.spec.sweep(...)")
    validate(result)
    return result
