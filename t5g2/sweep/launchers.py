"""A sweep's members as cluster jobs, one job per member, through the existing launchers:
launch/slurm_gpu.sbatch (a submit script per member), launch/gke.py (a JobSet manifest per
member) and launch/tpu_vm.sh (the commands that run the members one after another on a slice).

    write_jobs(sweep, "/shared/sweeps/abl", "slurm", "/shared/sweeps/abl/jobs",
               options={"nodes": "2", "partition": "gpu", "time": "24:00:00"})

Each job runs `launch.train --config <sweep.config> --workdir <sweep workdir>/<member>` with the
sweep's common overrides and the member's own, quoted word for word (a value may hold spaces,
quotes or a tuple's parentheses). The launchers stay the one place that knows their cluster:
this module only fills in their arguments, so everything they check, they still check.

Options (`parse_options` reads them from KEY=VALUE strings):
- slurm: sbatch options, e.g. nodes=2 partition=gpu account=A time=2-00:00:00 (a bare KEY is a
  switch such as `exclusive`); --job-name is `<sweep>-<member>`;
- gke: launch.gke's flags, e.g. target=tpu image=IMAGE bucket=B tpu-accelerator=tpu-v5p-slice
  tpu-topology=2x2x4 (repeat env=KEY=VALUE; `spot` is a switch); --name, --config, --workdir and
  --train-args come from the sweep;
- tpu_vm: tpu_vm.sh's environment, e.g. QUEUED_RESOURCE=qr ZONE=us-east5-a (or TPU_NAME).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Mapping, Sequence, Union

from launch import gke
from t5g2 import fs
from t5g2.configlib import ConfigError
from t5g2.sweep.spec import Member, Sweep, member_workdir

LAUNCHERS = ("slurm", "gke", "tpu_vm")
REPO = Path(__file__).resolve().parents[2]
SLURM_SCRIPT = "launch/slurm_gpu.sbatch"  # relative to REPO, where the jobs are submitted from
TPU_VM_SCRIPT = "launch/tpu_vm.sh"

OptionValue = Union[str, bool, Sequence[str]]


def parse_options(items: Sequence[str]) -> dict[str, list[str]]:
    """`KEY=VALUE` strings (a command line's repeated launcher option) as options: a repeated
    key keeps every value (gke's env=...), a bare `KEY` is a switch (sbatch's exclusive)."""
    options: dict[str, list[str]] = {}
    for item in items:
        key, _, value = item.partition("=")
        if not key:
            raise ConfigError(f"launcher option {item!r}: expected KEY=VALUE (or a bare KEY)")
        options.setdefault(key, []).append(value)
    return options


def write_jobs(sweep: Sweep, sweep_workdir: str, launcher: str, out_dir: str, *,
               submit: bool = False,
               options: Mapping[str, OptionValue] | None = None) -> list[str]:
    """One job per member of `sweep` for `launcher`: slurm and gke write their files into
    `out_dir` and return the paths; tpu_vm prints its commands and returns them. With `submit`,
    also submits them (sbatch, kubectl apply, tpu_vm.sh run one member after another)."""
    options = dict(options or {})
    if launcher in ("slurm", "gke") and fs.is_remote(out_dir):
        raise ConfigError(f"jobs directory {out_dir}: a local directory (sbatch and kubectl "
                          "read the job files from this machine), not a URL")
    if launcher == "slurm":
        return slurm_jobs(sweep, sweep_workdir, out_dir, options, submit)
    if launcher == "gke":
        return gke_jobs(sweep, sweep_workdir, out_dir, options, submit)
    if launcher == "tpu_vm":
        return tpu_vm_commands(sweep, sweep_workdir, options, submit)
    raise ConfigError(f"--launcher={launcher!r}: valid are {', '.join(LAUNCHERS)} (or no "
                      "--launcher: run the members on this machine)")


def train_args(sweep: Sweep, member: Member, workdir: str) -> list[str]:
    """The member's `launch.train` arguments."""
    return ["--config", sweep.config, "--workdir", workdir, *sweep.flags(member)]


def _values(value: OptionValue) -> list[str]:
    if value is True:
        return [""]
    if value is False:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _flags(options: Mapping[str, OptionValue], launcher: str, reserved: set[str]) -> list[str]:
    """Options as `--key=value` words (`--key` for a switch); underscores read as hyphens."""
    out = []
    for key, value in options.items():
        name = key.removeprefix("--").replace("_", "-")
        if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
            raise ConfigError(f"{launcher} option {key!r}: expected a long option name such as "
                              "nodes or tpu-topology")
        if name in reserved:
            raise ConfigError(f"{launcher} option {key!r}: the sweep sets --{name} for each "
                              "member itself; leave it out")
        out += [f"--{name}" if v == "" else f"--{name}={v}" for v in _values(value)]
    return out


def _comment(text: str) -> str:
    return text.replace("\n", "\\n")


def _submit(argv: list[str], tool: str, what: str, done: list[str],
            env: dict | None = None) -> None:
    """Runs one submission in the foreground (its output is the user's); a failure stops the
    rest. Ctrl-C reaches the launcher too (the same process group): wait while it stops."""
    proc = subprocess.Popen(argv, cwd=REPO, env=env)
    while True:
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt:
            continue
    if code != 0:
        raise ConfigError(f"{tool} exited with status {code} for member {what} (its message "
                          f"is above); submitted before it: {', '.join(done) or 'none'}, the "
                          "members after it were not")
    done.append(what)


# ------------------------------------------------------------------------------ slurm

def slurm_jobs(sweep: Sweep, sweep_workdir: str, out_dir: str,
               options: Mapping[str, OptionValue], submit: bool) -> list[str]:
    """`<out_dir>/<member>.sh` per member: `cd <repository> && exec sbatch <options>
    --job-name=<sweep>-<member> launch/slurm_gpu.sbatch <train args>`. The workdir is made
    absolute here (the job runs in the repository, not in this directory)."""
    sbatch_options = _flags(options, "slurm", reserved={"job-name"})
    os.makedirs(out_dir, exist_ok=True)
    files = []
    for member in sweep.members:
        workdir = fs.absolute(member_workdir(sweep_workdir, member))
        argv = ["sbatch", *sbatch_options, f"--job-name={sweep.name}-{member.name}",
                SLURM_SCRIPT, *train_args(sweep, member, workdir)]
        path = os.path.join(out_dir, f"{member.name}.sh")
        with open(path, "w", encoding="utf-8") as f:
            f.write("#!/usr/bin/env bash\n"
                    f"# t5g2 sweep {_comment(sweep.name)}, member {_comment(member.name)}: "
                    f"{_comment(shlex.join(member.flags()))}\n"
                    f"# workdir {_comment(workdir)}; submit with: bash {_comment(path)}\n"
                    "set -euo pipefail\n"
                    f"cd {shlex.quote(str(REPO))}\n"
                    f"exec {shlex.join(argv)}\n")
        os.chmod(path, 0o755)
        files.append(path)
    if submit:
        done: list[str] = []
        for member, path in zip(sweep.members, files):
            _submit(["bash", path], "sbatch", member.name, done)
    return files


# ------------------------------------------------------------------------------ gke

def jobset_name(sweep_name: str, member_name: str, max_length: int) -> str:
    """`<sweep>-<member>` as a DNS label (what a JobSet's name must be) of at most
    `max_length` characters: as it is when it is one; otherwise lower-cased, every run of other
    characters made one '-', cut to length, and ended by 8 hex digits of the original name's
    SHA-256, so two members never share a name."""
    wanted = f"{sweep_name}-{member_name}"
    label = re.sub(r"[^a-z0-9]+", "-", wanted.lower())
    label = re.sub(r"^[^a-z]+", "", label).strip("-")
    if label == wanted and len(label) <= max_length:
        return label
    digest = hashlib.sha256(wanted.encode()).hexdigest()[:8]
    head = label[:max(0, max_length - len(digest) - 1)].rstrip("-") or "t"
    return f"{head}-{digest}"


def _name_budget(run: gke.Run) -> int:
    """The longest JobSet name `gke.check` accepts for this run: its longest pod name
    (`<name>-<job>-<j>-<p>` and the 5-character suffix) must stay a 63-character DNS label."""
    return 63 - len(gke.longest_pod_name(run, gke.check(run))) + len(run.name)


def _gke_run(flags: list[str]) -> gke.Run:
    """launch.gke's own parser on the options (every launch.gke flag works); its complaint as a
    ConfigError."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            run, _ = gke.parse(flags)
    except SystemExit:
        lines = err.getvalue().strip().splitlines() or ["bad arguments"]
        raise ConfigError(f"gke launcher options: {lines[-1].split('error: ', 1)[-1]} "
                          "(each launch.gke flag is an option: image=IMAGE, target=tpu, ...)"
                          ) from None
    return run


def gke_jobs(sweep: Sweep, sweep_workdir: str, out_dir: str,
             options: Mapping[str, OptionValue], submit: bool) -> list[str]:
    """`<out_dir>/<member>.yaml` per member, rendered by launch.gke: the JobSet named by
    `jobset_name`, its container running launch.train with the member's workdir and flags."""
    flags = _flags(options, "gke", reserved={"name", "config", "workdir", "train-args", "out"})
    base = _gke_run([*flags, "--name", "t", "--config", sweep.config, "--workdir",
                     sweep_workdir])
    budget = _name_budget(base)
    runs = []
    for member in sweep.members:
        name = jobset_name(sweep.name, member.name, budget)
        runs.append(dataclasses.replace(
            base, name=name, workdir=member_workdir(sweep_workdir, member),
            train_args=tuple(sweep.flags(member))))
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep {sweep.name}: two members get the same JobSet name "
                          f"({', '.join(sorted(n for n in names if names.count(n) > 1))}); "
                          "rename the sweep or the members")
    documents = [gke.to_yaml(gke.render(run)) for run in runs]  # every check before any file
    os.makedirs(out_dir, exist_ok=True)
    files = []
    for member, text in zip(sweep.members, documents):
        path = os.path.join(out_dir, f"{member.name}.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"# t5g2 sweep {_comment(sweep.name)}, member {_comment(member.name)}: "
                    f"{_comment(shlex.join(member.flags()))}\n{text}")
        files.append(path)
    if submit:
        done: list[str] = []
        for member, path in zip(sweep.members, files):
            _submit(["kubectl", "apply", "-f", path], "kubectl apply", member.name, done)
    return files


