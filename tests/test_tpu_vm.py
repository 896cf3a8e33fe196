"""launch/tpu_vm.sh: with DRY_RUN=1 it prints every gcloud command, one per line, and runs nothing
(a `gcloud` that fails is first on PATH). The tests read the printed argv back through bash and run
the remote command strings locally through `bash -c`, as sshd runs them on a worker, in a fake
worker home with a fake `.venv/bin/python` that records its argv and environment, traps SIGTERM
and exits 143 the way launch.train does after its checkpoint."""

import os
import pathlib
import subprocess
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "tpu_vm.sh"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
# Values a shell would mangle if the script quoted them wrong.
AWKWARD = {"XLA_FLAGS": """--xla_a="b c" --xla_d='e f' $HOME `x` \\ end""",
           "LIBTPU_INIT_ARGS": "--flag=it's   three  spaces;&|*"}

FAKE_PYTHON = """#!/bin/bash
out="$HOME/fake"; mkdir -p "$out"
printf '%s\\0' "$@" > "$out/argv"
for v in XLA_FLAGS LIBTPU_INIT_ARGS T5G2_CLUSTER; do printf '%s' "${!v-UNSET}" > "$out/$v"; done
if [ -n "${FAKE_IGNORE_TERM:-}" ]; then trap '' TERM
else trap 'echo saved > "$out/got_term"; echo "saved a checkpoint"; exit 143' TERM; fi
echo $$ > "$out/pid"
echo "fake train running"
while :; do sleep 0.05; done
"""

FAKE_PYTHON3 = """#!/bin/bash
echo "python3 $*" >> "$HOME/calls"
case "$*" in
  "-m uv --version") [ -f "$HOME/uv" ]; exit ;;
  "-m pip install -q --user uv"*) touch "$HOME/uv" ;;
  "-m uv venv"*) mkdir -p .venv/bin && printf '#!/bin/sh\\nexit 0\\n' > .venv/bin/python
                 chmod +x .venv/bin/python ;;
esac
exit 0
"""


def _write_exe(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def _argv(line: str) -> list[str]:
    """The argv bash reads from one printed line (the script prints it with printf %q)."""
    out = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line],
                         capture_output=True, check=True).stdout
    return out.decode().split("\0")[:-1]


# The script's settings: none may leak into a test from the environment that runs it.
SETTINGS = """TPU_NAME QUEUED_RESOURCE ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION NODE_COUNT
PROVISIONING AUTOCHECKPOINT SERVICE_ACCOUNT SCOPES VALID_UNTIL WAIT POLL_S SETUP DETACH STAGE
PASS_ENV LOG_URL REMOTE_DIR REPO_URL GIT_REF PYTHON_VERSION UV PYTHON JAX_TPU EXTRA_PACKAGES
STOP_TIMEOUT LOG_LINES DRY_RUN ALLOW_LOCAL_WORKDIR LIBTPU_INIT_ARGS XLA_FLAGS TPU_STDERR_LOG_LEVEL
TPU_MIN_LOG_LEVEL TF_CPP_MIN_LOG_LEVEL JAX_COMPILATION_CACHE_DIR""".split()


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in SETTINGS}


def _dry(tmp_path, *args, ok=True, **env):
    """The script run with DRY_RUN=1 and a failing gcloud first on PATH: (result, printed argvs)."""
    fakebin = tmp_path / "local_bin"
    _write_exe(fakebin / "gcloud", f'#!/bin/sh\ntouch "{tmp_path}/gcloud_called"\nexit 97\n')
    base = _clean_env()
    base.update(PATH=f"{fakebin}:{os.environ['PATH']}", DRY_RUN="1")
    base.update({k: str(v) for k, v in env.items()})
    result = subprocess.run(["bash", str(SCRIPT), *args], env=base, capture_output=True, text=True,
                            timeout=60)
    assert not (tmp_path / "gcloud_called").exists(), "DRY_RUN=1 called gcloud"
    if ok:
        assert result.returncode == 0, result.stderr
    return result, [_argv(line) for line in result.stdout.splitlines()]


def _command(argv: list[str]) -> str:
    [command] = [a[len("--command="):] for a in argv if a.startswith("--command=")]
    return command


def _worker(tmp_path) -> pathlib.Path:
    """A worker's home: ~/t5g2 with the fake Python in its venv."""
    home = tmp_path / "worker"
    _write_exe(home / "t5g2" / ".venv" / "bin" / "python", FAKE_PYTHON)
    return home


