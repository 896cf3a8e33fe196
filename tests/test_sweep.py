"""Sweeps (t5g2/sweep/, launch/sweep.py): the spec's names and validation, the local runner's
skip / resume / signal / failure bookkeeping (against a stand-in trainer: fast), the results
files, and end-to-end sweeps of real `launch.train` members."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from configs import tiny
from t5g2.configlib import ConfigError
from t5g2.sweep import results, runner, spec
from tests.test_multihost import _env

REPO = Path(__file__).resolve().parents[1]


# --- spec ------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, name", [
    ((), "baseline"),
    ((("model.tie_embeddings", False),), "tie_embeddings-false"),
    ((("model.tie_embeddings", False), ("model.cross_attention", "separate")),
     "tie_embeddings-false__cross_attention-separate"),
    ((("train.learning_rate", 0.001), ("train.steps", 20)), "learning_rate-0.001__steps-20"),
    ((("data.seqio.modules", ("a", "b")),), "modules-a_b"),
    ((("model.encoder.num_layers", 2), ("model.decoder.num_layers", 4)),
     "model.encoder.num_layers-2__model.decoder.num_layers-4"),
])
def test_member_names_are_derived_from_the_overrides(overrides, name):
    assert spec.member_name(overrides) == name
    assert spec.member_name(tuple(overrides)) == name  # stable: a function of the overrides


def test_names_that_had_to_be_altered_stay_distinct_and_safe():
    names = [spec.member_name((("name", value),)) for value in ("a/b", "a_b", "A b", "a b")]
    assert names[1] == "name-a_b"
    assert len(set(names)) == 4
    long = spec.member_name((("name", "x" * 300),))
    assert len(long) <= spec.MAX_NAME_LENGTH
    for n in names + [long]:
        assert all(c.isalnum() or c in "._-" for c in n), n


def test_a_grid_is_the_product_in_order_and_the_ablations_sweep_loads():
    s = spec.sweep("g", "configs/tiny.py", grid={"model.tie_embeddings": [True, False],
                                                 "model.cross_attention": ["merged", "separate"]})
    assert [m.overrides for m in s.members] == [
        (("model.tie_embeddings", t), ("model.cross_attention", c))
        for t in (True, False) for c in ("merged", "separate")]
    assert s.baseline == "tie_embeddings-true__cross_attention-merged"
    ablations = spec.load_sweep(str(REPO / "configs/sweeps/ablations.py"))
    assert [m.name for m in ablations.members] == [
        "baseline", "tie_embeddings-false", "cross_attention-separate",
        "cross_attention-global_only"]
    assert ablations.baseline == "baseline"
    member = ablations.member("tie_embeddings-false")
    assert member.flags() == ["--config.model.tie_embeddings=False"]
    assert ablations.flags(member)[-1] == "--config.model.tie_embeddings=False"
    assert spec.member_workdir("/w", member) == "/w/tie_embeddings-false"


@pytest.mark.parametrize("field, value", [
    ("model.tie_embeddings", False),                  # bool
    ("train.steps", 7),                               # int
    ("train.learning_rate", 2.5e-4),                  # float
    ("model.cross_attention", "global_only"),         # str
    ("name", "a run, with 'quotes' and spaces"),      # str that is not a Python literal
    ("data.seqio.modules", ("my.tasks", "more.tasks")),  # tuple
])
def test_override_values_come_back_from_the_command_line(field, value):
    s = spec.sweep("rt", "configs/tiny.py", members=[{field: value}])
    config = spec.validate(s)[s.members[0].name]  # parsed by ml_collections' flags
    parsed = config
    for part in field.split("."):
        parsed = parsed[part]
    assert parsed == value and type(parsed) is type(value)


def test_a_member_override_wins_over_a_common_one():
    s = spec.sweep("w", "configs/tiny.py", members=[{}, {"train.steps": 6}],
                   common={"train.steps": 4, "model.tie_embeddings": False})
    configs = spec.validate(s)
    assert configs["baseline"].train.steps == 4 and configs["steps-6"].train.steps == 6
    assert not configs["steps-6"].model.tie_embeddings


@pytest.mark.parametrize("kwargs, message", [
    (dict(members=[{"model.tie_embedding": False}]),
     "model.tie_embedding=False: config.model has no field 'tie_embedding'; valid: "),
    (dict(members=[{"train.steps": 4.5}]), "--config.train.steps=4.5"),
    (dict(members=[{"train.steps": "four"}]), "--config.train.steps=four"),
    (dict(members=[{"model.tie_embeddings": 0}]), "model.tie_embeddings=0 comes back"),
    (dict(members=[{"model.cross_attention": "diagonal"}]), "'diagonal'"),
    (dict(members=[{}], common={"train.stepz": 3}), "config.train has no field 'stepz'"),
    (dict(members=[{"model.tie_embeddings": False}, {"model.tie_embeddings": False}]),
     "two members are named 'tie_embeddings-false'"),
    (dict(grid={}), "grid={} is empty"),
    (dict(grid={"model.tie_embeddings": []}), "grid['model.tie_embeddings']=[] must be"),
    (dict(members=[]), "members=[] is empty"),
    (dict(members=[{}], baseline="untied"), "baseline='untied' is not a member"),
    (dict(members=[{"train.steps": None}]), "override value None"),
])
def test_a_bad_sweep_is_one_clear_error_before_anything_runs(kwargs, message):
    with pytest.raises(ConfigError) as e:
        spec.validate(spec.sweep("bad", "configs/tiny.py", **kwargs))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_load_sweep_rejects_a_file_without_get_sweep(tmp_path):
    path = tmp_path / "s.py"
    path.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no get_sweep"):
        spec.load_sweep(str(path))


# --- local runner, against a stand-in trainer ----------------------------------------------

# Behaves like launch.train as the runner sees it: appends one metrics line per step, keeps a
# "checkpoint" (the last step) after every step and resumes from it, saves and exits 143 on
# SIGTERM; fails (exit 3) for the member with untied embeddings when FAKE_FAIL is set.
FAKE_TRAIN = textwrap.dedent("""
    import json, os, signal, sys, time
    args = sys.argv[1:]
    workdir = args[args.index("--workdir") + 1]
    steps = int([a for a in args if a.startswith("--config.train.steps=")][-1].split("=")[1])
    if os.environ.get("FAKE_FAIL") and "--config.model.tie_embeddings=False" in args:
        sys.exit(3)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    os.makedirs(workdir, exist_ok=True)
    ckpt = os.path.join(workdir, "ckpt")
    start = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
    with open(os.path.join(workdir, "starts"), "a") as f:
        f.write(f"{start}\\n")
    for step in range(start + 1, steps + 1):
        time.sleep(float(os.environ.get("FAKE_STEP_S", "0")))
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "loss": 10.0 / step, "eval/loss": 20.0 / step,
                                "tokens_per_s": 100.0 * step, "mfu": 0.01 * step}) + "\\n")
        open(ckpt, "w").write(str(step))
        print("step", step, flush=True)
        if stop:
            sys.exit(143)
