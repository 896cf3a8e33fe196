"""The ahead-of-time check compiles a sharded train step from abstract shapes only, for a named
target whose device count and HBM come from the vendors' documentation."""

import pytest

from configs import tiny
from launch.aot import Target, compile_report, fits, resolve_target
from t5g2.configlib import ConfigError
from t5g2.model import ModelConfig
from t5g2.model.params import count_params


def test_compile_report_for_an_fsdp_mesh():
    config = tiny.get_config()
    config.mesh.data, config.mesh.fsdp = 1, 8
    config.model.attention_query_chunk = 8
    config.train.loss_chunk = 8
    report = compile_report(config)
    assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    memory = report["per_device_bytes"]
    params = count_params(ModelConfig.from_config_dict(config.model))
    # float32 parameters split 8 ways along `embed` (64 = 8 x 8), Adam's two moments likewise.
    assert abs(memory["parameters"] - 4 * params / 8) < 0.01 * 4 * params
    assert abs(memory["optimizer_state"] - 2 * memory["parameters"]) <= 64
    assert memory["temporaries"] > 0 and memory["total"] >= memory["arguments"]


@pytest.mark.parametrize("topology, devices, hosts, hbm_gib", [
    ("v5p-8", 4, 1, 95),  # 2x2x1: 8 TensorCores, 4 megacore chips (one JAX device each), 1 host
    ("v5p-32", 16, 4, 95),
    ("v4-8", 4, 1, 32),
    ("v5e-8", 8, 1, 16),  # one TensorCore per chip
    ("h100-8", 8, 1, 80),
    ("H200-16", 16, 2, 141),
])
def test_named_targets(topology, devices, hosts, hbm_gib):
    target = resolve_target(topology, None, None)
    assert (target.devices, target.hosts, target.hbm_gib) == (devices, hosts, hbm_gib)


def test_custom_targets_and_overrides():
    assert resolve_target(None, 6, 40.0) == Target("6 devices", 6, 40.0, 6)
    assert resolve_target("v5p-8", None, 90.0).hbm_gib == 90.0
    with pytest.raises(ConfigError, match="name the target: --topology=v5p-8"):
        resolve_target(None, 8, None)
    with pytest.raises(ConfigError, match="--topology='v5p-7' is not a known target"):
        resolve_target("v5p-7", None, None)  # v5p names count TensorCores: 2 per device
    with pytest.raises(ConfigError, match="--topology='tpu-8' is not a known target"):
        resolve_target("tpu-8", None, None)


def test_fits_compares_the_per_device_total_with_the_targets_hbm():
    report = {"per_device_bytes": {"total": 96 * 2**30}}
    assert fits(report, resolve_target("v5p-8", None, None))["fits"] is False
    verdict = fits(report, resolve_target("h200-8", None, None))
    assert verdict["fits"] is True and verdict["headroom_gib"] == 45.0
    assert verdict["target"]["devices"] == 8 and verdict["target"]["hosts"] == 1
