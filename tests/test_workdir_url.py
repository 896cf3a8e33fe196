"""A workdir given as an object-store URL (gs://) goes through `t5g2.fs` (etils.epath), served
here by a local fake bucket (tests/fake_store.py): a launch.train run writes config.json,
metrics.jsonl and TensorBoard files into the bucket and nothing into a local `gs:` directory; a
resumed metrics writer continues there; the checkpoint directory's own operations (finding
interrupted saves, moving a checkpoint aside, removing one) work on it.

Not shown here: orbax writes a checkpoint's arrays to gs:// through tensorstore's own GCS
driver, which this fake cannot serve, so checkpoints in a bucket are left to orbax/tensorstore.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from t5g2 import fs
from t5g2.train import checkpoint
from t5g2.train.checkpoint import Checkpointer, CheckpointError, interrupted_saves, move_aside
from t5g2.train.metrics import MetricsWriter
from tests import fake_store
from tests.test_metrics import read_scalars
from tests.test_multihost import REPO, _env

COMMIT_FILE = "commit_success.txt"  # what orbax writes into a complete gs:// step directory


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """(root, calls): gs://<x> is <root>/<x>. The working directory is tmp_path, so a URL
    mistaken for a local path would show up as tmp_path/gs:."""
    monkeypatch.chdir(tmp_path)
    root = str(tmp_path / "gcs")
    with fake_store.fake_gcs(root) as calls:
        yield root, calls
    assert not os.path.exists(tmp_path / "gs:")


_LAUNCH_WITH_FAKE_GCS = """
import sys
from tests.fake_store import fake_gcs
with fake_gcs(sys.argv[1]):
    from launch import cli, train
    sys.argv = ["launch.train", *sys.argv[2:]]
    cli.run(train.main)
"""

RUN_FLAGS = (
    "--config", os.path.join(str(REPO), "configs", "tiny.py"), "--config.data.source=synthetic",
    "--config.train.steps=2", "--config.train.log_every=1",
    "--config.train.encoder_length=32", "--config.train.decoder_length=16",
    "--config.model.encoder.num_layers=2", "--config.model.decoder.num_layers=2",
    "--config.peak_flops_per_device=1e9", "--config.checkpoint.enabled=false",
)


def _jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_launch_train_writes_the_run_into_the_bucket(tmp_path):
    root = str(tmp_path / "gcs")
    proc = subprocess.run(
        [sys.executable, "-c", _LAUNCH_WITH_FAKE_GCS, root, *RUN_FLAGS,
         "--workdir", "gs://bucket/run"],
        cwd=tmp_path, env=_env(1, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert not os.path.exists(tmp_path / "gs:"), "the URL was taken for a local path"
    assert "workdir      gs://bucket/run\n" in proc.stdout
    assert "metrics      gs://bucket/run/metrics.jsonl\n" in proc.stdout

    run = os.path.join(root, "bucket", "run")
    saved = json.loads(open(os.path.join(run, "config.json"), encoding="utf-8").read())
    assert saved["train"]["steps"] == 2 and saved["checkpoint"]["enabled"] is False
    logged = _jsonl(os.path.join(run, "metrics.jsonl"))
    assert [m["step"] for m in logged] == [1, 2]
    assert read_scalars(os.path.join(run, "tensorboard"))["loss"] == [
        (m["step"], pytest.approx(m["loss"])) for m in logged]
    assert not os.path.exists(os.path.join(run, "checkpoints"))


def test_a_workdir_in_the_bucket_of_another_model_is_refused(fake_gcs):
    """The loop reads the bucket's config.json (a run stopped before its first checkpoint)."""
    from configs import tiny
    from t5g2.configlib import ConfigError
    from t5g2.train import loop

    root, calls = fake_gcs
    os.makedirs(f"{root}/bucket/run")
    saved = tiny.get_config()
    with open(f"{root}/bucket/run/config.json", "w", encoding="utf-8") as f:
        f.write(saved.to_json_best_effort(indent=2))
    config = tiny.get_config()
    config.data.source = "synthetic"
    config.checkpoint.enabled = False
    config.model.encoder.num_layers = config.model.decoder.num_layers = 2
    with pytest.raises(ConfigError, match="model.encoder.num_layers=12 in its config.json, 2 now"):
        loop.train(config, "gs://bucket/run")
    assert ("open", "gs://bucket/run/config.json") in calls
    assert os.listdir(f"{root}/bucket/run") == ["config.json"]  # nothing written