""")

STEPS = 4
FAKE_SWEEP = dict(members=[{}, {"model.tie_embeddings": False},
                           {"model.cross_attention": "separate"}],
                  common={"train.steps": STEPS})


@pytest.fixture
def fake_train(tmp_path):
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_TRAIN)
    return [sys.executable, str(path)]


def _local(sweep, workdir, fake_train):
    return runner.LocalRunner(sweep, str(workdir), {m.name: STEPS for m in sweep.members},
                              train_command=fake_train, echo=False)


def _starts(workdir, member):
    return (workdir / member / "starts").read_text().split()


def test_finished_members_are_skipped_and_failed_ones_rerun(tmp_path, fake_train, monkeypatch):
    s = spec.sweep("fake", "configs/tiny.py", **FAKE_SWEEP)
    work = tmp_path / "sweep"
    monkeypatch.setenv("FAKE_FAIL", "1")
    assert _local(s, work, fake_train).run(s.members) == 1  # one member failed ...
    statuses = {m.name: runner.member_status(s, str(work), m) for m in s.members}
    assert statuses == {"baseline": "finished", "tie_embeddings-false": "failed",
                        "cross_attention-separate": "finished"}  # ... and the next one ran
    recorded = runner.read_status(str(work / "baseline"))
    assert recorded["flags"] == ["--config.train.steps=4"] and recorded["returncode"] == 0
    before = (work / "baseline" / "metrics.jsonl").read_bytes()

    monkeypatch.delenv("FAKE_FAIL")
    assert _local(s, work, fake_train).run(s.members) == 0
    assert _starts(work, "baseline") == ["0"]  # not started again
    assert _starts(work, "cross_attention-separate") == ["0"]
    assert (work / "baseline" / "metrics.jsonl").read_bytes() == before
    assert _starts(work, "tie_embeddings-false") == ["0"]  # it failed before training: anew
    assert runner.read_status(str(work / "tie_embeddings-false"))["attempts"] == 2


def test_a_member_that_exits_0_before_its_final_step_is_not_finished(tmp_path, fake_train):
    s = spec.sweep("fake", "configs/tiny.py", members=[{}], common={"train.steps": STEPS})
    local = runner.LocalRunner(s, str(tmp_path), {"baseline": STEPS + 1},
                               train_command=fake_train, echo=False)
    assert local.run(s.members) == 1
    assert runner.read_status(str(tmp_path / "baseline"))["status"] == "failed"


def test_only_runs_a_subset_and_a_changed_member_is_refused(tmp_path, fake_train):
    s = spec.sweep("fake", "configs/tiny.py", **FAKE_SWEEP)
    only = runner.select(s, ["cross_attention-separate"])
    assert [m.name for m in only] == ["cross_attention-separate"]
    with pytest.raises(ConfigError, match="no member 'untied'"):
        runner.select(s, ["untied"])
    work = tmp_path / "sweep"
    assert _local(s, work, fake_train).run(only) == 0
    assert sorted(p.name for p in work.iterdir()) == ["cross_attention-separate"]
    listing = runner.describe(s, str(work), s.members)
    assert "finished    cross_attention-separate" in listing
    assert "pending     tie_embeddings-false" in listing

    longer = spec.sweep("fake", "configs/tiny.py", members=FAKE_SWEEP["members"],
                        common={"train.steps": STEPS + 2})
    with pytest.raises(ConfigError, match="ran with flags .*--config.train.steps=4.*remove"):
        _local(longer, work, fake_train).run(longer.members)


SWEEP_SCRIPT = textwrap.dedent("""
    import sys
    from t5g2.sweep import runner, spec
    s = spec.sweep("fake", "configs/tiny.py", members=[{}, {"model.tie_embeddings": False}],
                   common={"train.steps": 6})
    local = runner.LocalRunner(s, sys.argv[1], {m.name: 6 for m in s.members},
                               train_command=[sys.executable, sys.argv[2]])
    sys.exit(local.run(s.members))