# ------------------------------------------------------------------------------ tpu_vm

def tpu_vm_commands(sweep: Sweep, sweep_workdir: str, options: Mapping[str, OptionValue],
                    submit: bool) -> list[str]:
    """Prints, per member, the `launch/tpu_vm.sh run` command (from the repository root) that
    starts its launch.train on every worker of the slice and follows it to the end; the members
    run one after another on the same slice, so the first sets the workers up and the others
    reuse that (SETUP=0 unless the options set SETUP)."""
    env: dict[str, str] = {}
    for key, value in options.items():
        values = _values(value)
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", key) or len(values) != 1:
            raise ConfigError(f"tpu_vm option {key}={value!r}: one of launch/tpu_vm.sh's "
                              "variables and one value, e.g. QUEUED_RESOURCE=qr ZONE=us-east5-a")
        env[key] = values[0]
    if env.get("DETACH") == "1" and len(sweep.members) > 1:
        raise ConfigError("tpu_vm option DETACH=1: the members share one slice and run one "
                          "after another, each followed to its end; leave DETACH out")
    # launch/tpu_vm.sh check_workdir: a relative workdir is each worker's own disk.
    if (not sweep_workdir.startswith(("gs://", "/"))
            and env.get("ALLOW_LOCAL_WORKDIR") != "1"):
        raise ConfigError(f"--workdir {sweep_workdir} for --launcher tpu_vm: a gs:// URL or an "
                          "absolute path every worker mounts (each writes its checkpoint shards"
                          " there); ALLOW_LOCAL_WORKDIR=1 for a single-host slice")
    commands, argvs, envs = [], [], []
    for i, member in enumerate(sweep.members):
        member_env = dict(env)
        if i > 0 and "SETUP" not in env:
            member_env["SETUP"] = "0"
        args = train_args(sweep, member, member_workdir(sweep_workdir, member))
        command = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in member_env.items()),
                            shlex.join([TPU_VM_SCRIPT, "run", *args])])
        print(f"# member {_comment(member.name)}: on every worker of the slice "
              f"(--worker=all), {TPU_VM_SCRIPT} runs\n"
              f"#   {_comment(shlex.join(['.venv/bin/python', '-m', 'launch.train', *args]))}\n"
              f"{command}\n", flush=True)
        commands.append(command)
        argvs.append([str(REPO / TPU_VM_SCRIPT), "run", *args])
        envs.append({**os.environ, **member_env})
    if submit:
        done: list[str] = []
        for member, argv, member_env in zip(sweep.members, argvs, envs):
            _submit(argv, TPU_VM_SCRIPT, member.name, done, env=member_env)
    return commands
