"""launch/slurm_gpu.sbatch: the commands it prints in DRY_RUN mode, and a Slurm job simulated on
localhost — stopped by SIGTERM to its training task (what `--signal=TERM@N` and GraceTime
preemption do), requeued with `scontrol requeue`, run again to resume from its checkpoint.

The simulation puts stand-ins for `srun` and `scontrol` first on PATH: `srun` drops its own
options and execs the command as task 0 of 1 (its output appended to the --output file), and
`scontrol` records its arguments. The batch script itself runs unchanged under bash, with the
SLURM_* variables an allocation would give it.
"""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.cli import USER_ERROR_EXIT_CODE
from t5g2.train.preemption import PREEMPTED_EXIT_CODE
from tests.test_multihost import REPO, TIMEOUT_S, TRAIN_FLAGS, _env, _metrics

SCRIPT = REPO / "launch" / "slurm_gpu.sbatch"
JOB_ID = "4242"

FAKE_SRUN = r"""#!/usr/bin/env bash
# srun on one node: drops srun's options, runs the command as task 0 of 1 of step 0.
set -eu
output=
while [ $# -gt 0 ] && [[ "$1" == -* ]]; do
  case "$1" in --output=*) output=${1#--output=} ;; esac
  shift
done
export SLURM_STEP_ID=0 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_STEP_NUM_TASKS=1 \
  SLURM_STEP_NUM_NODES=1 SLURM_STEP_NODELIST="$SLURM_JOB_NODELIST"
echo $$ > "$FAKE_SLURM_DIR/step.pid"  # the task: exec keeps the pid
if [ -n "$output" ]; then
  output=${output//'%t'/0}; output=${output//'%N'/$(hostname -s)}
  exec "$@" >>"$output" 2>&1
fi
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_SLURM_DIR/scontrol.calls"
"""


def _slurm_env(tmp_path: Path, **extra: str) -> dict:
    """The batch script's environment in a 1-node allocation, with the fake srun and scontrol."""
    fake = tmp_path / "fake_slurm"
    (fake / "bin").mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / "bin" / name).write_text(text)
        (fake / "bin" / name).chmod(0o755)
    env = _env(1, SLURM_JOB_ID=JOB_ID, SLURM_JOB_NAME="t5g2", SLURM_NNODES="1",
               SLURM_JOB_NUM_NODES="1", SLURM_NTASKS="1", SLURM_JOB_NODELIST="localhost",
               SLURM_CPUS_PER_TASK="2", SLURM_SUBMIT_DIR=str(REPO), T5G2_DIR=str(REPO),
               PYTHON=sys.executable, LOG_DIR=str(tmp_path / "logs"),
               FAKE_SLURM_DIR=str(fake), PATH=f"{fake / 'bin'}{os.pathsep}{os.environ['PATH']}")
    env.update(extra)
    return env


def _requeues(tmp_path: Path) -> list[str]:
    calls = tmp_path / "fake_slurm" / "scontrol.calls"
    return calls.read_text().splitlines() if calls.exists() else []


def _batch(args, env, cwd=REPO, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(SCRIPT), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)


def _finish(proc: subprocess.Popen, timeout: float = TIMEOUT_S) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"slurm_gpu.sbatch still running after {timeout}s:\n{out[-3000:]}")
    return proc.returncode, out


# ------------------------------------------------------------------------------ DRY_RUN

def _dry_run(args, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "T5G2_"))}
    base.update(DRY_RUN="1", **env)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=base,
                          capture_output=True, text=True, timeout=60)


_ALLOCATION = dict(SLURM_JOB_ID="1234", SLURM_JOB_NAME="adapt", SLURM_NNODES="2",
                   SLURM_CPUS_PER_TASK="48", SLURM_JOB_NODELIST="gpu[01-02]",
                   SLURM_SUBMIT_DIR=str(REPO), PYTHON="/shared/venv/bin/python",
                   LOG_DIR="/shared/logs")
_TRAIN = ["--config", "configs/t5g2_270m.py", "--workdir", "/shared/runs/a b"]


def _commands(stdout: str) -> dict[str, list[str]]:
    """The printed command lines, split as bash would, by program."""
    lines = [shlex.split(line) for line in stdout.splitlines()
             if line.startswith(("srun ", "scontrol "))]
    return {words[0]: words for words in lines}


