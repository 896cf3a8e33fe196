"""t5g2/sweep/launchers.py: a sweep's members as one job each through the existing launchers, no
cluster needed. Slurm: each member's submit script is read back (its sbatch argv) and submitted to
a fake `sbatch` that records its argv and runs launch/slurm_gpu.sbatch itself in DRY_RUN mode, so
the srun command each member would run is checked too. GKE: each member's JobSet validates
strictly against the vendored JobSet schema (as in tests/test_gke.py) and its container runs
launch.train with the member's workdir and flags; `kubectl apply` is a fake that records its
argv. TPU VM: the printed commands are read back, and launch/tpu_vm.sh run with DRY_RUN=1 prints
the start command, which is run on a fake worker whose Python records the argv it got.

The reference for every member is its workdir joined here by hand and `Sweep.flags(member)`
(what launch.train must receive), read back from the files through a shell parser.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
from pathlib import Path

import jsonschema
import pytest
import yaml

from configs.sweeps import ablations as shipped
from t5g2.configlib import ConfigError
from t5g2.sweep import launchers
from t5g2.sweep.spec import Member, Sweep
from tests.test_gke import SCHEMA, _container, _errors, strict
from tests.test_tpu_vm import _argv, _command, _on_worker, _wait_for, _worker, _write_exe

REPO = Path(__file__).resolve().parent.parent

# A value a shell or a YAML writer would mangle if quoted wrong: spaces, both quotes,
# parentheses (a tuple), a glob, a dollar sign.
AWKWARD = ("/data/my corpus/*.jsonl", "it's \"x\" $HOME (y)")


def _sweep() -> Sweep:
    return Sweep(
        name="abl",
        config="configs/tiny.py",
        common=(("train.steps", 20),),
        members=(
            Member("tied_merged", (("model.tie_embeddings", True),)),
            Member("Untied.Merged=X", (("model.tie_embeddings", False),)),  # not a DNS label
            Member("awkward", (("data.ul2.source_paths", AWKWARD),
                               ("name", "a (b) 'c'"))),
        ),
        baseline="tied_merged")


def _keys(flags: list[str]) -> list[str]:
    """The overridden fields of `--config.<field>=<value>` words."""
    return [re.match(r"--config\.([^=]+)=", f).group(1) for f in flags]


def _check_member_flags(sweep: Sweep, member: Member, flags: list[str]) -> None:
    assert flags == sweep.flags(member)
    # exactly the sweep's common fields and the member's own, nothing of another member
    assert sorted(_keys(flags)) == sorted(k for k, _ in sweep.common + member.overrides)


# ------------------------------------------------------------------------------ slurm

FAKE_SBATCH = r"""#!/usr/bin/env bash
# sbatch: records its argv and cwd, then runs the batch script as an allocation of --nodes nodes
# would, in DRY_RUN mode (it prints the srun command).
n=$(ls "$FAKE_SLURM_DIR" | wc -l)
printf '%s\0' "$@" > "$FAKE_SLURM_DIR/call$n"
pwd > "$FAKE_SLURM_DIR/cwd$n"
nodes=2 name=t5g2
while [[ "${1:-}" == -* ]]; do
  case "$1" in --nodes=*) nodes=${1#--nodes=} ;; --job-name=*) name=${1#--job-name=} ;; esac
  shift
done
echo "Submitted batch job 7$n"
DRY_RUN=1 SLURM_JOB_ID=7$n SLURM_NNODES=$nodes SLURM_JOB_NAME=$name SLURM_CPUS_PER_TASK=8 \
  SLURM_SUBMIT_DIR=$PWD PYTHON=python bash "$@" > "$FAKE_SLURM_DIR/batch$n.out"
"""


def _exec_argv(path: str) -> list[str]:
    """The argv of the submit script's `exec` line, as bash reads it."""
    [line] = [l for l in Path(path).read_text().splitlines() if l.startswith("exec ")]
    return _argv(line[len("exec "):])


def test_slurm_writes_one_submit_script_per_member_with_its_overrides_and_workdir(
        tmp_path, monkeypatch):
    sweep = _sweep()
    workdir = tmp_path / "sweep dir"
    options = {"nodes": "2", "partition": "gpu", "account": "proj", "time": "1-00:00:00",
               "exclusive": ""}
    files = launchers.write_jobs(sweep, str(workdir), "slurm", str(tmp_path / "jobs"),
                                 options=options)
    assert files == [str(tmp_path / "jobs" / f"{m.name}.sh") for m in sweep.members]
    argvs = []
    for member, path in zip(sweep.members, files):
        argv = _exec_argv(path)
        argvs.append(argv)
        at = argv.index("launch/slurm_gpu.sbatch")
        assert argv[:at] == ["sbatch", "--nodes=2", "--partition=gpu", "--account=proj",
                             "--time=1-00:00:00", "--exclusive", f"--job-name=abl-{member.name}"]
        assert argv[at + 1:at + 5] == ["--config", "configs/tiny.py", "--workdir",
                                       os.path.join(str(workdir), member.name)]
        _check_member_flags(sweep, member, argv[at + 5:])
        assert f"cd {REPO}\n" in Path(path).read_text()  # submitted from the repository
    # the awkward values arrive whole, one word each, whatever quoting the file needed
    assert any("a (b) 'c'" in word for word in argvs[2])
    assert any("/data/my corpus/*.jsonl" in word and "$HOME (y)" in word for word in argvs[2])

    # submit: the fake sbatch gets exactly that argv from the repository, and the batch script
    # hands launch.train the member's arguments (and the 2 nodes' dcn_data)
    fake = tmp_path / "fake_slurm"
    fake.mkdir()
    _write_exe(tmp_path / "bin" / "sbatch", FAKE_SBATCH)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(fake))
    for name in [k for k in os.environ if k.startswith(("SLURM_", "T5G2_"))]:
        monkeypatch.delenv(name)
    launchers.write_jobs(sweep, str(workdir), "slurm", str(tmp_path / "jobs"), options=options,
                         submit=True)
    for i, (member, argv) in enumerate(zip(sweep.members, argvs)):
        recorded = (fake / f"call{3 * i}").read_bytes().decode().split("\0")[:-1]
        assert recorded == argv[1:]
        assert (fake / f"cwd{3 * i}").read_text().strip() == str(REPO)
        batch = (fake / f"batch{3 * i}.out").read_text()
        [srun] = [_argv(l) for l in batch.splitlines() if l.startswith("srun ")]
        at = srun.index("launch.train")
        assert srun[at + 1:] == [*argv[argv.index("--config"):], "--config.mesh.dcn_data=2"]
        assert f"task logs in {REPO}/logs/abl-{member.name}-7{3 * i}/" in batch


