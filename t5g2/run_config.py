"""One typed run config: every section of a run's ml_collections config as a frozen dataclass,
built and validated once, before anything runs (`RunConfig.from_config`), with one error type
(`ConfigError`) naming the field, the value and the way out.

The sections' fields and defaults are declared here (and in ModelConfig, TrainConfig,
PipelineConfig, EvalConfig); configs/base.py builds its ConfigDicts from these declarations
(`config_section`), so a field exists in one place. ml_collections then rejects an override of a
field that does not exist, or of the wrong type, when the command line is parsed; a config built
in Python (a test, a sweep) is checked here: unknown fields, types, ranges, and the rules that
tie sections together (a seqio source needs a task; the UL2 pipeline's settings must build).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import ml_collections

from t5g2.configlib import ConfigError, build, to_dict
from t5g2.model import ModelConfig
from t5g2.train.config import TrainConfig
from t5g2.train.eval import EvalConfig

DATA_SOURCES = ("seqio", "synthetic", "ul2")


def _int(value: Any, field: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{field}={value!r} must be an integer >= {low}")


def _optional_str(value: Any, field: str) -> None:
    if value is not None and not (isinstance(value, str) and value):
        raise ConfigError(f"{field}={value!r} must be a non-empty string or None")


def _bool(value: Any, field: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} must be True or False")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """ICI axis sizes (one may be -1: the devices left) and DCN sizes (slices or hosts)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1

    def validate(self) -> None:
        ici = {name: getattr(self, name) for name in ("data", "fsdp", "tensor")}
        for name, value in ici.items():
            if value != -1:
                _int(value, f"mesh.{name}", 1)
        if list(ici.values()).count(-1) > 1:
            raise ConfigError(f"mesh: {', '.join(f'{k}={v}' for k, v in ici.items())}: at most "
                              "one ICI axis may be -1 (the devices left)")
        for name in ("dcn_data", "dcn_fsdp", "dcn_tensor"):
            _int(getattr(self, name), f"mesh.{name}", 1)


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """Where a fresh run's parameters come from (a workdir with checkpoints always resumes):
    a Hugging Face Gemma 3 directory (adapted), a T5Gemma 2 directory, or neither (random).
    vision_from: a checkpoint whose SigLIP tower (and projector, if it has one of the model's
    width) starts `model.vision`, whatever the text starts from (t5g2.train.init says which
    checkpoints, and when it is needed)."""

    from_gemma3: str | None = None
    from_t5gemma2: str | None = None
    vision_from: str | None = None

    def validate(self) -> None:
        for name in ("from_gemma3", "from_t5gemma2", "vision_from"):
            _optional_str(getattr(self, name), f"init.{name}")
        if self.from_gemma3 and self.from_t5gemma2:
            raise ConfigError(f"init.from_gemma3={self.from_gemma3!r} and init.from_t5gemma2="
                              f"{self.from_t5gemma2!r} are both set: pick one")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under <workdir>/checkpoints: every `every` steps (and at the end and on
    SIGTERM), keeping the last `keep` plus every `keep_period`-th (0: none); resume from the
    latest or `restore_step`; `fallback`: a corrupt latest falls back to the newest good one."""

    enabled: bool = True
    every: int = 1000
    keep: int = 3
    keep_period: int = 0
    async_save: bool = True
    restore_step: int | None = None
    fallback: bool = False

    def validate(self) -> None:
        for name in ("enabled", "async_save", "fallback"):
            _bool(getattr(self, name), f"checkpoint.{name}")
        _int(self.every, "checkpoint.every", 1)
        _int(self.keep, "checkpoint.keep", 1)
        _int(self.keep_period, "checkpoint.keep_period", 0)
        if self.restore_step is not None:
            _int(self.restore_step, "checkpoint.restore_step", 0)
        if not self.enabled:
            set_anyway = [k for k in ("restore_step", "fallback") if getattr(self, k)]
            if set_anyway:
                raise ConfigError(f"checkpoint.{set_anyway[0]} is set but "
                                  "checkpoint.enabled=False")


@dataclasses.dataclass(frozen=True)
class SeqioConfig:
    """A registered seqio task or mixture, and the modules whose import registers it."""

    task: str | None = None
    modules: tuple[str, ...] = ()

    def validate(self) -> None:
        _optional_str(self.task, "data.seqio.task")
        if not isinstance(self.modules, tuple) or not all(
                isinstance(m, str) and m for m in self.modules):
            raise ConfigError(f"data.seqio.modules={self.modules!r} must be a tuple of module "
                              "names")


# data.ul2 fields the train section and the seed set.
UL2_SET_ELSEWHERE = frozenset({"encoder_length", "decoder_length", "batch_size", "seed"})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The batch source: "ul2" (the UL2 pipeline, `ul2` = PipelineConfig less the lengths, batch
    and seed; with `image_text.paths` set, image-text rows mixed in: `image_text` =
    t5g2.data.image_text.ImageTextConfig), "seqio" (`seqio`), "synthetic" (a copy task cycling
    through `distinct_batches` batches; 0: a new one every step)."""

    source: str = "ul2"
    distinct_batches: int = 0
    ul2: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    image_text: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seqio: SeqioConfig = SeqioConfig()

    def validate(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ConfigError(f"data.source={self.source!r} is unknown; valid: "
                              f"{', '.join(DATA_SOURCES)}")
        _int(self.distinct_batches, "data.distinct_batches", 0)
        self.seqio.validate()
        if self.source == "seqio" and not self.seqio.task:
            raise ConfigError("data.source='seqio' needs data.seqio.task: the name of a "
                              "registered seqio task or mixture (and data.seqio.modules: the "
                              "modules that register it)")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run's config, typed and validated (see the module docstring)."""

    name: str
    seed: int
    model: ModelConfig
    train: TrainConfig
    mesh: MeshConfig
    data: DataConfig
    init: InitConfig
    checkpoint: CheckpointConfig
    eval: EvalConfig
    peak_flops_per_device: float | None = None
    shared_workdir_timeout_s: float = 60.0

    @classmethod
    def from_config(cls, config: Any) -> "RunConfig":
        """From a run's ConfigDict (or the JSON a checkpoint recorded); ConfigError naming the
        first bad field."""
        values = to_dict(config)
        sections = {"model", "train", "mesh", "data", "init", "checkpoint", "eval"}
        missing = sorted(sections - set(values))
        if missing:
            raise ConfigError(f"the config has no {missing[0]} section (configs/base.py's "
                              "`config` builds every section)")
        data = dict(to_dict(values["data"]))
        seqio = dict(to_dict(data.pop("seqio", {}) or {}))
        if isinstance(seqio.get("modules"), list):
            seqio["modules"] = tuple(seqio["modules"])
        data_cfg = build(DataConfig, dict(data, ul2=dict(to_dict(data.get("ul2", {}) or {})),
                                          image_text=dict(to_dict(
                                              data.get("image_text", {}) or {})),
                                          seqio=build(SeqioConfig, seqio, "data.seqio")),
                         "data")
        run = build(cls, dict(
            values,
            model=ModelConfig.from_config_dict(values["model"]),
            train=TrainConfig.from_config_dict(values["train"]),
            mesh=build(MeshConfig, to_dict(values["mesh"]), "mesh"),
            data=data_cfg,
            init=build(InitConfig, to_dict(values["init"]), "init"),
            checkpoint=build(CheckpointConfig, to_dict(values["checkpoint"]), "checkpoint"),
            eval=EvalConfig.from_config(values)), "config")
        run.validate()
        return run

    def validate(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"name={self.name!r} must be a non-empty string")
        _int(self.seed, "seed", 0)
        for section in (self.mesh, self.data, self.init, self.checkpoint):
            section.validate()
        peak = self.peak_flops_per_device
        if peak is not None and not (isinstance(peak, (int, float)) and math.isfinite(peak)
                                     and peak > 0):
            raise ConfigError(f"peak_flops_per_device={peak!r} must be a positive number or "
                              "None (the device's published peak)")
        timeout = self.shared_workdir_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"shared_workdir_timeout_s={timeout!r} must be a positive number "
                              "of seconds")
        if self.data.source == "ul2":
            from t5g2.train.loop import pipeline_config

            try:
                pipeline_config(dict(data=dict(ul2=self.data.ul2), seed=self.seed),
                                self.train).validate()
            except ConfigError as e:
                raise ConfigError(f"data.ul2 (with train's lengths and batch, and seed): {e}"
                                  ) from e
        from t5g2.data.image_text import ImageSpec, ImageTextConfig

        image_text = ImageTextConfig.from_mapping(self.data.image_text)
        image_text.validate()
        if image_text.enabled:
            if self.data.source != "ul2":
                raise ConfigError(f"data.image_text.paths is set but data.source="
                                  f"{self.data.source!r}: image-text rows mix into the UL2 "
                                  "pipeline only; set data.source='ul2' or clear the paths")
            ImageSpec.from_model(self.model)  # a model that reads images


def config_section(cls: type, **values: Any) -> ml_collections.ConfigDict:
    """An ml_collections section of `cls`'s fields with its defaults (replaced by `values`); a
    field that may be None gets a typed placeholder, so an override is still type-checked."""
    out = {}
    for field in dataclasses.fields(cls):
        value = values.pop(field.name, field.default)
        if value is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{field.name} has no default: pass it")
        kind = str(field.type).split(" ")[0].split("|")[0]  # "float | None" -> "float"
        if value is None:
            value = ml_collections.FieldReference(
                None, field_type={"str": str, "int": int, "float": float}.get(kind, object))
        elif kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # so that an override of 3e-4 parses, whatever the default
        out[field.name] = value
    if values:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(values)}")
    return ml_collections.ConfigDict(out)