""")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_an_interrupted_sweep_resumes_the_member_it_was_running(tmp_path, fake_train, how):
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP_SCRIPT)
    work = tmp_path / "sweep"
    argv = [sys.executable, str(script), str(work), fake_train[1]]
    env = dict(os.environ, FAKE_STEP_S="0.3", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(argv, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = work / "tie_embeddings-false" / "metrics.jsonl"
    deadline = time.time() + 60
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.05)
    if how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)  # the sweep forwards it to its member
        assert proc.wait(timeout=30) == 143
        assert runner.read_status(str(work / "tie_embeddings-false"))["returncode"] == 143
    else:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its member, as a preemption
        proc.wait(timeout=30)
    s = spec.sweep("fake", "configs/tiny.py", members=[{}, {"model.tie_embeddings": False}],
                   common={"train.steps": 6})
    assert runner.member_status(s, str(work), s.members[1]) == "interrupted"
    baseline = (work / "baseline" / "metrics.jsonl").read_bytes()

    assert subprocess.run(argv, cwd=REPO, env=env, capture_output=True).returncode == 0
    assert _starts(work, "baseline") == ["0"]
    assert (work / "baseline" / "metrics.jsonl").read_bytes() == baseline
    starts = _starts(work, "tie_embeddings-false")
    assert len(starts) == 2 and int(starts[1]) >= 2  # resumed from its checkpoint
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert runner.member_status(s, str(work), s.members[1]) == "finished"


# --- results -------------------------------------------------------------------------------

def _write_metrics(workdir, lines):
    workdir.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def test_results_name_the_deltas_against_the_baseline_and_plot_every_member(tmp_path):
    s = spec.sweep("r", "configs/tiny.py", members=[{}, {"model.tie_embeddings": False}])
    base, untied = (tmp_path / m.name for m in s.members)
    _write_metrics(base, [
        {"step": 1, "loss": 6.0, "tokens_per_s": 100.0, "mfu": 0.1},
        {"step": 2, "loss": 5.0, "tokens_per_s": 300.0, "mfu": 0.3,
         "eval/R1/loss": 5.5, "eval/S/loss": 5.25, "eval/loss": 5.4},
        {"step": 3, "loss": 4.0, "tokens_per_s": 200.0, "mfu": 0.2},
        {"step": 4, "loss": 3.5, "tokens_per_s": 250.0, "mfu": 0.25,
         "eval/R1/loss": 5.0, "eval/S/loss": 5.5, "eval/loss": 5.2}])
    _write_metrics(untied, [
        {"step": 2, "loss": 5.5, "tokens_per_s": 90.0, "mfu": 0.05,
         "eval/R1/loss": 6.0, "eval/S/loss": 6.0, "eval/loss": 6.0},
        {"step": 4, "loss": 4.5, "tokens_per_s": 110.0, "mfu": 0.07,
         "eval/R1/loss": 5.25, "eval/S/loss": 5.75, "eval/loss": 5.5},
        '{"step": 5, "loss": 4.'])  # a line cut short by a kill
    runner.write_status(str(base), status="finished", wall_time_s=10.0)
    runner.write_status(str(untied), status="running", wall_time_s=4.0)
    paths = results.write(s, str(tmp_path), {"baseline": 1000, "tie_embeddings-false": 1500})
    assert [os.path.basename(p) for p in paths] == list(results.FILES)

    records = json.loads((tmp_path / "results.json").read_text())["members"]
    assert records[0] == {
        "name": "baseline", "status": "finished", "overrides": "", "params": 1000,
        "last_step": 4, "wall_time_s": 10.0, "train_loss": 3.5,
        "final eval/R1/loss": 5.0, "best eval/R1/loss": 5.0,
        "final eval/S/loss": 5.5, "best eval/S/loss": 5.25,
        "final eval/loss": 5.2, "best eval/loss": 5.2,
        "median tokens_per_s": 225.0, "median mfu": 0.225}
    assert records[1]["status"] == "interrupted" and records[1]["last_step"] == 4
    assert records[1]["final eval/loss"] == 5.5 and records[1]["median tokens_per_s"] == 100.0

    table = (tmp_path / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| tie_embeddings-false"))
    assert "1,500 (+500)" in row
    assert "5.5000 (+0.3000)" in row  # final eval/loss against the baseline's 5.2
    assert "5.2500 (+0.2500)" in row  # final eval/R1/loss against 5.0
    assert "**baseline** (baseline)" in table
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("name,status,overrides,params") and len(csv_lines) == 3
    for name in ("heldout_loss.png", "loss_vs_params.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_member_run_by_a_cluster_job_counts_as_finished_once_it_logged_its_last_step(
        tmp_path):
    s = spec.sweep("c", "configs/tiny.py", members=[{}])
    _write_metrics(tmp_path / "baseline", [{"step": 2, "loss": 3.0}, {"step": 4, "loss": 2.0}])
    assert results.collect(s, str(tmp_path), {"baseline": 1}, {"baseline": 4})[0]["status"] \
        == "finished"  # no sweep_status.json: its metrics say where it is
    assert results.collect(s, str(tmp_path), {"baseline": 1}, {"baseline": 6})[0]["status"] \
        == "started"


# --- end to end, real members ----------------------------------------------------------------

def _tiny_sweep_file(tmp_path, cache_dir, members, steps):
    """A sweep of 2-layer tiny members, lengths 32, held-out loss every 2 steps."""
    common = {"model.encoder.num_layers": 2, "model.decoder.num_layers": 2,
              "train.encoder_length": 32, "train.decoder_length": 32, "train.batch_size": 4,
              "train.steps": steps, "train.log_every": 1, "train.warmup_steps": 2,
              "checkpoint.every": 2, "checkpoint.async_save": False, "eval.every": 2,
              "eval.batches": 1, "eval.samples": 0, "data.ul2.cache_dir": cache_dir,
              "peak_flops_per_device": 1e9}
    path = tmp_path / "tiny_sweep.py"
    path.write_text("from t5g2.sweep.spec import sweep\n\n\ndef get_sweep():\n"
                    f"    return sweep('tiny', 'configs/tiny.py', members={members!r}, "
                    f"common={common!r})\n")
    return path


def _sweep(path, workdir, *extra, **popen):
    argv = [sys.executable, "-m", "launch.sweep", "--sweep", str(path), "--workdir",
            str(workdir), *extra]
    return subprocess.Popen(argv, cwd=REPO, env=_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def _count(**model_overrides):
    """count_params of the tiny config at the sweep's 2 layers, built here independently."""
    from t5g2.model import ModelConfig
    from t5g2.model.params import count_params

    config = tiny.get_config()
    config.model.encoder.num_layers = config.model.decoder.num_layers = 2
    config.model.update(model_overrides)
    return count_params(ModelConfig.from_config_dict(config.model))