def _on_worker(home, command, **kw):
    """The command as sshd runs it on the worker: `bash -c` in the user's home, a clean env."""
    env = {"HOME": str(home), "PATH": f"{home}/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    return subprocess.run(["bash", "-c", command], cwd=home, env=env, capture_output=True,
                          text=True, timeout=kw.pop("timeout", 30), **kw)


def _wait_for(path: pathlib.Path, timeout=10.0) -> str:
    end = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text()


HOST = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
TRAIN = ["--config", "configs/t5g2_270m.py", "--workdir", "gs://b/runs/a", "--config.name=a b"]
SLICE = dict(QUEUED_RESOURCE="qr", ZONE="us-east5-a")


def test_detached_run_records_pythons_own_pid_and_stop_waits_for_its_checkpoint(tmp_path):
    _, [start] = _dry(tmp_path, *TRAIN, SETUP=0, DETACH=1, **SLICE, **AWKWARD)
    assert start[:9] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "qr",
                         "--node=all", "--worker=all", "--zone=us-east5-a"]
    home = _worker(tmp_path)
    started = _on_worker(home, _command(start))
    assert started.returncode == 0, started.stderr
    fake = home / "fake"
    python_pid = int(_wait_for(fake / "pid"))
    # The recorded pid is the one of the process that runs Python (the subshell exec'd into it).
    assert int((home / "t5g2" / ".run" / "pid").read_text()) == python_pid
    assert f"{HOST}: started pid {python_pid}" in started.stdout
    assert (fake / "argv").read_bytes().decode().split("\0")[:-1] == ["-m", "launch.train", *TRAIN]
    for name, value in AWKWARD.items():
        assert (fake / name).read_text() == value
    assert (fake / "T5G2_CLUSTER").read_text() == "tpu"
    log = home / "t5g2" / "logs" / f"train-{HOST}.log"
    _wait_for(log)

    # A second start while it runs is refused on that worker.
    again = _on_worker(home, _command(start))
    assert again.returncode == 1 and "still going" in again.stderr
    _, [_, status] = _dry(tmp_path, "status", **SLICE)
    assert _on_worker(home, _command(status)).stdout == f"{HOST}: running, pid {python_pid}\n"

    _, [stop] = _dry(tmp_path, "stop", STOP_TIMEOUT=20, **SLICE)
    stopped = _on_worker(home, _command(stop))
    assert stopped.returncode == 0, stopped.stderr
    assert (fake / "got_term").read_text() == "saved\n"
    assert f"{HOST}: sent SIGTERM to pid {python_pid}" in stopped.stdout
    assert f"{HOST}: exited with status 143 (stopped after saving a checkpoint)" in stopped.stdout
    assert (home / "t5g2" / ".run" / "exit").read_text().strip() == "143"
    with pytest.raises(ProcessLookupError):
        os.kill(python_pid, 0)
    assert "saved a checkpoint" in log.read_text()
    assert _on_worker(home, _command(status)).stdout == f"{HOST}: exited with status 143\n"
    # Stopping again reports the recorded status and sends nothing.
    again = _on_worker(home, _command(stop))
    assert "sent SIGTERM" not in again.stdout and "exited with status 143" in again.stdout


def test_stop_gives_up_after_stop_timeout_and_says_so(tmp_path):
    _, [start] = _dry(tmp_path, *TRAIN, SETUP=0, DETACH=1, PASS_ENV="FAKE_IGNORE_TERM",
                      FAKE_IGNORE_TERM=1, **SLICE)
    home = _worker(tmp_path)
    assert _on_worker(home, _command(start)).returncode == 0
    pid = int(_wait_for(home / "fake" / "pid"))
    try:
        _, [stop] = _dry(tmp_path, "stop", STOP_TIMEOUT=1, **SLICE)
        stopped = _on_worker(home, _command(stop))
        assert stopped.returncode == 1
        assert f"pid {pid} still running after 1s" in stopped.stderr
    finally:
        os.kill(pid, 9)


