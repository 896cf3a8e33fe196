"""The ahead-of-time check compiles a sharded train step from abstract shapes only."""

from configs import tiny
from launch.aot import compile_report
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