def test_dry_run_prints_one_task_per_node_with_all_its_cpus_and_the_requeue():
    done = _dry_run(_TRAIN, **_ALLOCATION)
    assert done.returncode == 0, done.stderr
    commands = _commands(done.stdout)
    srun = commands["srun"]
    at = srun.index("/shared/venv/bin/python")
    # srun's options: one task on each of the 2 nodes, the job's CPUs per task passed on
    # explicitly (Slurm 22.05-23.02 would give 1), the step ended by any failed task, a log file
    # per task (rank %t, host %N) appended to by a requeued run
    assert sorted(srun[1:at]) == sorted([
        "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=48",
        "--kill-on-bad-exit=1", "--output=/shared/logs/adapt-1234/task%t-%N.out",
        "--open-mode=append"])
    # the arguments reach launch.train word for word (the space in the workdir too), with the
    # data axis over the 2 nodes added
    assert srun[at:] == ["/shared/venv/bin/python", "-m", "launch.train", *_TRAIN,
                         "--config.mesh.dcn_data=2"]
    assert commands["scontrol"] == ["scontrol", "requeue", "1234"]
    assert "after exit 143 with a new checkpoint" in done.stdout


def test_dry_run_keeps_a_given_dcn_data_and_falls_back_to_the_node_cpus():
    env = {k: v for k, v in _ALLOCATION.items() if k != "SLURM_CPUS_PER_TASK"}
    done = _dry_run([*_TRAIN, "--config.mesh.dcn_data=1", "--config.mesh.dcn_fsdp=2"],
                    SLURM_CPUS_ON_NODE="224", **env)
    assert done.returncode == 0, done.stderr
    srun = _commands(done.stdout)["srun"]
    assert "--cpus-per-task=224" in srun
    assert [a for a in srun if "dcn_" in a] == ["--config.mesh.dcn_data=1",
                                                "--config.mesh.dcn_fsdp=2"]


def test_the_batch_header_asks_for_whole_nodes_a_requeueable_job_and_the_signal_to_the_tasks():
    sbatch = [line.split(None, 1)[1] for line in SCRIPT.read_text().splitlines()
              if line.startswith("#SBATCH ")]
    for option in ("--exclusive", "--requeue", "--ntasks-per-node=1", "--gpus-per-node=8",
                   "--open-mode=append"):
        assert option in sbatch
    # SIGTERM to the job steps (the training tasks), not "B:" (the batch shell only), early
    # enough for two steps and a save
    (sig,) = [o for o in sbatch if o.startswith("--signal=")]
    kind, _, lead = sig.removeprefix("--signal=").partition("@")
    assert kind == "TERM" and int(lead) >= 120


@pytest.mark.parametrize("args, env, message", [
    ([], _ALLOCATION, "t5g2 training on Slurm GPU nodes"),  # the usage text
    (_TRAIN, {k: v for k, v in _ALLOCATION.items() if k != "SLURM_JOB_ID"}, "submit with sbatch"),
    (_TRAIN, {**_ALLOCATION, "T5G2_DIR": "/nonexistent"},
     "T5G2_DIR=/nonexistent is not the t5g2 repository"),
    (_TRAIN[:2], _ALLOCATION, "pass --workdir"),
    (_TRAIN, {k: v for k, v in _ALLOCATION.items() if k != "SLURM_CPUS_PER_TASK"},
     "sbatch --cpus-per-task"),
])
def test_dry_run_refuses_bad_input_with_status_2(args, env, message):
    done = _dry_run(args, **env)
    assert done.returncode == USER_ERROR_EXIT_CODE
    assert message in done.stderr
    assert "srun" not in done.stdout


# ------------------------------------------------------------------------------ requeue

STEPS = 60
SIMULATED = (*TRAIN_FLAGS, f"--config.train.steps={STEPS}", "--config.train.log_every=10",
             "--config.checkpoint.every=10")