def test_foreground_run_follows_named_logs_and_exits_with_pythons_status(tmp_path):
    result, [start, follow] = _dry(tmp_path, *TRAIN, SETUP=0, **SLICE)
    home = _worker(tmp_path)
    assert _on_worker(home, _command(start)).returncode == 0
    _wait_for(home / "fake" / "pid")
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    follower = subprocess.Popen(["bash", "-c", _command(follow)], cwd=home, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, [stop] = _dry(tmp_path, "stop", **SLICE)
        assert _on_worker(home, _command(stop)).returncode == 0
        out, _ = follower.communicate(timeout=20)
    finally:
        follower.kill()
    assert follower.returncode == 143
    assert f"{HOST}| fake train running" in out.splitlines()
    assert f"{HOST}| saved a checkpoint" in out.splitlines()
    assert "=== " not in out  # from this start on, not the header


def test_setup_builds_a_python_311_venv_with_uv_and_the_lock_file(tmp_path):
    _, argvs = _dry(tmp_path, *TRAIN, DETACH=1, TPU_NAME="tpu", ZONE="z")
    scp, unpack, setup, start = argvs
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert "--worker=all" in scp and scp[-1] == "tpu:t5g2.tar.gz"
    assert _command(unpack).endswith("tar -xzf ~/t5g2.tar.gz -C ~/t5g2 && rm ~/t5g2.tar.gz")
    # The setup command on a worker without uv or a venv: uv from PyPI, then Python 3.11 by uv.
    home = tmp_path / "fresh"
    _write_exe(home / "bin" / "python3", FAKE_PYTHON3)
    (home / "t5g2").mkdir()
    done = _on_worker(home, _command(setup))
    assert done.returncode == 0, done.stderr
    calls = (home / "calls").read_text().splitlines()
    assert calls == [
        "python3 -m uv --version",
        "python3 -m pip install -q --user uv==0.13.8",
        "python3 -m uv venv -q --python 3.11 --python-preference only-managed .venv",
        "python3 -m uv pip install -q --python .venv/bin/python -r requirements.txt jax[tpu] "
        "-c requirements-lock.txt"]
    # Again: uv and a venv >= 3.11 are there, so only the (no-op) install runs.
    (home / "calls").unlink()
    assert _on_worker(home, _command(setup)).returncode == 0
    assert (home / "calls").read_text().splitlines() == ["python3 -m uv --version", calls[-1]]
    # A site's own interpreter instead of uv.
    _, argvs = _dry(tmp_path, *TRAIN, DETACH=1, TPU_NAME="tpu", ZONE="z", PYTHON="python3.12")
    command = _command(argvs[2])
    assert "python3.12 -m venv .venv" in command and "-m uv" not in command


def test_stage_copies_buckets_directories_and_files_to_every_worker(tmp_path):
    (tmp_path / "data_dir").mkdir()
    stage = (f"gs://bkt/gemma-3-270m:gemma-3-270m {tmp_path}/tok.model:/mnt/tok.model "
             f"{tmp_path}/data_dir:data")
    result, _ = _dry(tmp_path, "stage", TPU_NAME="tpu", ZONE="z", STAGE=stage, ok=False)
    assert result.returncode == 2 and "neither a gs:// URL" in result.stderr  # no tok.model yet
    (tmp_path / "tok.model").write_text("x")
    _, argvs = _dry(tmp_path, "stage", TPU_NAME="tpu", ZONE="z", STAGE=stage)
    sync, file_scp, file_move, dir_scp, dir_unpack = argvs
    # gs:// is synced by each worker itself (its service account reads the bucket).
    home = tmp_path / "worker"
    _write_exe(home / "bin" / "gcloud", '#!/bin/sh\necho "$@" > "$HOME/gcloud_args"\n')
    assert _on_worker(home, _command(sync)).returncode == 0
    assert (home / "gcloud_args").read_text().split() == [
        "storage", "rsync", "--recursive", "gs://bkt/gemma-3-270m", "gemma-3-270m"]
    assert (home / "t5g2" / "gemma-3-270m").is_dir()
    assert file_scp[-2:] == [f"{tmp_path}/tok.model", "tpu:t5g2-stage.file"]
    assert "--worker=all" in file_scp
    assert _command(file_move).endswith("mv ~/t5g2-stage.file /mnt/tok.model")
    assert dir_scp[-1] == "tpu:t5g2-stage.tar" and "--worker=all" in dir_scp
    assert _command(dir_unpack).endswith("tar -xf ~/t5g2-stage.tar -C data && rm ~/t5g2-stage.tar")
    # A run with SETUP=1 stages after the environment is built.
    _, argvs = _dry(tmp_path, *TRAIN, DETACH=1, TPU_NAME="tpu", ZONE="z",
                    STAGE="gs://bkt/gemma-3-270m:gemma-3-270m")
    assert "gcloud storage rsync" in _command(argvs[3])


def test_create_requests_autocheckpoint_and_the_provisioning_model(tmp_path):
    _, argvs = _dry(tmp_path, "create", ACCELERATOR_TYPE="v5p-32", PROVISIONING="spot",
                    VALID_UNTIL="6h", **SLICE)
    assert argvs == [
        ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create", "qr",
         "--zone=us-east5-a", "--accelerator-type=v5p-32", "--autocheckpoint-enabled", "--spot",
         f"--scopes={SCOPE}", "--runtime-version=v2-alpha-tpuv5", "--node-id=qr",
         "--valid-until-duration=6h"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "qr", "--zone=us-east5-a",
         "--format=value(state.state)"]]
    _, [multi, _] = _dry(tmp_path, "create", ACCELERATOR_TYPE="v5p-32", NODE_COUNT=2,
                         PROVISIONING="reserved", SERVICE_ACCOUNT="sa@p.iam.gserviceaccount.com",
                         PROJECT="p", **SLICE)
    assert multi[-7:] == ["--reserved", "--service-account=sa@p.iam.gserviceaccount.com",
                          f"--scopes={SCOPE}", "--runtime-version=v2-alpha-tpuv5",
                          "--node-count=2", "--node-prefix=qr", "--project=p"]
    _, [vm] = _dry(tmp_path, "create", ACCELERATOR_TYPE="v5litepod-16", AUTOCHECKPOINT=0,
                   TPU_NAME="tpu", ZONE="z")
    assert vm == ["gcloud", "compute", "tpus", "tpu-vm", "create", "tpu", "--zone=z",
                  "--accelerator-type=v5litepod-16", f"--scopes={SCOPE}",
                  "--version=v2-alpha-tpuv5-lite"]