def _check_results(work, members, steps):
    """results.json's parameter counts against count_params built here, every member finished
    with held-out losses per denoiser, the other results files and each member's TensorBoard
    run under the sweep (`tensorboard --logdir <sweep>` names the runs by member)."""
    for name in results.FILES:
        assert (work / name).stat().st_size > 0, name
    records = {r["name"]: r for r in json.loads((work / "results.json").read_text())["members"]}
    assert {name: r["params"] for name, r in records.items()} == {
        spec.member_name(tuple(overrides.items())): _count(**{
            k.split(".")[-1]: v for k, v in overrides.items()})
        for overrides in members}
    for r in records.values():
        assert r["status"] == "finished" and r["last_step"] == steps
        for denoiser in ("R1", "X1", "X2", "X3", "S"):
            assert r[f"final eval/{denoiser}/loss"] > 0
    for member in records:
        assert list((work / member / "tensorboard").glob("events.out.tfevents.*"))
    return records


@pytest.mark.slow  # the runner (fake members) and the results/plots tests run by default
def test_a_local_sweep_of_a_real_member_writes_results_and_plots(tmp_path, cache_dir):
    members = [{"model.tie_embeddings": False}]
    path = _tiny_sweep_file(tmp_path, cache_dir, members, 2)
    work = tmp_path / "sweep"
    dry = _sweep(path, work, "--dry_run").communicate(timeout=120)[0]
    assert "pending     tie_embeddings-false" in dry and not work.exists()
    proc = _sweep(path, work)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    records = _check_results(work, members, 2)
    assert records["tie_embeddings-false"]["params"] > _count()  # untied: one more table