def _saved_steps(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    names = os.listdir(directory) if directory.is_dir() else []
    return sorted(int(n) for n in names if n.isdigit())


def test_a_job_stopped_by_sigterm_is_requeued_and_resumes_from_its_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    args = [*SIMULATED, "--workdir", str(workdir)]
    env = _slurm_env(tmp_path)
    started = time.monotonic()

    first = _batch(args, env)
    deadline = time.monotonic() + TIMEOUT_S
    while not _saved_steps(workdir):  # a periodic checkpoint is committed
        assert first.poll() is None, first.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)
    # --signal=TERM@N: slurmstepd signals the step's tasks, not srun or the batch shell
    step = int((tmp_path / "fake_slurm" / "step.pid").read_text())
    os.kill(step, signal.SIGTERM)
    code, out = _finish(first)
    stopped = _saved_steps(workdir)[-1]
    (task_log,) = (tmp_path / "logs" / f"t5g2-{JOB_ID}").glob("task0-*.out")  # task 0's host
    log = task_log.read_text()
    assert code == PREEMPTED_EXIT_CODE, out + log[-3000:]
    assert f"stopped at step {stopped} on a termination request" in log
    assert 10 <= stopped < STEPS
    assert _requeues(tmp_path) == [f"requeue {JOB_ID}"]
    assert f"requeueing job {JOB_ID}" in out

    # the requeued job: the same script and arguments, the same job id
    code, out = _finish(_batch(args, {**env, "SLURM_RESTART_COUNT": "1"}))
    log = task_log.read_text()
    assert code == 0, out + log[-3000:]
    assert "run 2 (requeued 1 times)" in out
    assert f"starting at step {stopped} from checkpoint" in log  # appended to the same log
    assert f"stopped at step {STEPS}\n" in log
    assert _requeues(tmp_path) == [f"requeue {JOB_ID}"]  # finished: not requeued again
    logged = [m["step"] for m in _metrics(workdir)]  # one line per step, none run twice
    assert logged == sorted(set(logged)) and stopped in logged
    resumed = logged[logged.index(stopped) + 1:]  # its first step, then every 10th
    assert resumed[0] == stopped + 1 and resumed[-1] == STEPS
    assert set(range(stopped // 10 * 10 + 10, STEPS + 1, 10)) <= set(resumed)
    assert _saved_steps(workdir)[-1] == STEPS

    # a configuration error exits 2 and is not requeued
    code, out = _finish(_batch([*args, "--config.model.foo=1"], env))
    assert code == USER_ERROR_EXIT_CODE, out
    assert "has no field 'foo'" in task_log.read_text()
    assert _requeues(tmp_path) == [f"requeue {JOB_ID}"]
    print(f"simulated Slurm job: stop, requeue, resume, config error in "
          f"{time.monotonic() - started:.1f}s")


def _fake_python(tmp_path: Path, body: str) -> str:
    path = tmp_path / "python"
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_a_sigterm_stop_that_saved_nothing_new_is_not_requeued(tmp_path):
    """143 alone is not enough: with --kill-on-bad-exit a configuration error on one node ends
    its peers with SIGTERM, and srun reports that as 143."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "10").mkdir(parents=True)  # from an earlier run
    env = _slurm_env(tmp_path, PYTHON=_fake_python(tmp_path, f"exit {PREEMPTED_EXIT_CODE}"))
    code, out = _finish(_batch(["--config", "configs/tiny.py", "--workdir", str(workdir)], env))
    assert code == PREEMPTED_EXIT_CODE
    assert "stopped without a new checkpoint: not requeued" in out
    assert _requeues(tmp_path) == []


def test_a_gs_workdir_is_listed_through_the_filesystem_layer(tmp_path):
    """The new checkpoint of a gs:// workdir (a local fake bucket here) is found with t5g2.fs;
    the stand-in for launch.train saves step 30 into the bucket and exits 143."""
    bucket = tmp_path / "bucket"
    (bucket / "b" / "run" / "checkpoints" / "10").mkdir(parents=True)
    # run from the checkout (the batch script's cd), where `tests` is importable
    in_fake_bucket = ("import sys; from tests.fake_store import fake_gcs\n"
                      "with fake_gcs(sys.argv.pop(1)):\n"
                      "    exec(compile(sys.argv.pop(1), '<string>', 'exec'))")
    listing = f"{shlex.quote(sys.executable)} -c {shlex.quote(in_fake_bucket)} {bucket}"
    python = _fake_python(tmp_path, f"""
if [ "$1" = -c ]; then exec {listing} "$2" "${{@:3}}"; fi
mkdir {bucket}/b/run/checkpoints/30
exit {PREEMPTED_EXIT_CODE}""")
    env = _slurm_env(tmp_path, PYTHON=python)
    code, out = _finish(_batch(["--config", "configs/tiny.py", "--workdir", "gs://b/run"], env))
    assert code == PREEMPTED_EXIT_CODE, out
    assert "stopped after saving step 30" in out
    assert _requeues(tmp_path) == [f"requeue {JOB_ID}"]


def test_a_job_cancelled_or_out_of_time_is_not_requeued(tmp_path):
    """scancel, the time limit itself, the end of GraceTime: Slurm sends SIGTERM to every
    process of the job, the batch shell included, which ends without requeueing."""
    workdir = tmp_path / "run"
    env = _slurm_env(tmp_path, PYTHON=_fake_python(tmp_path, f"mkdir -p {workdir}/checkpoints/5"
                                                              "\nsleep 60"))
    batch = _batch(["--config", "configs/tiny.py", "--workdir", str(workdir)], env)
    while not (workdir / "checkpoints" / "5").is_dir():
        assert batch.poll() is None
        time.sleep(0.05)
    os.killpg(batch.pid, signal.SIGTERM)
    code, _ = _finish(batch, timeout=30)
    assert code == -signal.SIGTERM
    assert _requeues(tmp_path) == []