def test_resume_recreates_the_slice_and_runs_with_setup(tmp_path):
    _, argvs = _dry(tmp_path, "resume", *TRAIN, ACCELERATOR_TYPE="v5p-32", SETUP=0, DETACH=1,
                    **SLICE)
    assert argvs[0][4:6] == ["describe", "qr"]
    assert argvs[1] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "qr",
                        "--zone=us-east5-a", "--force", "--quiet"]
    assert argvs[2][:7] == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create",
                            "qr"]
    assert argvs[3][4] == "describe"  # waits for ACTIVE
    assert argvs[4][4] == "scp"  # SETUP=1 whatever was asked: the new workers have nothing
    assert "launch.train" in _command(argvs[-1])
    _, [delete] = _dry(tmp_path, "delete", TPU_NAME="tpu", ZONE="z")
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "tpu", "--zone=z", "--quiet"]


def test_logs_are_named_by_worker_and_copied_through_log_url(tmp_path):
    _, [tail] = _dry(tmp_path, "logs", LOG_LINES=2, **SLICE)
    home = _worker(tmp_path)
    (home / "t5g2" / "logs").mkdir(parents=True)
    (home / "t5g2" / "logs" / f"train-{HOST}.log").write_text("one\ntwo\nthree\n")
    shown = _on_worker(home, _command(tail))
    assert shown.stdout.splitlines() == [f"{HOST}| two", f"{HOST}| three"]
    result, _ = _dry(tmp_path, "logs", str(tmp_path / "logs"), **SLICE, ok=False)
    assert result.returncode == 2 and "LOG_URL" in result.stderr
    _, [upload, fetch] = _dry(tmp_path, "logs", str(tmp_path / "logs"), LOG_URL="gs://b/logs/",
                              **SLICE)
    _write_exe(home / "bin" / "gcloud", '#!/bin/sh\necho "$@" > "$HOME/gcloud_args"\n')
    assert _on_worker(home, _command(upload)).returncode == 0
    assert (home / "gcloud_args").read_text().split() == [
        "storage", "cp", f"logs/train-{HOST}.log", "gs://b/logs/"]
    assert fetch == ["gcloud", "storage", "rsync", "--recursive", "gs://b/logs",
                     str(tmp_path / "logs")]