def test_slurm_refuses_a_job_name_and_reports_a_refused_submission(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="sets --job-name for each member"):
        launchers.write_jobs(_sweep(), "/shared/s", "slurm", str(tmp_path), options={
            "job-name": "x"})
    _write_exe(tmp_path / "bin" / "sbatch", "#!/bin/sh\necho 'invalid partition' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ConfigError, match=r"sbatch exited with status 1 for member tied_merged"):
        launchers.write_jobs(_sweep(), "/shared/s", "slurm", str(tmp_path / "jobs"), submit=True)


# ------------------------------------------------------------------------------ gke

@pytest.fixture(scope="module")
def validator():
    return jsonschema.Draft7Validator(strict(json.loads(SCHEMA.read_text())))


GKE_GPU = {"target": "gpu", "image": "registry.example/t5g2:gpu", "bucket": "my-bucket",
           "gpu_nodes": "2", "env": ["XLA_FLAGS=--a=b c", "NCCL_DEBUG=INFO"]}


def test_gke_writes_one_valid_jobset_per_member_with_its_overrides_and_workdir(
        tmp_path, validator, monkeypatch):
    sweep = _sweep()
    files = launchers.write_jobs(sweep, "/data/sweeps/abl", "gke", str(tmp_path / "jobs"),
                                 options=GKE_GPU)
    assert files == [str(tmp_path / "jobs" / f"{m.name}.yaml") for m in sweep.members]
    names = []
    for member, path in zip(sweep.members, files):
        [doc] = list(yaml.safe_load_all(Path(path).read_text()))
        assert _errors(validator, doc) == []
        command = _container(doc)["command"]
        assert command[:7] == ["python", "-m", "launch.train", "--config", "configs/tiny.py",
                               "--workdir", f"/data/sweeps/abl/{member.name}"]
        assert command[7] == "--config.mesh.dcn_data=2"  # 2 GPU nodes
        _check_member_flags(sweep, member, command[8:])
        env = {e["name"]: e.get("value") for e in _container(doc)["env"]}
        assert env["XLA_FLAGS"] == "--a=b c" and env["NCCL_DEBUG"] == "INFO"
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
        names.append(name)
    # a member name that is a DNS label is kept; another is lower-cased, with a hash of the
    # original name so that "Untied.Merged=X" and e.g. "untied-merged-x" never collide
    assert re.fullmatch(r"abl-tied-merged-[0-9a-f]{8}", names[0])
    assert re.fullmatch(r"abl-untied-merged-x-[0-9a-f]{8}", names[1])
    assert names[2] == "abl-awkward"
    assert len(set(names)) == 3

    # submit: kubectl apply -f, one file after another
    _write_exe(tmp_path / "bin" / "kubectl",
               f'#!/bin/sh\necho "$@" >> {tmp_path}/kubectl.calls\necho applied\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    launchers.write_jobs(sweep, "/data/sweeps/abl", "gke", str(tmp_path / "jobs"),
                         options=GKE_GPU, submit=True)
    assert (tmp_path / "kubectl.calls").read_text().splitlines() == [
        f"apply -f {path}" for path in files]


def test_gke_names_fit_the_pod_name_limit_of_a_large_tpu_slice(tmp_path, validator):
    long = Member("x" * 70 + "_Y", (("model.tie_embeddings", False),))
    sweep = Sweep(name="ablation-sweep", config="configs/tiny.py", common=(), members=(long,),
                  baseline=long.name)
    options = {"target": "tpu", "image": "img", "tpu-accelerator": "tpu-v6e-slice",
               "tpu-topology": "16x16", "slices": "2"}  # 64 hosts per slice
    [path] = launchers.write_jobs(sweep, "gs://b/sweeps/a", "gke", str(tmp_path),
                                  options=options)
    [doc] = list(yaml.safe_load_all(Path(path).read_text()))
    assert _errors(validator, doc) == []
    name = doc["metadata"]["name"]
    # the longest pod name, <name>-slice-1-63-<5 characters>, is a 63-character DNS label
    assert len(f"{name}-slice-1-63-xxxxx") <= 63
    assert re.fullmatch(r"ablation-sweep-x+-[0-9a-f]{8}", name)
    assert _container(doc)["command"][6] == f"gs://b/sweeps/a/{long.name}"


@pytest.mark.parametrize("options, workdir, message", [
    ({k: v for k, v in GKE_GPU.items() if k != "image"}, "/data/s",
     "the following arguments are required: --image"),
    (GKE_GPU, "/elsewhere/s", "is not under --mount-path=/data"),
    ({**GKE_GPU, "bucket": None}, "/data/s", "needs a volume every pod mounts"),
    ({**GKE_GPU, "name": "mine"}, "/data/s", "sets --name for each member"),
    ({**GKE_GPU, "gpu-nodes": "two"}, "/data/s", "invalid int value: 'two'"),
])
def test_gke_refuses_what_launch_gke_refuses_before_writing(tmp_path, options, workdir, message):
    options = {k: v for k, v in options.items() if v is not None}
    with pytest.raises(ConfigError, match=re.escape(message)):
        launchers.write_jobs(_sweep(), workdir, "gke", str(tmp_path / "jobs"), options=options)
    assert not (tmp_path / "jobs").exists()


# ------------------------------------------------------------------------------ tpu_vm

SLICE = {"QUEUED_RESOURCE": "qr", "ZONE": "us-east5-a"}


def test_tpu_vm_prints_each_members_commands_for_every_host(tmp_path, capfd):
    sweep = _sweep()
    options = launchers.parse_options(["QUEUED_RESOURCE=qr", "ZONE=us-east5-a"])
    commands = launchers.write_jobs(sweep, "gs://b/sweeps/abl", "tpu_vm", str(tmp_path),
                                    options=options)
    printed = capfd.readouterr().out
    assert not any(tmp_path.iterdir())  # printed, nothing written
    for i, (member, command) in enumerate(zip(sweep.members, commands)):
        assert command in printed.splitlines()
        words = shlex.split(command)
        at = words.index("launch/tpu_vm.sh")
        setup = [] if i == 0 else ["SETUP=0"]  # the first member sets the workers up
        assert words[:at] == ["QUEUED_RESOURCE=qr", "ZONE=us-east5-a", *setup]
        assert words[at + 1:at + 6] == ["run", "--config", "configs/tiny.py", "--workdir",
                                        f"gs://b/sweeps/abl/{member.name}"]
        _check_member_flags(sweep, member, words[at + 6:])
        # what every worker runs, named in the block
        per_host = shlex.join([".venv/bin/python", "-m", "launch.train", *words[at + 2:]])
        assert f"# member {member.name}: on every worker of the slice" in printed
        assert f"#   {per_host}" in printed


def test_tpu_vm_submit_starts_each_member_with_its_exact_argv(tmp_path, capfd, monkeypatch):
    """DRY_RUN=1: tpu_vm.sh prints its gcloud commands (a failing gcloud first on PATH); each
    member's start command, run on a fake worker, hands launch.train exactly the member's argv."""
    sweep = _sweep()
    _write_exe(tmp_path / "bin" / "gcloud", f'#!/bin/sh\ntouch "{tmp_path}/gcloud_called"\n'
                                            "exit 97\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    commands = launchers.write_jobs(sweep, "gs://b/sweeps/abl", "tpu_vm", str(tmp_path),
                                    options={**SLICE, "DRY_RUN": "1", "SETUP": "0"},
                                    submit=True)
    assert not (tmp_path / "gcloud_called").exists()
    lines = [line for line in capfd.readouterr().out.splitlines() if line.startswith("gcloud ")]
    remote = [_command(_argv(line)) for line in lines]
    starts = [c for c in remote if "launch.train starts" in c]
    assert len(starts) == len(sweep.members) == len(commands)
    for i, (member, start) in enumerate(zip(sweep.members, starts)):
        home = _worker(tmp_path / f"w{i}")
        assert _on_worker(home, start).returncode == 0
        pid = int(_wait_for(home / "fake" / "pid"))
        try:
            argv = (home / "fake" / "argv").read_bytes().decode().split("\0")[:-1]
        finally:
            os.kill(pid, signal.SIGKILL)
        assert argv[:6] == ["-m", "launch.train", "--config", "configs/tiny.py", "--workdir",
                            f"gs://b/sweeps/abl/{member.name}"]
        _check_member_flags(sweep, member, argv[6:])


def test_tpu_vm_refuses_a_relative_workdir_and_detach(tmp_path, capfd):
    with pytest.raises(ConfigError, match="--workdir sweeps/a for --launcher tpu_vm"):
        launchers.write_jobs(_sweep(), "sweeps/a", "tpu_vm", str(tmp_path), options=SLICE)
    single = launchers.write_jobs(_sweep(), "sweeps/a", "tpu_vm", str(tmp_path),
                                  options={**SLICE, "ALLOW_LOCAL_WORKDIR": "1"})
    assert "--workdir sweeps/a/awkward" in single[2]
    with pytest.raises(ConfigError, match="tpu_vm option zone='z': one of launch/tpu_vm.sh"):
        launchers.write_jobs(_sweep(), "gs://b/s", "tpu_vm", str(tmp_path), options={"zone": "z"})
    with pytest.raises(ConfigError, match="DETACH=1: the members share one slice"):
        launchers.write_jobs(_sweep(), "gs://b/s", "tpu_vm", str(tmp_path),
                             options={**SLICE, "DETACH": "1"})


def test_an_unknown_launcher_or_a_remote_jobs_directory_is_one_error():
    with pytest.raises(ConfigError, match=r"--launcher='k8s': valid are slurm, gke, tpu_vm"):
        launchers.write_jobs(_sweep(), "/shared/s", "k8s", "/nonexistent")
    with pytest.raises(ConfigError, match="jobs directory gs://b/jobs: a local directory"):
        launchers.write_jobs(_sweep(), "gs://b/s", "gke", "gs://b/jobs", options=GKE_GPU)


def test_parse_options_keeps_repeated_keys_and_switches():
    assert launchers.parse_options(["nodes=2", "env=A=b c", "env=D=e", "exclusive"]) == {
        "nodes": ["2"], "env": ["A=b c", "D=e"], "exclusive": [""]}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        launchers.parse_options(["=x"])


def test_the_shipped_ablation_sweep_becomes_one_valid_jobset_and_script_per_member(
        tmp_path, validator):
    """configs/sweeps/ablations.py's members (names derived from their overrides) on GKE and
    Slurm: distinct JobSet names, valid manifests, each member's workdir."""
    ablations = shipped.get_sweep()
    options = {"target": "tpu", "image": "img", "tpu-accelerator": "tpu-v5p-slice",
               "tpu-topology": "2x2x4"}
    files = launchers.write_jobs(ablations, "gs://b/sweeps/ablations", "gke",
                                 str(tmp_path / "gke"), options=options)
    docs = [yaml.safe_load(Path(p).read_text()) for p in files]
    assert len({d["metadata"]["name"] for d in docs}) == len(ablations.members) == 4
    for member, doc in zip(ablations.members, docs):
        assert _errors(validator, doc) == []
        assert _container(doc)["command"][6] == f"gs://b/sweeps/ablations/{member.name}"
        _check_member_flags(ablations, member, _container(doc)["command"][7:])  # 1 slice
    scripts = launchers.write_jobs(ablations, "/shared/ablations", "slurm", str(tmp_path / "s"))
    for member, path in zip(ablations.members, scripts):
        argv = _exec_argv(path)
        assert argv[argv.index("--workdir") + 1] == f"/shared/ablations/{member.name}"
