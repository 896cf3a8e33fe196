"""MetricsWriter (TensorBoard without TensorFlow, metrics.jsonl, progress output) and StepTimer."""

import json
import logging
import math
import os
import subprocess
import sys
import types

import pytest

from t5g2.train.metrics import MetricsWriter, StepTimer, format_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_scalars(logdir):
    """{tag: [(step, value)]} via TensorBoard's own reader."""
    # tensorboard.compat.tf resolves to TensorFlow when it is installed unless this marker module
    # exists (tensorboard's no-TF switch); the stub's gfile reads local files just as well, and
    # keeps TensorFlow out of the test process.
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_jsonl(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


STEPS = {10: {"loss": 2.5, "learning_rate": 1e-4}, 20: {"loss": 2.0, "learning_rate": 2e-4},
         30: {"loss": 1.5, "learning_rate": 3e-4}}


def test_tensorboard_and_jsonl(tmp_path):
    workdir = str(tmp_path / "run")
    with MetricsWriter(workdir, total_steps=30, progress=False) as writer:
        for step, m in STEPS.items():
            writer.write(step, m)
        # flushed on every write: readable before close, as after a preemption
        assert read_scalars(os.path.join(workdir, "tensorboard"))["loss"] == [
            (10, 2.5), (20, 2.0), (30, 1.5)]
    scalars = read_scalars(os.path.join(workdir, "tensorboard"))
    assert sorted(scalars) == ["learning_rate", "loss"]
    assert [s for s, _ in scalars["learning_rate"]] == [10, 20, 30]
    assert [v for _, v in scalars["learning_rate"]] == pytest.approx([1e-4, 2e-4, 3e-4])
    assert read_jsonl(workdir) == [{"step": s, **m} for s, m in STEPS.items()]


def test_accepts_numpy_scalars(tmp_path):
    np = pytest.importorskip("numpy")
    with MetricsWriter(str(tmp_path), progress=False) as writer:
        writer.write(np.int64(3), {"loss": np.float32(0.5), "n": np.array(7)})
    assert read_jsonl(str(tmp_path)) == [{"step": 3, "loss": 0.5, "n": 7.0}]


def test_other_processes_write_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    with MetricsWriter(str(workdir), process_index=1, total_steps=30, progress=False) as writer:
        writer.write(10, {"loss": 1.0})
    writer.write(20, {"loss": 1.0})  # no-op even after close
    assert not workdir.exists()
    assert capsys.readouterr().out == ""


def test_resumed_writer_appends(tmp_path):
    workdir = str(tmp_path)
    with MetricsWriter(workdir, progress=False) as writer:
        writer.write(1, {"loss": 3.0})
        writer.write(2, {"loss": 2.0})
    with MetricsWriter(workdir, progress=False) as writer:
        writer.write(3, {"loss": 1.0})
    assert [r["step"] for r in read_jsonl(workdir)] == [1, 2, 3]
    assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 2
    assert read_scalars(os.path.join(workdir, "tensorboard"))["loss"] == [
        (1, 3.0), (2, 2.0), (3, 1.0)]


def test_event_files_sort_in_creation_order_across_a_power_of_ten(tmp_path, monkeypatch):
    """TensorBoard reads a directory's event files in name order: eleven writers (a counter
    crossing 9 -> 10 made "...10" sort before "...9"), and a clock that goes backwards, must
    still give files whose name order is their creation order."""
    import time

    workdir = str(tmp_path)
    calls = []  # a clock that goes backwards 1 us per call
    monkeypatch.setattr(time, "time_ns", lambda: 5 * 10**18 - 1_000 * len(calls.append(0) or calls))
    created = []
    for step in range(1, 12):
        with MetricsWriter(workdir, progress=False, initial_step=step - 1) as writer:
            writer.write(step, {"loss": float(step)})
            created.append(os.path.basename(writer.event_file))
    assert sorted(created) == created
    assert read_scalars(os.path.join(workdir, "tensorboard"))["loss"] == [
        (s, float(s)) for s in range(1, 12)]


def test_a_run_resumed_from_an_earlier_step_replaces_what_was_logged_after_it(tmp_path):
    """Killed after logging step 3 with a checkpoint at 1: steps 2 and 3 are trained again."""
    workdir = str(tmp_path)
    with MetricsWriter(workdir, progress=False) as writer:
        for step, loss in ((1, 3.0), (2, 2.0), (3, 1.0)):
            writer.write(step, {"loss": loss})
    with open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write('{"step": 4, "lo')  # a line cut short by the kill
    with MetricsWriter(workdir, progress=False, initial_step=1) as writer:
        writer.write(2, {"loss": 2.5})
        writer.write(3, {"loss": 1.5})
    assert [(r["step"], r["loss"]) for r in read_jsonl(workdir)] == [(1, 3.0), (2, 2.5), (3, 1.5)]
    assert read_scalars(os.path.join(workdir, "tensorboard"))["loss"] == [
        (1, 3.0), (2, 2.5), (3, 1.5)]


def test_write_after_close_raises(tmp_path):
    writer = MetricsWriter(str(tmp_path), progress=False)
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        writer.write(1, {"loss": 1.0})


def test_line_output_when_not_a_terminal(tmp_path, capsys):
    # under pytest stdout is captured, not a tty: progress=None picks log lines
    with MetricsWriter(str(tmp_path), total_steps=200) as writer:
        writer.write(120, {"loss": 2.3141, "z_loss": 1.234e-5, "learning_rate": 1.2e-4,
                           "grad_norm": 0.9123, "target_tokens": 4096.0, "custom": 0.123456,
                           "step_time_s": 0.5, "tokens_per_s": 12345.4,
                           "model_flops_per_s": 4.12e14, "mfu": 0.4123})
    assert capsys.readouterr().out == (
        "step 120 | loss 2.314 | z_loss 1.23e-05 | lr 1.2e-04 | grad_norm 0.912 | custom 0.1235"
        " | target_tokens 4,096 | step_time 0.5s | tokens/s 12,345 | FLOP/s 412T | mfu 41.2%\n")


def test_format_metrics_generic_and_nonfinite():
    assert format_metrics(5, {"foo": 1234567.0, "loss": float("nan"), "mfu": float("inf")}) == (
        "step 5 | loss nan | foo 1.235e+06 | mfu inf")


def test_progress_bar(tmp_path, capsys):
    with MetricsWriter(str(tmp_path), total_steps=100, progress=True) as writer:
        writer.write(50, {"loss": 2.0, "tokens_per_s": 1000.0, "mfu": 0.25, "grad_norm": 1.0})
    out = capsys.readouterr().out
    assert "50/100" in out
    assert "loss=2, tokens/s=1,000, mfu=25.0%" in out
    assert "grad_norm" not in out


def test_nonfinite_written_and_warned(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="t5g2.train.metrics"):
        with MetricsWriter(str(tmp_path), progress=False) as writer:
            writer.write(7, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["step 7: non-finite metrics loss=nan, grad_norm=inf"]
    (row,) = read_jsonl(str(tmp_path))
    assert row["step"] == 7 and math.isnan(row["loss"]) and row["grad_norm"] == math.inf
    scalars = read_scalars(os.path.join(str(tmp_path), "tensorboard"))
    assert math.isnan(scalars["loss"][0][1]) and scalars["grad_norm"][0][1] == math.inf


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_step_timer():
    clock = FakeClock()
    timer = StepTimer(tokens_per_step=1000, flops_per_step=4e12, peak_flops_per_s=1e13,
                      clock=clock)
    assert timer.measure(1) == {}  # no window yet: starts one
    clock.now += 5.0
    assert timer.measure(11) == pytest.approx({  # 10 steps in 5 s
        "step_time_s": 0.5, "tokens_per_s": 2000.0, "model_flops_per_s": 8e12, "mfu": 0.8})
    clock.now += 1.0
    assert timer.measure(11) == {}  # no steps since: nothing to report
    timer.start(20)
    clock.now += 2.0
    assert timer.measure(24)["step_time_s"] == pytest.approx(0.5)


def test_step_timer_optional_flops_and_peak():
    clock = FakeClock()
    timer = StepTimer(tokens_per_step=10, flops_per_step=100.0, clock=clock)
    timer.start(0)
    clock.now += 1.0
    assert timer.measure(2) == {"step_time_s": 0.5, "tokens_per_s": 20.0,
                                "model_flops_per_s": 200.0}
    timer = StepTimer(tokens_per_step=10, clock=clock)
    timer.start(0)
    clock.now += 1.0
    assert timer.measure(1) == {"step_time_s": 1.0, "tokens_per_s": 10.0}
    with pytest.raises(ValueError):
        StepTimer(tokens_per_step=1, flops_per_step=1, peak_flops_per_s=0)


def test_no_tensorflow_import(tmp_path):
    code = (
        "import sys\n"
        "import t5g2.train.metrics as m\n"
        "assert 'tensorflow' not in sys.modules, 'import'\n"
        f"with m.MetricsWriter({str(tmp_path)!r}, total_steps=2, progress=True) as w:\n"
        "    w.write(1, {'loss': 1.0})\n"
        "assert 'tensorflow' not in sys.modules, 'write'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
    assert read_jsonl(str(tmp_path)) == [{"step": 1, "loss": 1.0}]
