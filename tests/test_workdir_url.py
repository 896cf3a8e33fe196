"""A workdir given as an object-store URL (gs://).

End to end against a local Cloud Storage server (tests/fake_gcs.py) that the real clients talk
to over HTTP (tensorstore's gcs driver, google-cloud-storage, gcsfs under etils.epath): a
launch.train run checkpoints into the bucket, the same command with more steps resumes from it
exactly as an uninterrupted local run, and launch.export reads it; nothing goes to a local `gs:`
directory or to Google.

Checked there too: the checkpoint directory's own operations (finding interrupted saves, moving
a checkpoint aside) and t5g2.fs's writes through gcsfs. The other tests serve gs:// from a local
directory through etils' mock backend (tests/fake_store.py), in the test process: a workdir of
another model refused, a resumed metrics writer, the directory operations' calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from t5g2 import fs
from t5g2.train import checkpoint
from t5g2.train.checkpoint import Checkpointer, CheckpointError, interrupted_saves, move_aside
from t5g2.train.metrics import MetricsWriter
from tests import fake_store
from tests.fake_gcs import FakeGcs
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


RUN_FLAGS = (
    "--config", os.path.join(str(REPO), "configs", "tiny.py"), "--config.data.source=synthetic",
    "--config.train.log_every=1",
    "--config.train.encoder_length=32", "--config.train.decoder_length=16",
    "--config.model.encoder.num_layers=2", "--config.model.decoder.num_layers=2",
    "--config.peak_flops_per_device=1e9", "--config.checkpoint.every=1",
)


def _jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


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


def _launch(module: str, flags, cwd, env) -> str:
    proc = subprocess.run([sys.executable, "-m", module, *flags], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow  # the bucket's pieces (writer, saves, refusals, directory ops) by default
def test_a_run_in_a_bucket_checkpoints_resumes_and_exports(tmp_path):
    """launch.train with --workdir gs://bucket/run against a local GCS server: 2 steps, then
    the same command with 3 steps resumes from the bucket's checkpoint (past a save interrupted
    in the bucket) with the losses and weights of an uninterrupted 3-step local run, and
    launch.export writes the same Hugging Face files from the bucket as from the local run."""
    from safetensors.numpy import load_file

    work = tmp_path / "cwd"  # the processes' working directory: a URL taken for a path lands here
    (tmp_path / "gcloud").mkdir()
    work.mkdir()
    local, remote = str(tmp_path / "local"), "gs://bucket/run"
    base = _env(1, PYTHONPATH=str(REPO))
    _launch("launch.train", [*RUN_FLAGS, "--config.train.steps=3", "--workdir", local], work, base)
    with FakeGcs() as gcs:
        env = gcs.env(base, str(tmp_path / "gcloud"))
        keep = "--config.checkpoint.keep=1"  # orbax removes the older checkpoints in the bucket
        first = _launch("launch.train", [*RUN_FLAGS, "--config.train.steps=2", keep,
                                         "--workdir", remote], work, env)
        saved = gcs.objects("bucket", "run/")
        # a complete checkpoint, its arrays written by tensorstore; step 1's removed
        assert "run/checkpoints/2/commit_success.txt" in saved
        assert "run/checkpoints/2/params/manifest.ocdbt" in saved
        assert "run/checkpoints/2/data/process_0-of-1.json" in saved
        assert not [name for name in saved if name.startswith("run/checkpoints/1/")]
        assert {"run/config.json", "run/metrics.jsonl"} <= saved.keys()
        assert json.loads(saved["run/config.json"])["train"]["steps"] == 2
        leftover = "run/checkpoints/3/params/ocdbt.process_0/d/0123"  # of a save killed midway
        gcs.put("bucket", leftover, b"partial")

        resumed = _launch("launch.train", [*RUN_FLAGS, "--config.train.steps=3", keep,
                                           "--workdir", remote], work, env)
        hf = str(tmp_path / "hf")
        exported = _launch("launch.export", ["--workdir", remote, "--out", hf], work, env)
        bucket = gcs.objects("bucket", "run/")
        gcs.copy_out("bucket", "run/tensorboard/", str(tmp_path / "tensorboard"))
        requests = gcs.requests

    assert "workdir      gs://bucket/run\n" in first
    assert "metrics      gs://bucket/run/metrics.jsonl\n" in first
    assert "starting at step 2 from checkpoint gs://bucket/run/checkpoints/2" in resumed
    assert "found gs://bucket/run/checkpoints/3: a save was interrupted" in resumed
    assert leftover not in bucket  # removed; step 3 saved anew
    assert "run/checkpoints/3/commit_success.txt" in bucket
    assert sorted({name.split("/")[2] for name in bucket if name.startswith("run/checkpoints/")}
                  ) == ["3"]
    assert "exported step 3 to" in exported

    # exact resume: the losses and weights of the uninterrupted local run
    logged = [json.loads(line) for line in bucket["run/metrics.jsonl"].decode().splitlines()]
    reference = _jsonl(os.path.join(local, "metrics.jsonl"))
    assert [(m["step"], m["loss"], m["grad_norm"]) for m in logged] == [
        (m["step"], m["loss"], m["grad_norm"]) for m in reference]
    assert read_scalars(str(tmp_path / "tensorboard"))["loss"] == [
        (m["step"], pytest.approx(m["loss"])) for m in logged]
    local_hf = str(tmp_path / "local_hf")
    _launch("launch.export", ["--workdir", local, "--out", local_hf], work, base)
    weights, reference_weights = (load_file(os.path.join(d, "model.safetensors"))
                                  for d in (hf, local_hf))
    assert weights.keys() == reference_weights.keys() and len(weights) > 10
    for name, value in reference_weights.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)
    with open(os.path.join(hf, "config.json"), "rb") as a, \
            open(os.path.join(local_hf, "config.json"), "rb") as b:
        assert a.read() == b.read()

    # nothing local, nothing elsewhere: every client reached this server, for calls it knows
    assert not [os.path.join(d, n) for d, dirs, files in os.walk(tmp_path) for n in dirs + files
                if n.startswith("gs:")]
    agents = {r.user_agent.split("/")[0] for r in requests}
    assert {"tensorstore", "python-gcsfs", "gcloud-python"} <= agents, agents
    assert any(r.method == "POST" and r.path.startswith("/upload/") and
               r.user_agent.startswith("tensorstore") for r in requests)
    assert [r for r in requests if r.status == 501] == []


_DIRECTORY_OPERATIONS = """
import json
from t5g2 import fs
from t5g2.train.checkpoint import interrupted_saves, move_aside
run = "gs://bucket/run"
directory = run + "/checkpoints"
out = dict(before=[fs.listdir(directory), interrupted_saves(directory)])
fs.makedirs(directory)
out["made"] = fs.listdir(directory)
for name, committed in (("1", True), ("2", True), ("3", False)):
    fs.write_text(f"{directory}/{name}/params/x", name)
    if committed:
        fs.write_text(f"{directory}/{name}/commit_success.txt", "done")