@pytest.mark.slow
def test_a_killed_sweep_resumes_its_member_exactly_and_skips_the_finished(tmp_path, cache_dir):
    steps = 6
    members = [{}, {"model.tie_embeddings": False}]
    path = _tiny_sweep_file(tmp_path, cache_dir, members, steps)
    work = tmp_path / "sweep"
    proc = _sweep(path, work, start_new_session=True)
    metrics = work / "tie_embeddings-false" / "metrics.jsonl"
    deadline = time.time() + 600
    # killed once the member has saved step 2 or 4 and logged a step past it
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    finished = (work / "baseline" / "metrics.jsonl").read_bytes()
    proc = _sweep(path, work)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "baseline: finished earlier, skipped" in out
    assert (work / "baseline" / "metrics.jsonl").read_bytes() == finished
    assert runner.read_status(str(work / "tie_embeddings-false"))["attempts"] == 2
    records = _check_results(work, members, steps)
    assert "(+" in (work / "results.md").read_text()  # the untied member's deltas
    assert records["tie_embeddings-false"]["params"] > records["baseline"]["params"]

    # the same member, uninterrupted, straight through launch.train
    s = spec.load_sweep(str(path))
    reference = tmp_path / "reference"
    argv = [sys.executable, "-m", "launch.train", "--config", "configs/tiny.py", "--workdir",
            str(reference), *s.flags(s.member("tie_embeddings-false"))]
    done = subprocess.run(argv, cwd=REPO, env=_env(1), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    def losses(p):
        lines = [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in x.items() if "loss" in k} for x in lines]

    assert losses(work / "tie_embeddings-false") == losses(reference)
