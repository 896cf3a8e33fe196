"""launch/gke.py: the rendered JobSets validate strictly against the JobSet CRD's schema (which
embeds the batch/v1 Job and core/v1 Pod specs), carry the sizes GKE's TPU tables give, and their
failure policies, evaluated as the Job and JobSet controllers evaluate them, fail a configuration
error once and restart a preemption; a GKE-style run (the rendered container's command and
environment on localhost) preempted by SIGTERM exits 143 and resumes from its checkpoint.
"""

from __future__ import annotations

import copy
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from launch import gke
from t5g2.configlib import ConfigError
from t5g2.data import index
from tests.test_multihost import REPO, TRAIN_FLAGS, _env, _free_port

SCHEMA = REPO / "tests" / "schemas" / "jobset.x-k8s.io_v1alpha2.json"
TIMEOUT_S = 240


# ------------------------------------------------------------------------------ schema

def strict(schema):
    """The schema with `additionalProperties: false` on every object schema that lists its
    properties and does not preserve unknown fields: what `kubectl apply --validate=strict`
    rejects instead of the API server silently pruning it (a misspelt field)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@pytest.fixture(scope="module")
def schema():
    return json.loads(SCHEMA.read_text())


@pytest.fixture(scope="module")
def validator(schema):
    return jsonschema.Draft7Validator(strict(schema))


def _errors(validator, doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


def _run(target="gpu", **kw) -> gke.Run:
    base = dict(target=target, name="t5g2-run", image="registry.example/t5g2:tpu",
                config="configs/t5g2_270m.py", workdir="/data/runs/a", bucket="my-bucket")
    if target == "tpu":
        base.update(tpu_accelerator="tpu-v5p-slice", tpu_topology="2x2x4")
    base.update(kw)
    return gke.Run(**base)


def _render(run: gke.Run) -> dict:
    """The one document of the manifest, read back from the YAML text kubectl would get."""
    docs = list(yaml.safe_load_all(gke.to_yaml(gke.render(run))))
    assert len(docs) == 1 and docs[0]["kind"] == "JobSet"
    return docs[0]


def _job(doc) -> dict:
    (rjob,) = doc["spec"]["replicatedJobs"]
    return rjob["template"]["spec"]


def _pod(doc) -> dict:
    return _job(doc)["template"]["spec"]


def _container(doc) -> dict:
    (container,) = _pod(doc)["containers"]
    return container


def _env_of(doc) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container(doc)["env"]}


def test_the_schema_is_the_jobset_crd_and_the_strict_validator_rejects_a_misspelt_field(
        schema, validator):
    assert "v0.12.0" in schema["$comment"] and "Apache-2.0" in schema["$comment"]
    doc = _render(_run())
    assert _errors(validator, doc) == []
    misspelt = copy.deepcopy(doc)
    _container(misspelt)["volumeMount"] = _container(misspelt).pop("volumeMounts")
    misspelt["spec"]["failurePolicy"]["rules"][0]["onJobFailureReason"] = ["PodFailurePolicy"]
    errors = _errors(validator, misspelt)
    assert any("'volumeMount' was unexpected" in e for e in errors), errors
    assert any("'onJobFailureReason' was unexpected" in e for e in errors), errors
    # the schema as the API server uses it (pruning) would have let both through
    assert _errors(jsonschema.Draft7Validator(schema), misspelt) == []
    wrong_value = copy.deepcopy(doc)
    wrong_value["spec"]["failurePolicy"]["rules"][0]["action"] = "FailJob"  # a Job's action
    assert any("'FailJob' is not one of" in e for e in _errors(validator, wrong_value))
    wrong_type = copy.deepcopy(doc)
    _job(wrong_type)["parallelism"] = "2"
    assert any("'2' is not of type 'integer'" in e for e in _errors(validator, wrong_type))


# GKE's TPU tables (cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus, and the Cloud TPU
# v5p / v5e / v6e pages): (accelerator, topology) -> (hosts per slice, chips per host).
TPU_SLICES = {
    ("tpu-v5p-slice", "2x2x4"): (4, 4),  # v5p-32
    ("tpu-v5p-slice", "2x2x1"): (1, 4),  # v5p-8
    ("tpu-v5p-slice", "4x4x8"): (32, 4),  # v5p-256
    ("tpu-v4-podslice", "2x2x2"): (2, 4),
    ("tpu-v5-lite-podslice", "4x4"): (4, 4),  # v5e-16
    ("tpu-v5-lite-podslice", "2x4"): (1, 8),  # v5e-8, one host
    ("tpu-v6e-slice", "16x16"): (64, 4),
    ("tpu-v6e-slice", "1x1"): (1, 1),
}


@pytest.mark.parametrize("accelerator, topology", list(TPU_SLICES))
def test_a_tpu_slice_has_one_pod_per_host_owning_its_chips(validator, accelerator, topology):
    hosts, chips = TPU_SLICES[accelerator, topology]
    doc = _render(_run("tpu", tpu_accelerator=accelerator, tpu_topology=topology))
    assert _errors(validator, doc) == []
    job, pod = _job(doc), _pod(doc)
    assert job["parallelism"] == job["completions"] == hosts
    assert job["completionMode"] == "Indexed" and job["backoffLimit"] == 0
    assert _container(doc)["resources"]["limits"] == {"google.com/tpu": chips}
    sides = [int(s) for s in topology.split("x")]
    assert hosts * chips == sides[0] * sides[1] * (sides[2] if len(sides) == 3 else 1)
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": accelerator,
                                   "cloud.google.com/gke-tpu-topology": topology}
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    # GKE injects TPU_WORKER_HOSTNAMES / TPU_WORKER_ID: no t5g2 cluster variables
    assert not [k for k in _env_of(doc) if k.startswith("T5G2_")]
    assert not [a for a in _container(doc)["command"] if "dcn_" in a]  # one slice: ICI only
    assert doc["spec"]["replicatedJobs"][0]["replicas"] == 1


def test_multi_slice_replicates_the_slice_job_and_adds_the_dcn_axis(validator):
    doc = _render(_run("tpu", slices=2, env=(("LIBTPU_INIT_ARGS", "--xla_tpu_x=1"),)))
    assert _errors(validator, doc) == []
    (rjob,) = doc["spec"]["replicatedJobs"]
    assert rjob["replicas"] == 2 and _job(doc)["parallelism"] == 4
    assert doc["metadata"]["annotations"] == {
        "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
    assert _container(doc)["command"][:8] == [
        "python", "-m", "launch.train", "--config", "configs/t5g2_270m.py", "--workdir",
        "/data/runs/a", "--config.mesh.dcn_data=2"]
    assert _env_of(doc) == {"LIBTPU_INIT_ARGS": "--xla_tpu_x=1"}


@pytest.mark.parametrize("accelerator, topology, message", [
    ("tpu-v5p-slice", "2x3x4", "has no topology 2x3x4; valid: AxBxC with every side a multiple"),
    ("tpu-v5p-slice", "4x4", "has no topology 4x4"),
    ("tpu-v5-lite-podslice", "4x4x4", "has no topology 4x4x4; valid: 1x1, 2x2, 2x4, 4x4"),
    ("tpu-v6e-slice", "8x4", "has no topology 8x4"),
    ("tpu-v5", "2x2", "--tpu-accelerator='tpu-v5': valid are tpu-v4-podslice"),
    ("tpu-v5p-slice", "2x2x", "expected sides like 2x2x4"),
])
def test_an_impossible_tpu_slice_is_one_clear_error(accelerator, topology, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        gke.render(_run("tpu", tpu_accelerator=accelerator, tpu_topology=topology))


@pytest.mark.parametrize("run, message", [
    (_run("tpu", tpu_topology="2x2x1", slices=2), "multi-slice needs multi-host slices"),
    (_run(bucket=None), "a --workdir path needs a volume every pod mounts: --bucket BUCKET"),
    (_run(pvc="claim"), "--bucket and --pvc: give one volume"),
    (_run(workdir="/tmp/run"), "--workdir=/tmp/run is not under --mount-path=/data"),
    (_run(workdir="/database/run"), "is not under --mount-path=/data"),
    (_run(workdir="s3://my-bucket/run"), "the pods reach gs:// URLs only"),
    (_run(workdir="runs/a"), "--workdir=runs/a is not under --mount-path=/data"),
    (_run(mount_path="/", workdir="/runs/a"), "--mount-path=/: an absolute directory"),
    (_run(name="T5G2_run"), "--name='T5G2_run': lower-case letters"),
    (_run(name="a" * 49), "pod names such as " + "a" * 49 + "-node-0-0-xxxxx must stay"),
    (_run(gpus_per_node=3), "--gpus-per-node=3"),
    (_run(slices=2), "--slices are for --target=tpu; a GPU run takes --gpu-nodes"),
    (_run(gpu_nodes=0), "--gpu-nodes=0"),
    (_run(env=(("T5G2_PROCESS_ID", "1"),)), "the manifest sets the T5G2_* variables"),
])
def test_a_run_that_could_not_work_is_refused(run, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        gke.render(run)


def test_the_command_line_prints_yaml_or_one_error_line(tmp_path):
    args = [sys.executable, "-m", "launch.gke", "--target", "tpu", "--name", "t5g2-run",
            "--image", "img", "--config", "configs/t5g2_270m.py", "--workdir", "/data/runs/a",
            "--bucket", "b", "--tpu-accelerator", "tpu-v5p-slice"]
    out = tmp_path / "jobset.yaml"
    ok = subprocess.run(args + ["--tpu-topology", "2x2x4", "--out", str(out), "--train-args",
                                "--config.train.steps=10 --config.mesh.fsdp=-1"],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    doc = yaml.safe_load(out.read_text())
    assert _container(doc)["command"][-2:] == ["--config.train.steps=10", "--config.mesh.fsdp=-1"]
    bad = subprocess.run(args + ["--tpu-topology", "2x2x3"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        "error: --tpu-accelerator=tpu-v5p-slice has no topology 2x2x3; valid: AxBxC with every "
        "side a multiple of 4, or 2x2x1, 2x2x2, 2x2x4, 2x4x4"]


@pytest.mark.parametrize("nodes", [1, 2])
def test_gpu_nodes_find_pod_0_through_the_jobset_network(validator, nodes):
    doc = _render(_run("gpu", gpu_nodes=nodes, name="t5g2-gpu"))
    assert _errors(validator, doc) == []
    job, pod, env = _job(doc), _pod(doc), _env_of(doc)
    assert job["parallelism"] == job["completions"] == nodes
    assert _container(doc)["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert "hostNetwork" not in pod
    # JobSet pod hostnames: <jobset>-<replicated job>-<job index>-<pod index>.<subdomain>
    assert doc["spec"]["network"] == {"enableDNSHostnames": True, "subdomain": "t5g2-gpu",
                                      "publishNotReadyAddresses": True}
    assert env["T5G2_COORDINATOR_ADDRESS"] == "t5g2-gpu-node-0-0.t5g2-gpu:8476"
    assert env["T5G2_NUM_PROCESSES"] == str(nodes)
    assert env["T5G2_PROCESS_ID"] == {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert env["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=true"
    dcn = [a for a in _container(doc)["command"] if "dcn_" in a]
    assert dcn == ([] if nodes == 1 else [f"--config.mesh.dcn_data={nodes}"])


def test_env_replaces_a_default_and_train_args_may_choose_the_dcn_axis():
    doc = _render(_run("gpu", gpu_nodes=4, env=(("XLA_FLAGS", "--xla_dump_to=/tmp/x"),
                                                 ("NCCL_SOCKET_IFNAME", "eth0")),
                       train_args=("--config.mesh.dcn_fsdp=4",)))
    env = _env_of(doc)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x" and env["NCCL_SOCKET_IFNAME"] == "eth0"
    assert env["NCCL_DEBUG"] == "WARN"
    assert [a for a in _container(doc)["command"] if "dcn_" in a] == ["--config.mesh.dcn_fsdp=4"]


@pytest.mark.parametrize("target", ["tpu", "gpu"])
def test_the_workdir_is_a_bucket_mounted_with_gcs_fuse_or_a_claim(validator, target):
    doc = _render(_run(target, mount_path="/gcs", workdir="/gcs/runs/a",
                       service_account="t5g2-runner", grace_period_s=600))
    assert _errors(validator, doc) == []
    pod, container = _pod(doc), _container(doc)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"workdir": "/gcs", "dshm": "/dev/shm"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}
    csi = volumes["workdir"]["csi"]
    assert csi["driver"] == "gcsfuse.csi.storage.gke.io"
    assert csi["volumeAttributes"]["bucketName"] == "my-bucket"
    options = csi["volumeAttributes"]["mountOptions"].split(",")
    assert "metadata-cache:negative-ttl-secs:0" in options and "implicit-dirs" in options
    # a document-index claim another pod refreshes is seen before it would count as abandoned
    ttl = int(next(o for o in options if o.startswith("metadata-cache:ttl-secs:")).split(":")[-1])
    assert 0 <= ttl and ttl + index._CLAIM_REFRESH_S < index.CLAIM_FRESH_S
    assert csi["volumeAttributes"].get("hostNetworkPodKSA") == ("true" if target == "tpu" else None)
    annotations = _job(doc)["template"]["metadata"]["annotations"]
    assert annotations["gke-gcsfuse/volumes"] == "true"
    assert annotations["gke-gcsfuse/ephemeral-storage-limit"] == "0"
    assert annotations["kubectl.kubernetes.io/default-container"] == "train"
    assert pod["serviceAccountName"] == "t5g2-runner"
    assert pod["terminationGracePeriodSeconds"] == 600 and pod["restartPolicy"] == "Never"
    assert container["command"][container["command"].index("--workdir") + 1] == "/gcs/runs/a"

    claim = _render(_run(target, bucket=None, pvc="shared-runs"))
    assert _errors(validator, claim) == []
    volumes = {v["name"]: v for v in _pod(claim)["volumes"]}
    assert volumes["workdir"] == {"name": "workdir",
                                  "persistentVolumeClaim": {"claimName": "shared-runs"}}
    assert "gke-gcsfuse/volumes" not in _job(claim)["template"]["metadata"]["annotations"]

    # a gs:// workdir: the pods write the bucket themselves, no volume is needed
    url = _render(_run(target, bucket=None, workdir="gs://my-bucket/runs/a"))
    assert _errors(validator, url) == []
    assert [v["name"] for v in _pod(url)["volumes"]] == ["dshm"]
    assert [m["name"] for m in _container(url)["volumeMounts"]] == ["dshm"]
    assert "gke-gcsfuse/volumes" not in _job(url)["template"]["metadata"]["annotations"]
    assert _container(url)["command"][_container(url)["command"].index("--workdir") + 1] == \
        "gs://my-bucket/runs/a"


# ------------------------------------------------------------ the controllers' decisions

def job_failure(job_spec: dict, exit_code: int | None, conditions=()) -> tuple[str, str] | None:
    """What the Job controller makes of one failed pod of this Job (its `train` container's exit
    code, its True conditions): the Job's Failed (reason, message), or None when the pod is
    replaced. As kubernetes pkg/controller/job/pod_failure_policy.go: rules in order, the first
    match decides; FailJob fails the Job with reason PodFailurePolicy; Ignore replaces the pod;
    Count or no match counts the pod against backoffLimit."""
    for rule_index, rule in enumerate(job_spec.get("podFailurePolicy", {}).get("rules", [])):
        matched = None
        if "onExitCodes" in rule:
            req = rule["onExitCodes"]
            if (exit_code and req.get("containerName", "train") == "train"
                    and (exit_code in req["values"]) == (req["operator"] == "In")):
                matched = (f"Container train for pod default/p failed with exit code {exit_code}"
                           f" matching {rule['action']} rule at index {rule_index}")
        elif "onPodConditions" in rule:
            for condition in conditions:
                if any(p["type"] == condition and p.get("status", "True") == "True"
                       for p in rule["onPodConditions"]):
                    matched = (f"Pod default/p has condition {condition} matching "
                               f"{rule['action']} rule at index {rule_index}")
                    break
        if matched is None:
            continue
        if rule["action"] == "FailJob":
            return "PodFailurePolicy", matched
        if rule["action"] == "Ignore":
            return None
        break  # Count
    if 1 > job_spec.get("backoffLimit", 6):
        return "BackoffLimitExceeded", "Job has reached the specified backoff limit"
    return None


def jobset_action(doc: dict, failure: tuple[str, str]) -> str:
    """The JobSet controller's action for a failed child Job (jobset pkg/controllers/
    failure_policy.go): the first rule whose reasons, message patterns (Go regexp.MatchString:
    a search) and replicated jobs match; RestartJobSet when none does."""
    reason, message = failure
    rjob = doc["spec"]["replicatedJobs"][0]["name"]
    for rule in doc["spec"]["failurePolicy"].get("rules", []):
        if rule.get("onJobFailureReasons") and reason not in rule["onJobFailureReasons"]:
            continue
        patterns = rule.get("onJobFailureMessagePatterns")
        if patterns and not any(re.search(p, message) for p in patterns):
            continue
        if rule.get("targetReplicatedJobs") and rjob not in rule["targetReplicatedJobs"]:
            continue
        return rule["action"]
    return "RestartJobSet"


def decide(doc: dict, exit_code: int | None, conditions=(), restarts: int = 0) -> str:
    """'fail', 'restart' (counted against maxRestarts), 'restart uncounted' or 'replace pod'."""
    failure = job_failure(_job(doc), exit_code, conditions)
    if failure is None:
        return "replace pod"
    action = jobset_action(doc, failure)
    if action == "FailJobSet":
        return "fail"
    if action == "RestartJobSetAndIgnoreMaxRestarts":
        return "restart uncounted"
    assert action == "RestartJobSet", action
    return "restart" if restarts < doc["spec"]["failurePolicy"]["maxRestarts"] else "fail"


@pytest.mark.parametrize("target", ["tpu", "gpu"])
def test_failure_policies_fail_a_config_error_once_and_restart_a_preemption(validator, target):
    from launch import cli
    from t5g2.train.preemption import PREEMPTED_EXIT_CODE

    assert (gke.USER_ERROR_EXIT_CODE, gke.PREEMPTED_EXIT_CODE) == (cli.USER_ERROR_EXIT_CODE,
                                                                   PREEMPTED_EXIT_CODE)
    doc = _render(_run(target, max_restarts=3))
    assert doc["spec"]["failurePolicy"]["restartStrategy"] == "BlockingRecreate"
    # what the CRD schema leaves to the API server's Job validation and the JobSet webhook
    # (batch/v1 PodFailurePolicyRule; jobset pkg/webhooks/jobset_webhook.go rule names)
    for rule in _job(doc)["podFailurePolicy"]["rules"]:
        assert rule["action"] in ("FailJob", "FailIndex", "Ignore", "Count")
        assert rule.get("onExitCodes", {"operator": "In"})["operator"] in ("In", "NotIn")
        assert (rule.get("onExitCodes", {}).get("containerName", "train")
                == _container(doc)["name"] == "train")
    for rule in doc["spec"]["failurePolicy"]["rules"]:
        assert re.fullmatch(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?", rule["name"])
    assert decide(doc, 2) == "fail"  # a configuration error: once, whatever the restarts
    assert decide(doc, 143) == "restart uncounted"  # SIGTERM checkpoint, then exit 143
    assert decide(doc, 143, restarts=100) == "restart uncounted"
    assert decide(doc, 137, ["DisruptionTarget"]) == "restart uncounted"  # node loss, eviction
    assert decide(doc, None, ["DisruptionTarget"]) == "restart uncounted"
    assert decide(doc, 1) == "restart"  # a crash
    assert decide(doc, 137, restarts=2) == "restart"  # OOM-killed
    assert decide(doc, 1, restarts=3) == "fail"  # maxRestarts reached
    assert decide(doc, 2, ["DisruptionTarget"]) == "fail"  # exit code rules come first


# -------------------------------------------------- a preempted GKE-style run on localhost

def _localhost(doc: dict, pod_index: int = 0) -> tuple[list[str], dict]:
    """The rendered container's command and environment as Kubernetes would start it as pod
    `pod_index` of a 1-node GPU JobSet on this machine: the image's python is this one, the
    completion-index annotation is the pod index, pod 0's name resolves to 127.0.0.1."""
    container = _container(doc)
    argv = list(container["command"])
    assert argv[0] == "python"
    argv[0] = sys.executable
    env = _env(1)  # this machine's variables without any cluster's, one CPU device
    # then the rendered ones as they are: the GPU default XLA_FLAGS must parse in this jaxlib
    # (an unknown XLA flag is fatal at start)
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            assert entry["valueFrom"]["fieldRef"]["fieldPath"] == (
                "metadata.annotations['batch.kubernetes.io/job-completion-index']")
            env[entry["name"]] = str(pod_index)
    name = doc["metadata"]["name"]
    assert env["T5G2_COORDINATOR_ADDRESS"] == f"{name}-node-0-0.{name}:8476"  # pod 0's name
    env["T5G2_COORDINATOR_ADDRESS"] = f"127.0.0.1:{_free_port()}"
    return argv, env