out["interrupted"] = interrupted_saves(directory)
out["moved"] = [move_aside(f"{directory}/2", ".corrupt")]
fs.write_text(f"{directory}/2/params/x", "2 again")
fs.write_text(f"{directory}/2/commit_success.txt", "done")
out["moved"] += [move_aside(f"{directory}/2", ".corrupt"),
                 move_aside(f"{directory}/1", ".superseded")]
for path in interrupted_saves(directory):
    fs.rmtree(path)
out["listed"] = sorted(fs.listdir(directory))
fs.write_atomically(run + "/a.json", b"{}")
for lines in ((b"1\\n", b"2\\n"), (b"3\\n",)):
    with fs.open_appending(run + "/m.jsonl") as f:
        for line in lines:
            f.write(line)
            f.flush()
out["appended"] = fs.read_text(run + "/m.jsonl")
fs.write_text(run + "/m.tmp", "0\\n")
fs.replace(run + "/m.tmp", run + "/m.jsonl")
print(json.dumps(out))
"""


def test_checkpoint_directory_operations_on_the_gcs_server(tmp_path):
    """What `t5g2.fs` and the checkpoint directory do through the real gs:// client (gcsfs): a
    made, empty directory lists empty, an uncommitted step is an interrupted save and is
    removed, step directories are moved aside object by object (a taken name kept), files are
    written atomically, appended to and replaced."""
    (tmp_path / "gcloud").mkdir()
    with FakeGcs() as gcs:
        proc = subprocess.run([sys.executable, "-c", _DIRECTORY_OPERATIONS], cwd=tmp_path,
                              env=gcs.env(_env(1, PYTHONPATH=str(REPO)),
                                          str(tmp_path / "gcloud")),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        bucket = gcs.objects("bucket")
        requests = gcs.requests
    out = json.loads(proc.stdout.splitlines()[-1])
    directory = "gs://bucket/run/checkpoints"
    assert out["before"] == [[], []] and out["made"] == []
    assert out["interrupted"] == [f"{directory}/3"]
    assert out["moved"] == [f"{directory}/2.corrupt", f"{directory}/2.corrupt-2",
                            f"{directory}/1.superseded"]
    assert out["listed"] == ["1.superseded", "2.corrupt", "2.corrupt-2"]
    assert out["appended"] == "1\n2\n3\n"
    assert bucket == {
        "run/checkpoints/1.superseded/params/x": b"1",
        "run/checkpoints/1.superseded/commit_success.txt": b"done",
        "run/checkpoints/2.corrupt/params/x": b"2",
        "run/checkpoints/2.corrupt/commit_success.txt": b"done",
        "run/checkpoints/2.corrupt-2/params/x": b"2 again",
        "run/checkpoints/2.corrupt-2/commit_success.txt": b"done",
        "run/a.json": b"{}", "run/m.jsonl": b"0\n"}, sorted(bucket)
    assert not os.path.exists(tmp_path / "gs:")
    assert [r for r in requests if r.status == 501] == []


def test_the_fake_gcs_server_answers_as_cloud_storage():
    """The server the tests above rely on, by plain HTTP: conditional inserts (412 when the
    generation does not match), conditional reads (304), byte ranges (206), listing by
    delimiter with pages; an unknown call is a 501 it records."""
    import urllib.error
    import urllib.request

    def call(method, path, data=None, headers=None):
        request = urllib.request.Request(gcs.url + path, data=data, method=method,
                                         headers=headers or {})
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def insert(name, data, if_generation_match):
        return call("POST", "/upload/storage/v1/b/bucket/o?uploadType=media&name="
                    f"{name}&ifGenerationMatch={if_generation_match}", data)

    with FakeGcs() as gcs:
        status, _, body = insert("a%2Fb.txt", b"0123456789", 0)
        assert status == 200
        generation = json.loads(body)["generation"]
        assert insert("a%2Fb.txt", b"again", 0)[0] == 412
        assert insert("a%2Fb.txt", b"again", int(generation) + 1)[0] == 412
        media = "/storage/v1/b/bucket/o/a%2Fb.txt?alt=media"
        assert call("GET", f"{media}&ifGenerationNotMatch={generation}")[0] == 304
        status, headers, body = call("GET", media, headers={"Range": "bytes=2-4"})
        assert (status, body, headers["x-goog-generation"]) == (206, b"234", generation)
        assert headers["Content-Range"] == "bytes 2-4/10"
        assert insert("a%2Fc%2Fd", b"x", 0)[0] == insert("z", b"x", 0)[0] == 200
        _, _, body = call("GET", "/storage/v1/b/bucket/o?prefix=a%2F&delimiter=%2F&maxResults=1")
        page = json.loads(body)
        assert [i["name"] for i in page["items"]] == ["a/b.txt"] and page["prefixes"] == []
        _, _, body = call("GET", "/storage/v1/b/bucket/o?prefix=a%2F&delimiter=%2F&pageToken="
                          + page["nextPageToken"])
        assert json.loads(body)["prefixes"] == ["a/c/"] and "nextPageToken" not in \
            json.loads(body)
        assert call("DELETE", f"/storage/v1/b/bucket/o/z?ifGenerationMatch={generation}")[0] \
            == 412
        assert call("DELETE", "/storage/v1/b/bucket/o/z")[0] == 204
        assert call("PATCH", "/storage/v1/b/bucket/o/a%2Fb.txt", b"{}")[0] == 501
        assert sorted(gcs.objects("bucket")) == ["a/b.txt", "a/c/d"]
        assert gcs.requests[-1][:2] == ("PATCH", "/storage/v1/b/bucket/o/a%2Fb.txt")