def test_a_resumed_metrics_writer_continues_in_the_bucket(fake_gcs, tmp_path):
    root, calls = fake_gcs
    local, remote = str(tmp_path / "local"), "gs://bucket/run"
    run = f"{root}/bucket/run"
    for workdir in (local, remote):
        with MetricsWriter(workdir, progress=False) as writer:
            for step, loss in ((1, 3.0), (2, 2.0), (3, 1.0)):
                writer.write(step, {"loss": loss})
                if workdir == remote:  # in the bucket at once: a killed run keeps its curve
                    assert _jsonl(f"{run}/metrics.jsonl")[-1] == {"step": step, "loss": loss}
    # an interrupted run, resumed from its checkpoint at step 1: steps 2 and 3 are trained again
    for workdir in (local, remote):
        with MetricsWriter(workdir, progress=False, initial_step=1) as writer:
            writer.write(2, {"loss": 2.5})
            writer.write(3, {"loss": 1.5})
    expected = [(1, 3.0), (2, 2.5), (3, 1.5)]
    assert [(m["step"], m["loss"]) for m in _jsonl(f"{run}/metrics.jsonl")] == expected
    assert read_scalars(f"{run}/tensorboard")["loss"] == expected
    assert len(os.listdir(f"{run}/tensorboard")) == 2
    with open(f"{run}/metrics.jsonl", "rb") as a, open(f"{local}/metrics.jsonl", "rb") as b:
        assert a.read() == b.read()  # the same bytes as a local workdir
    assert ("open", "gs://bucket/run/metrics.jsonl") in calls


def _step_dir(root: str, name: str, committed: bool) -> None:
    os.makedirs(f"{root}/bucket/run/checkpoints/{name}/params")
    if committed:
        with open(f"{root}/bucket/run/checkpoints/{name}/{COMMIT_FILE}", "w") as f:
            f.write("done")


def test_interrupted_saves_and_moving_aside_in_the_bucket(fake_gcs):
    """On gs:// orbax writes a step in place and marks it complete with a commit file (no
    temporary directory and rename), so a step directory without it is an interrupted save."""
    root, calls = fake_gcs
    directory = "gs://bucket/run/checkpoints"
    assert interrupted_saves(directory) == []  # no directory yet
    for name, committed in (("1", True), ("2", True), ("3", False), ("2.corrupt", True),
                            ("4.orbax-checkpoint-tmp-123", False)):
        _step_dir(root, name, committed)
    assert interrupted_saves(directory) == [f"{directory}/3",
                                            f"{directory}/4.orbax-checkpoint-tmp-123"]
    assert ("listdir", directory) in calls

    assert move_aside(f"{directory}/2", ".corrupt") == f"{directory}/2.corrupt-2"  # kept both
    assert move_aside(f"{directory}/1", ".superseded") == f"{directory}/1.superseded"
    assert ("rename", f"{directory}/2") in calls
    for path in interrupted_saves(directory):
        fs.rmtree(path)
    assert sorted(os.listdir(f"{root}/bucket/run/checkpoints")) == [
        "1.superseded", "2.corrupt", "2.corrupt-2"]
    assert sorted(os.listdir(f"{root}/bucket/run/checkpoints/2.corrupt-2")) == [COMMIT_FILE,
                                                                               "params"]
    assert interrupted_saves(directory) == []


def test_checkpoints_in_a_bucket_without_the_gcs_client_are_refused_at_start(fake_gcs,
                                                                             monkeypatch):
    """orbax reads a gs:// bucket's settings with google-cloud-storage, which it does not
    install: one line naming the package, before anything is written."""
    root, _ = fake_gcs
    monkeypatch.setattr(checkpoint, "_gcs_client_installed", lambda: False)
    with pytest.raises(CheckpointError, match=r"gs://bucket/run/checkpoints need the "
                                              r"google-cloud-storage package.*pip install"):
        Checkpointer("gs://bucket/run")
    assert not os.path.exists(root)