def _start(argv, env, log: Path) -> subprocess.Popen:
    with open(log, "a", encoding="utf-8") as f:
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, log: Path) -> int:
    try:
        return proc.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"timed out:\n{log.read_text()[-3000:]}")


@pytest.mark.slow  # SIGTERM -> 143 -> restart -> resume: test_slurm's requeue test, by default
def test_a_preempted_gke_run_exits_143_is_restarted_and_resumes_from_its_checkpoint(tmp_path):
    steps = 20
    train_args = TRAIN_FLAGS[2:] + (  # the tiny model and synthetic data of test_multihost
        f"--config.train.steps={steps}", "--config.checkpoint.every=5",
        "--config.checkpoint.async_save=false")  # checkpoint 5 exists when step 6 starts
    doc = _render(_run("gpu", name="sim", gpu_nodes=1, bucket=None, pvc="shared",
                       mount_path=str(tmp_path), workdir=str(tmp_path / "run"),
                       config=TRAIN_FLAGS[1], train_args=train_args))
    workdir, log = tmp_path / "run", tmp_path / "pod.log"
    checkpoints = workdir / "checkpoints"
    argv, env = _localhost(doc)
    proc = _start(argv, env, log)
    deadline = time.monotonic() + TIMEOUT_S
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        assert proc.poll() is None, f"the run ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the kubelet, on preemption or eviction
    code = _wait(proc, log)
    first = log.read_text()
    assert code == 143, first[-3000:]
    stopped = int(re.search(r"stopped at step (\d+) on a termination request", first).group(1))
    assert 5 <= stopped < steps and (checkpoints / str(stopped)).is_dir()

    assert decide(doc, code) == "restart uncounted"  # the JobSet recreates the pod
    argv, env = _localhost(doc)
    code = _wait(_start(argv, env, log), log)
    second = log.read_text()[len(first):]
    assert code == 0, second[-3000:]
    assert f"starting at step {stopped} from checkpoint" in second
    steps_logged = [json.loads(line)["step"]
                    for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1))
    assert re.search(rf"^step {stopped + 1} \|", second, re.M)
    assert not re.search(rf"^step {stopped} \|", second, re.M)  # nothing trained twice
    assert (checkpoints / str(steps)).is_dir()


def test_a_bad_override_in_a_gke_run_exits_2_and_fails_the_jobset(tmp_path):
    doc = _render(_run("gpu", name="sim", bucket=None, pvc="shared", mount_path=str(tmp_path),
                       workdir=str(tmp_path / "run"), config=TRAIN_FLAGS[1],
                       train_args=TRAIN_FLAGS[2:] + ("--config.train.stepz=5",)))
    argv, env = _localhost(doc)
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: --config.train.stepz: config.train has no field 'stepz'")
    assert decide(doc, result.returncode) == "fail"


def test_the_image_holds_the_code_where_the_pods_run_it_and_leaves_the_venv_out():
    dockerfile = (REPO / "Dockerfile").read_text().splitlines()
    workdir = [line.split()[1] for line in dockerfile if line.startswith("WORKDIR ")]
    assert workdir == [_container(_render(_run()))["workingDir"]] == ["/t5g2"]
    assert dockerfile[-1] == "COPY . ."
    install = next(line for line in dockerfile if line.startswith("RUN pip install"))
    assert "-r requirements.txt" in install and "-c requirements-lock.txt" in install
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", "workdir*", ".git", "**/__pycache__"} <= ignored
