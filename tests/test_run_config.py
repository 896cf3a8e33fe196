"""The typed run config (t5g2/run_config.py): every shipped config builds, every section's
bad value is one ConfigError naming the field before anything runs, and configs/base.py's
sections are built from the dataclasses' own defaults (one declaration per field)."""

import dataclasses

import ml_collections
import pytest

from configs import base, t5g2_1b, t5g2_270m, t5g2_4b, tiny, tiny_vision
from t5g2.configlib import ConfigError
from t5g2.data.pipeline import PipelineConfigError
from t5g2.run_config import (CheckpointConfig, InitConfig, MeshConfig, RunConfig, SeqioConfig)
from t5g2.train.eval import EvalConfig


@pytest.mark.parametrize("module", [tiny, tiny_vision, t5g2_270m, t5g2_1b, t5g2_4b])
def test_every_shipped_config_builds(module):
    run = RunConfig.from_config(module.get_config())
    assert run.model.encoder.num_layers > 0 and run.train.steps > 0
    assert run.data.source == "ul2" and run.checkpoint.enabled
    assert (run.model.vision is None) == (module is tiny)


def test_the_released_sizes_have_a_text_only_variant(tmp_path):
    """`--config=configs/<size>.py:text` drops the tower (an override cannot set it to None)."""
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values)
    values(["prog", "--config=configs/t5g2_270m.py:text"])
    assert RunConfig.from_config(values.config).model.vision is None
    with pytest.raises(ConfigError, match="config variant 'vision' is unknown"):
        t5g2_1b.get_config("vision")


def _set(path, value):
    def change(d):
        *parents, leaf = path.split(".")
        for p in parents:
            d = d[p]
        d[leaf] = value
    return change


@pytest.mark.parametrize("change, message", [
    (_set("bogus", 1), r"unknown field\(s\) config.bogus"),
    (_set("checkpoint.evry", 5), r"unknown field\(s\) checkpoint.evry; valid: async_save"),
    (_set("checkpoint.every", 0), r"checkpoint.every=0 must be an integer >= 1"),
    (_set("checkpoint.async_save", "yes"), r"checkpoint.async_save='yes' must be True or False"),
    (_set("checkpoint.restore_step", -2), r"checkpoint.restore_step=-2 must be an integer >= 0"),
    (_set("mesh.fsdp", -1), r"at most one ICI axis may be -1"),
    (_set("mesh.dcn_data", 0), r"mesh.dcn_data=0 must be an integer >= 1"),
    (_set("init.from_t5gemma2", "/x"), None),  # with from_gemma3 set below: both
    (_set("data.source", "tfds"), r"data.source='tfds' is unknown; valid: seqio, synthetic, ul2"),
    (_set("data.source", "seqio"), r"data.source='seqio' needs data.seqio.task"),
    (_set("data.seqio.modules", "my.tasks"), r"data.seqio.modules='my.tasks' must be a tuple"),
    (_set("data.ul2.vocab_size", 0), r"data.ul2 \(with .*\): vocab_size=0 must be an integer"),
    (_set("data.ul2.seed", 3), r"data.ul2.seed is set by train.\* / seed"),
    (_set("eval.every", -1), r"eval.every=-1 must be an integer >= 0"),
    (_set("seed", -1), r"seed=-1 must be an integer >= 0"),
    (_set("peak_flops_per_device", 0.0), r"peak_flops_per_device=0.0 must be a positive"),
    (_set("shared_workdir_timeout_s", 0), r"shared_workdir_timeout_s=0 must be a positive"),
    (_set("train.steps", 0), r"train.steps=0 must be a positive integer"),
    (_set("model.cross_attention", "both"), r"model.cross_attention='both' is unknown"),
])
def test_a_bad_field_is_one_error_naming_it(change, message):
    config = tiny.get_config().to_dict()
    change(config)
    if message is None:
        config["init"]["from_gemma3"] = "/y"
        message = r"init.from_gemma3='/y' and init.from_t5gemma2='/x' are both set: pick one"
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_config(config)


def test_a_run_with_a_bad_field_stops_before_it_writes_anything(tmp_path):
    from t5g2.train import loop

    config = tiny.get_config()
    config.checkpoint.keep = 0
    with pytest.raises(ConfigError, match="checkpoint.keep=0"):
        loop.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_sections_are_built_from_the_dataclass_defaults():
    for section, cls in ((base.mesh(), MeshConfig), (base.init(), InitConfig),
                         (base.checkpoint(), CheckpointConfig), (base.evaluation(), EvalConfig),
                         (base.data().seqio, SeqioConfig)):
        assert cls(**section.to_dict()) == cls(), cls.__name__
    # A field that defaults to None keeps its type for command-line overrides.
    locked = ml_collections.ConfigDict(dict(checkpoint=base.checkpoint()))
    locked.lock()
    locked.checkpoint.restore_step = 5
    with pytest.raises(TypeError):
        locked.checkpoint.restore_step = "five"
    assert {f.name for f in dataclasses.fields(CheckpointConfig)} == set(base.checkpoint())


def test_model_and_train_sections_are_built_from_their_dataclasses():
    """base.stack / base.model / base.train set what a config chooses; every other field's
    value is the dataclass default (declared once), with its type kept for overrides."""
    from t5g2.model import ModelConfig
    from t5g2.model.config import StackConfig
    from t5g2.train.config import TrainConfig

    dims = dict(num_layers=2, d_model=8, ffn_dim=16, num_heads=2, num_kv_heads=1,
                sliding_window=4)
    stack = StackConfig(**dims, head_dim=256, query_pre_attn_scalar=256.0)
    model = ModelConfig.from_config_dict(base.model(base.stack(**dims), vocab_size=64))
    assert model == ModelConfig(encoder=stack, decoder=stack, vocab_size=64)
    train = TrainConfig.from_config_dict(base.train(batch_size=8, encoder_length=4,
                                                    decoder_length=4, steps=1))
    assert train == dataclasses.replace(TrainConfig(8, 4, 4, 1), z_loss=1e-4)  # the recipe's
    assert isinstance(base.train(batch_size=8, encoder_length=4, decoder_length=4, steps=1,
                                 learning_rate=1).learning_rate, float)


def test_pipeline_errors_are_config_errors():
    assert issubclass(PipelineConfigError, ConfigError)  # one error type for every config