@pytest.mark.parametrize("args, env, message", [
    (TRAIN, dict(QUEUED_RESOURCE="qr"), "set TPU_NAME (or QUEUED_RESOURCE) and ZONE"),
    (TRAIN, dict(SLICE, TPU_NAME="tpu"), "not both"),
    (["--config", "c.py"], SLICE, "pass --workdir"),
    (["--config", "c.py", "--workdir", "workdir/a"], SLICE, "--workdir workdir/a is relative"),
    (["--config", "c.py", "--workdir=runs/a"], SLICE, "--workdir runs/a is relative"),
    (["create"], SLICE, "set ACCELERATOR_TYPE"),
    (["create"], dict(SLICE, ACCELERATOR_TYPE="v5p-8", PROVISIONING="cheap"), "PROVISIONING=cheap"),
    (["stage"], dict(SLICE, STAGE="gs://bkt/x"), "must be SOURCE:DEST"),
    (["stop"], dict(SLICE, PASS_ENV="A-B"), "'A-B' is not a variable name"),
    (["stop"], dict(SLICE, STOP_TIMEOUT="1m"), "STOP_TIMEOUT=1m must be a whole number"),
    (["launch"], SLICE, "unknown mode 'launch'"),
])
def test_bad_input_is_one_error_line(tmp_path, args, env, message):
    result, argvs = _dry(tmp_path, *args, ok=False, **env)
    assert result.returncode == 2 and argvs == []
    assert result.stderr.startswith("error: ") and message in result.stderr


def test_local_workdirs_are_allowed_where_they_work(tmp_path):
    result, argvs = _dry(tmp_path, "--config", "c.py", "--workdir", "/mnt/shared/a", SETUP=0,
                         DETACH=1, **SLICE)
    assert "must be one file system mounted on every worker" in result.stderr and len(argvs) == 1
    _, argvs = _dry(tmp_path, "--config", "c.py", "--workdir", "w/a", SETUP=0, DETACH=1,
                    ALLOW_LOCAL_WORKDIR=1, TPU_NAME="v5p-8", ZONE="z")
    assert "--workdir w/a" in _command(argvs[0])


FAKE_CLOUD = """#!/bin/bash
printf '%s\\n' "$*" >> "$CALLS"
case "$*" in
  *" describe "*) cat "$STATE" ;;
  *" queued-resources create "*) echo ACTIVE > "$STATE" ;;
esac
"""


@pytest.mark.parametrize("state", ["ACTIVE", "SUSPENDED"])
def test_resume_restarts_on_a_live_slice_and_recreates_a_suspended_one(tmp_path, state):
    """Not a dry run: a fake gcloud answers `describe` with the queued resource's state."""
    fakebin = tmp_path / "bin"
    _write_exe(fakebin / "gcloud", FAKE_CLOUD)
    (tmp_path / "state").write_text(state + "\n")
    env = _clean_env()
    env.update(PATH=f"{fakebin}:{os.environ['PATH']}", CALLS=str(tmp_path / "calls"),
               STATE=str(tmp_path / "state"), ACCELERATOR_TYPE="v5p-32", DETACH="1", **SLICE)
    result = subprocess.run(["bash", str(SCRIPT), "resume", *TRAIN], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    verbs = [line.split("queued-resources ")[1].split()[0] for line in calls]
    if state == "ACTIVE":  # training again on the same workers, with what is already there
        assert verbs == ["describe", "ssh"]
        assert "starting training again" in result.stderr
    else:  # delete, create, wait for ACTIVE, copy the code, environment, start
        assert verbs == ["describe", "delete", "create", "describe", "scp", "ssh", "ssh", "ssh"]
        assert calls[2].startswith(
            "alpha compute tpus queued-resources create qr")


def test_a_pid_from_before_a_reboot_is_never_signalled(tmp_path):
    """After a VM restart (maintenance) the recorded pid may be another process's: the boot id
    recorded with it tells, so stop sends nothing and start is not refused."""
    home = _worker(tmp_path)
    other = subprocess.Popen(["sleep", "30"])
    try:
        run_dir = home / "t5g2" / ".run"
        run_dir.mkdir(parents=True)
        (run_dir / "pid").write_text(f"{other.pid}\n")
        (run_dir / "boot").write_text("an-earlier-boot\n")
        _, [stop] = _dry(tmp_path, "stop", **SLICE)
        stopped = _on_worker(home, _command(stop))
        assert f"{HOST}: not running and no exit status recorded" in stopped.stdout
        assert other.poll() is None
        _, [start] = _dry(tmp_path, *TRAIN, SETUP=0, DETACH=1, **SLICE)
        assert _on_worker(home, _command(start)).returncode == 0
        python_pid = int(_wait_for(home / "fake" / "pid"))
        assert int((run_dir / "pid").read_text()) == python_pid
        assert _on_worker(home, _command(stop)).returncode == 0
        assert other.poll() is None
    finally:
        other.kill()
