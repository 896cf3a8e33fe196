"""Render the Kubernetes manifest of a t5g2 run on GKE: one JobSet, TPU slices or GPU nodes.

    python -m launch.gke --target tpu --name t5g2-270m --image IMAGE --config configs/t5g2_270m.py \
        --workdir /data/runs/270m --bucket BUCKET --tpu-accelerator tpu-v5p-slice \
        --tpu-topology 2x2x4 | kubectl apply -f -
    python -m launch.gke --target gpu --name t5g2-270m --image IMAGE --config configs/t5g2_270m.py \
        --workdir /data/runs/270m --bucket BUCKET --gpu-nodes 1 --out jobset.yaml

Every pod (one per TPU host or GPU node) runs the same `python -m launch.train` and owns all of
its host's chips or GPUs. What the manifest carries:
- sizes: a TPU slice's hosts and chips per host follow from its accelerator and topology (GKE's
  TPU tables: `TPU_ACCELERATORS`); GPU nodes and GPUs per node are given. Multi-slice and
  multi-node runs get `--config.mesh.dcn_data=<slices or nodes>` unless the train arguments set
  a `dcn_` size themselves;
- jax.distributed: TPU pods get what GKE injects (TPU_WORKER_HOSTNAMES, MEGASCALE_*); GPU pods
  the explicit T5G2_* variables (t5g2/distributed.py), with pod 0's DNS name in the JobSet's
  network as the coordinator;
- the workdir, shared by every pod and outliving them, so a restarted JobSet resumes from the
  latest checkpoint: a gs:// URL the pods write themselves, or a path on a volume every pod
  mounts at `--mount-path` (a bucket through the GCS FUSE CSI driver, or a ReadWriteMany
  PersistentVolumeClaim), which can also hold the inputs;
- failures (`pod_failure_policy`, `jobset_failure_policy`): a configuration error (t5g2's exit
  status 2) fails the JobSet at once; a preemption (exit 143 after the SIGTERM checkpoint, or a
  pod disrupted by node loss, maintenance or eviction) recreates every pod, as often as it
  happens; any other failure (a crash, an OOM kill) restarts at most `--max-restarts` times;
- `terminationGracePeriodSeconds` for the SIGTERM checkpoint, /dev/shm in memory, and
  XLA_FLAGS / LIBTPU_INIT_ARGS / NCCL_* through `--env KEY=VALUE` (GPU defaults: GPU_ENV).
A mistake in the arguments is one line, `error: <message>`, and exit status 2, as in launch/cli.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import posixpath
import re
import shlex
import sys
from typing import Sequence

import yaml

from t5g2.configlib import ConfigError

# Exit statuses of launch.train that the failure policy tells apart (launch/cli.py
# USER_ERROR_EXIT_CODE, t5g2.train.preemption.PREEMPTED_EXIT_CODE; not imported, as both modules
# import JAX).
USER_ERROR_EXIT_CODE = 2
PREEMPTED_EXIT_CODE = 143
CONTAINER = "train"
COORDINATOR_PORT = 8476  # jax.distributed on GPU pods (pod 0 serves it)
# The failure message the Job controller writes for a FailJob rule (kubernetes
# pkg/controller/job/pod_failure_policy.go), matched by the JobSet rules below.
EXIT_MESSAGE = "failed with exit code {code} matching FailJob rule"
CONDITION_MESSAGE = "has condition {condition} matching FailJob rule"

# GPU pods, unless --env says otherwise. XLA's latency-hiding scheduler overlaps the FSDP
# all-gathers / reduce-scatters with compute (JAX's GPU performance tips); JAX preallocates this
# fraction of each GPU's memory (default 0.75), the rest stays for NCCL and the CUDA runtime;
# NCCL_DEBUG=WARN puts NCCL's warnings (a fallback to TCP, a failed peer) in the pod's log.
GPU_ENV = {
    "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true",
    "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90",
    "NCCL_DEBUG": "WARN",
}

# Cloud Storage FUSE mount options for a workdir (and shared inputs) that several pods write: no
# negative metadata cache, so a file another pod has just created (process 0's shared-workdir
# marker, the directory orbax saves into, a document index) is seen at once; other metadata
# cached for 60 s, so a file another pod rewrites is seen changed within that (a document-index
# claim's refresh, well before the claim would count as abandoned: t5g2/data/index.py
# CLAIM_FRESH_S); unbounded metadata caches (a checkpoint is many files). Directory renames
# (orbax commits `<step>.orbax-checkpoint-tmp` by renaming it) are atomic only in a bucket with
# hierarchical namespace.
GCSFUSE_MOUNT_OPTIONS = ("implicit-dirs,metadata-cache:negative-ttl-secs:0,"
                         "metadata-cache:ttl-secs:60,metadata-cache:stat-cache-max-size-mb:-1,"
                         "metadata-cache:type-cache-max-size-mb:-1")


@dataclasses.dataclass(frozen=True)
class TpuAccelerator:
    """A GKE TPU type (`cloud.google.com/gke-tpu-accelerator`): its valid topologies, the chips
    of each host of a multi-host slice, and the single-host topologies with their chips."""
    topologies: str  # "2d" (the listed 2D shapes) or "3d" (AxBxC, see valid_3d_topology)
    chips_per_host: int
    single_host: dict[str, int]


TPU_ACCELERATORS = {
    "tpu-v4-podslice": TpuAccelerator("3d", 4, {}),
    "tpu-v5p-slice": TpuAccelerator("3d", 4, {}),
    # 1x1, 2x2, 2x4 on one host (1, 4, 8 chips), the larger slices on hosts of 4 chips
    "tpu-v5-lite-podslice": TpuAccelerator("2d", 4, {"1x1": 1, "2x2": 4, "2x4": 8}),
    "tpu-v6e-slice": TpuAccelerator("2d", 4, {"1x1": 1, "2x2": 4, "2x4": 8}),
}
TPU_2D_TOPOLOGIES = ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
TPU_3D_SMALL = ("2x2x1", "2x2x2", "2x2x4", "2x4x4")  # the slices with a side below 4


def valid_3d_topology(sides: list[int]) -> bool:
    """v4 / v5p: three sides, each a multiple of 4, or (in some order) one of TPU_3D_SMALL."""
    small = {tuple(sorted(int(s) for s in t.split("x"))) for t in TPU_3D_SMALL}
    return len(sides) == 3 and (all(s % 4 == 0 for s in sides) or tuple(sorted(sides)) in small)


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    accelerator: str
    topology: str
    chips: int
    hosts: int
    chips_per_host: int


def tpu_slice(accelerator: str, topology: str) -> TpuSlice:
    """A slice's hosts and chips per host from its GKE accelerator and topology."""
    kind = TPU_ACCELERATORS.get(accelerator)
    if kind is None:
        raise ConfigError(f"--tpu-accelerator={accelerator!r}: valid are "
                          + ", ".join(TPU_ACCELERATORS))
    if not re.fullmatch(r"[1-9][0-9]*(x[1-9][0-9]*)*", topology):
        raise ConfigError(f"--tpu-topology={topology!r}: expected sides like 2x2x4 or 4x4")
    sides = [int(s) for s in topology.split("x")]
    if kind.topologies == "2d":
        valid, allowed = topology in TPU_2D_TOPOLOGIES, ", ".join(TPU_2D_TOPOLOGIES)
    else:
        valid = valid_3d_topology(sides)
        allowed = "AxBxC with every side a multiple of 4, or " + ", ".join(TPU_3D_SMALL)
    if not valid:
        raise ConfigError(f"--tpu-accelerator={accelerator} has no topology {topology}; valid: "
                          f"{allowed}")
    chips = math.prod(sides)
    per_host = kind.single_host.get(topology, kind.chips_per_host)
    return TpuSlice(accelerator, topology, chips, chips // per_host, per_host)


@dataclasses.dataclass(frozen=True)
class Run:
    """What the manifest is rendered from (the command-line arguments, checked)."""
    target: str
    name: str
    image: str
    config: str
    workdir: str
    mount_path: str = "/data"
    bucket: str | None = None
    pvc: str | None = None
    train_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    service_account: str | None = None
    grace_period_s: int = 300
    max_restarts: int = 5
    spot: bool = False
    gcsfuse_mount_options: str = GCSFUSE_MOUNT_OPTIONS
    shm_size: str | None = None
    # TPU
    tpu_accelerator: str | None = None
    tpu_topology: str | None = None
    slices: int = 1
    # GPU
    gpu_nodes: int = 1
    gpus_per_node: int = 8
    gpu_accelerator: str = "nvidia-h100-80gb"


def replicated_job_name(run: Run) -> str:
    return "slice" if run.target == "tpu" else "node"


def pod_hostname(run: Run, job_index: int, pod_index: int) -> str:
    """A JobSet pod's hostname: <jobset>-<replicated job>-<job index>-<pod index>."""
    return f"{run.name}-{replicated_job_name(run)}-{job_index}-{pod_index}"


def coordinator_address(run: Run) -> str:
    """Pod 0's DNS name in the JobSet's network (subdomain = the JobSet's name), and the port."""
    return f"{pod_hostname(run, 0, 0)}.{run.name}:{COORDINATOR_PORT}"


def longest_pod_name(run: Run, tpu: TpuSlice | None) -> str:
    """The JobSet webhook's limit: the longest pod name, with its 5-character suffix, must be a
    DNS label (63 characters)."""
    hosts = tpu.hosts if tpu else run.gpu_nodes
    return pod_hostname(run, run.slices - 1 if tpu else 0, hosts - 1) + "-xxxxx"


def check(run: Run) -> TpuSlice | None:
    """Raises ConfigError for anything that would not run; the TPU slice of a TPU run."""
    if run.target not in ("tpu", "gpu"):
        raise ConfigError(f"--target={run.target!r}: valid are tpu, gpu")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", run.name):
        raise ConfigError(f"--name={run.name!r}: lower-case letters, digits and '-', starting "
                          "with a letter (a DNS label)")
    for field, value in (("--image", run.image), ("--config", run.config)):
        if not value:
            raise ConfigError(f"{field} is required")
    if run.bucket is not None and run.pvc is not None:
        raise ConfigError("--bucket and --pvc: give one volume")
    if run.bucket is not None or run.pvc is not None:
        if not run.mount_path.startswith("/") or posixpath.normpath(run.mount_path) == "/":
            raise ConfigError(f"--mount-path={run.mount_path}: an absolute directory other "
                              "than /")
    if run.workdir.startswith("gs://"):
        pass  # the pods write the bucket themselves (t5g2/fs.py, orbax): no volume needed
    elif "://" in run.workdir:
        raise ConfigError(f"--workdir={run.workdir}: the pods reach gs:// URLs only; or give a "
                          f"path under the mounted volume, e.g. {run.mount_path}/runs/{run.name}")
    else:
        if run.bucket is None and run.pvc is None:
            raise ConfigError("a --workdir path needs a volume every pod mounts: --bucket BUCKET"
                              " (Cloud Storage FUSE) or --pvc CLAIM (a ReadWriteMany "
                              "PersistentVolumeClaim); or give a gs://BUCKET/... workdir")
        mount = posixpath.normpath(run.mount_path)
        workdir = posixpath.normpath(run.workdir)
        if not workdir.startswith("/") or not (workdir == mount or
                                               workdir.startswith(mount + "/")):
            raise ConfigError(f"--workdir={run.workdir} is not under --mount-path="
                              f"{run.mount_path}: only the mounted volume is shared by the pods "
                              "and outlives them")
    for field, value in (("--grace-period", run.grace_period_s),
                         ("--max-restarts", run.max_restarts)):
        if value < 0:
            raise ConfigError(f"{field}={value} must be >= 0")
    for key, _ in run.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"--env {key}=...: not an environment variable name")
        if key.startswith("T5G2_") and run.target == "gpu":
            raise ConfigError(f"--env {key}: the manifest sets the T5G2_* variables of a GPU run")
    if run.target == "tpu":
        if not run.tpu_accelerator or not run.tpu_topology:
            raise ConfigError("--target=tpu needs --tpu-accelerator and --tpu-topology "
                              "(e.g. tpu-v5p-slice 2x2x4)")
        tpu = tpu_slice(run.tpu_accelerator, run.tpu_topology)
        if run.slices < 1:
            raise ConfigError(f"--slices={run.slices} must be >= 1")
        if run.slices > 1 and tpu.hosts == 1:
            raise ConfigError(f"--slices={run.slices}: multi-slice needs multi-host slices, and "
                              f"{run.tpu_accelerator} {run.tpu_topology} is one host")
    else:
        tpu = None
        if run.tpu_accelerator or run.tpu_topology or run.slices != 1:
            raise ConfigError("--tpu-accelerator, --tpu-topology and --slices are for "
                              "--target=tpu; a GPU run takes --gpu-nodes")
        if run.gpu_nodes < 1:
            raise ConfigError(f"--gpu-nodes={run.gpu_nodes} must be >= 1")
        if run.gpus_per_node not in (1, 2, 4, 8, 16):
            raise ConfigError(f"--gpus-per-node={run.gpus_per_node}: valid are 1, 2, 4, 8, 16")
        if not run.gpu_accelerator.startswith("nvidia-"):
            raise ConfigError(f"--gpu-accelerator={run.gpu_accelerator!r}: a GKE accelerator "
                              "label such as nvidia-h100-80gb")
    longest = longest_pod_name(run, tpu)
    if len(longest) > 63:
        raise ConfigError(f"--name={run.name!r} is too long: pod names such as {longest} must "
                          "stay within 63 characters")
    return tpu


def command(run: Run, granules: int) -> list[str]:
    """The container's command: launch.train, with dcn_data = slices / nodes unless given."""
    args = ["python", "-m", "launch.train", "--config", run.config, "--workdir", run.workdir]
    if granules > 1 and not any(re.match(r"--config\.mesh\.dcn_", a) for a in run.train_args):
        args.append(f"--config.mesh.dcn_data={granules}")
    return args + list(run.train_args)


def pod_failure_policy() -> dict:
    """Job level (evaluated in order, per failed pod): exit 2 fails the Job as a configuration
    error; exit 143 or the DisruptionTarget condition fails it as a preemption; anything else
    counts against backoffLimit 0, i.e. fails it with reason BackoffLimitExceeded. One pod ends
    its Job, as the others cannot go on without it."""
    def exit_rule(code):
        return {"action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [code]}}
    return {"rules": [
        exit_rule(USER_ERROR_EXIT_CODE),
        exit_rule(PREEMPTED_EXIT_CODE),
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def jobset_failure_policy(max_restarts: int) -> dict:
    """JobSet level, on the Job's failure reason and message (first matching rule): a
    configuration error fails the JobSet; a preemption recreates all pods without counting
    against maxRestarts; anything else recreates them at most `max_restarts` times.
    BlockingRecreate: new pods start only once the old ones are gone, so a restarted run never
    reads a checkpoint its predecessor is still writing."""
    return {
        "maxRestarts": max_restarts,
        "restartStrategy": "BlockingRecreate",
        "rules": [
            {"name": "configurationError", "action": "FailJobSet",
             "onJobFailureReasons": ["PodFailurePolicy"],
             "onJobFailureMessagePatterns": [EXIT_MESSAGE.format(code=USER_ERROR_EXIT_CODE)]},
            {"name": "preemption", "action": "RestartJobSetAndIgnoreMaxRestarts",
             "onJobFailureReasons": ["PodFailurePolicy"],
             "onJobFailureMessagePatterns": [
                 EXIT_MESSAGE.format(code=PREEMPTED_EXIT_CODE),
                 CONDITION_MESSAGE.format(condition="DisruptionTarget")]},
            {"name": "failure", "action": "RestartJobSet"},
        ],
    }


def workdir_volume(run: Run) -> tuple[dict | None, dict]:
    """The shared volume (the workdir's, unless that is a gs:// URL; inputs may live there too)
    and the pod annotations it needs; (None, {}) without one."""
    if run.bucket is None and run.pvc is None:
        return None, {}
    if run.pvc is not None:
        return {"name": "workdir", "persistentVolumeClaim": {"claimName": run.pvc}}, {}
    attributes = {"bucketName": run.bucket, "mountOptions": run.gcsfuse_mount_options}
    if run.target == "tpu":
        # TPU pods use the host's network; the driver then authenticates as the pod's
        # Kubernetes service account only when asked to.
        attributes["hostNetworkPodKSA"] = "true"
    annotations = {
        "gke-gcsfuse/volumes": "true",
        # No limits on the FUSE sidecar: it stages each written file on the node's disk before
        # uploading it, and checkpoint shards are large.
        "gke-gcsfuse/cpu-limit": "0",
        "gke-gcsfuse/memory-limit": "0",
        "gke-gcsfuse/ephemeral-storage-limit": "0",
    }
    volume = {"name": "workdir", "csi": {"driver": "gcsfuse.csi.storage.gke.io",
                                         "volumeAttributes": attributes}}
    return volume, annotations


def environment(run: Run) -> list[dict]:
    env: dict[str, str] = dict(GPU_ENV) if run.target == "gpu" else {}
    env.update(run.env)
    entries = [{"name": k, "value": v} for k, v in env.items()]
    if run.target == "gpu":
        entries += [
            {"name": "T5G2_COORDINATOR_ADDRESS", "value": coordinator_address(run)},
            {"name": "T5G2_NUM_PROCESSES", "value": str(run.gpu_nodes)},
            {"name": "T5G2_PROCESS_ID", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        ]
    return entries


def render(run: Run) -> list[dict]:
    """The manifest's documents (one JobSet)."""
    tpu = check(run)
    volume, annotations = workdir_volume(run)
    annotations["kubectl.kubernetes.io/default-container"] = CONTAINER
    if tpu is not None:
        hosts, replicas, granules = tpu.hosts, run.slices, run.slices
        resources = {"google.com/tpu": tpu.chips_per_host}
        selector = {"cloud.google.com/gke-tpu-accelerator": tpu.accelerator,
                    "cloud.google.com/gke-tpu-topology": tpu.topology}
        # 8471: TPU runtime, 8080: multi-slice (megascale), 8476: jax.distributed
        ports = [8471, 8080, COORDINATOR_PORT]
    else:
        hosts, replicas, granules = run.gpu_nodes, 1, run.gpu_nodes
        resources = {"nvidia.com/gpu": run.gpus_per_node}
        selector = {"cloud.google.com/gke-accelerator": run.gpu_accelerator}
        ports = [COORDINATOR_PORT]
    if run.spot:
        selector["cloud.google.com/gke-spot"] = "true"
    shm: dict = {"medium": "Memory"}
    if run.shm_size:
        shm["sizeLimit"] = run.shm_size
    container = {
        "name": CONTAINER,
        "image": run.image,
        "workingDir": "/t5g2",
        "command": command(run, granules),
        "env": environment(run),
        "ports": [{"containerPort": p} for p in ports],
        "resources": {"limits": resources},
        "volumeMounts": ([{"name": "workdir", "mountPath": run.mount_path}] if volume else [])
        + [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    pod_spec = {
        "restartPolicy": "Never",
        # SIGTERM -> the step ends, a checkpoint is saved, exit 143: the time that may take.
        "terminationGracePeriodSeconds": run.grace_period_s,
        "nodeSelector": selector,
        "containers": [container],
        "volumes": ([volume] if volume else []) + [{"name": "dshm", "emptyDir": shm}],
    }
    if run.service_account:
        pod_spec["serviceAccountName"] = run.service_account
    if tpu is not None:
        # DCN traffic between slices without the pod network's overlay (GKE's multi-slice setup)
        pod_spec["hostNetwork"] = True
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    metadata: dict = {"name": run.name, "labels": {"app.kubernetes.io/name": "t5g2"}}
    if tpu is not None:
        # one slice per node pool
        metadata["annotations"] = {
            "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
    jobset = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": metadata,
        "spec": {
            "network": {"enableDNSHostnames": True, "subdomain": run.name,
                        "publishNotReadyAddresses": True},
            "failurePolicy": jobset_failure_policy(run.max_restarts),
            "replicatedJobs": [{
                "name": replicated_job_name(run),
                "replicas": replicas,
                "template": {"spec": {
                    "completionMode": "Indexed",
                    "parallelism": hosts,
                    "completions": hosts,
                    "backoffLimit": 0,
                    "podFailurePolicy": pod_failure_policy(),
                    "template": {"metadata": {"annotations": annotations}, "spec": pod_spec},
                }},
            }],
        },
    }
    return [jobset]


def to_yaml(documents: Sequence[dict]) -> str:
    return yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=False, width=100)


def parse(argv: Sequence[str]) -> tuple[Run, str | None]:
    """The run and --out."""
    p = argparse.ArgumentParser(prog="python -m launch.gke", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, choices=("tpu", "gpu"))
    p.add_argument("--name", required=True, help="JobSet name (a DNS label)")
    p.add_argument("--image", required=True, help="container image built from ./Dockerfile")
    p.add_argument("--config", required=True, help="config file inside the image, e.g. "
                   "configs/t5g2_270m.py")
    p.add_argument("--workdir", required=True, help="run directory: a gs:// URL, or a path "
                   "under --mount-path")
    p.add_argument("--mount-path", default="/data", help="where the volume is mounted")
    volume = p.add_mutually_exclusive_group()
    volume.add_argument("--bucket", help="Cloud Storage bucket mounted with GCS FUSE "
                        "(hierarchical namespace, for atomic checkpoint renames)")
    volume.add_argument("--pvc", help="a ReadWriteMany PersistentVolumeClaim instead")
    p.add_argument("--gcsfuse-mount-options", default=GCSFUSE_MOUNT_OPTIONS)
    p.add_argument("--train-args", default="", help="more launch.train arguments, one string")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="a container variable (repeatable), e.g. XLA_FLAGS, LIBTPU_INIT_ARGS, "
                        "NCCL_*; replaces a default of the same name")
    p.add_argument("--service-account", help="Kubernetes service account (workload identity "
                   "with access to the bucket)")
    p.add_argument("--grace-period", type=int, default=300, dest="grace_period_s",
                   help="seconds between SIGTERM and SIGKILL (the SIGTERM checkpoint's time)")
    p.add_argument("--max-restarts", type=int, default=5,
                   help="restarts after failures other than preemptions")
    p.add_argument("--spot", action="store_true", help="schedule on Spot VMs")
    p.add_argument("--shm-size", help="size limit of /dev/shm (memory), e.g. 64Gi")
    p.add_argument("--tpu-accelerator", help=", ".join(TPU_ACCELERATORS))
    p.add_argument("--tpu-topology", help="e.g. 2x2x4 (v5p-32) or 4x4 (v5e-16)")
    p.add_argument("--slices", type=int, default=1, help="TPU slices (multi-slice over DCN)")
    p.add_argument("--gpu-nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-accelerator", default="nvidia-h100-80gb",
                   help="cloud.google.com/gke-accelerator label")
    p.add_argument("--out", help="write the manifest here instead of stdout")
    a = p.parse_args(argv)
    env = []
    for item in a.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
        env.append((key, value))
    fields = {f.name for f in dataclasses.fields(Run)}
    values = {k: v for k, v in vars(a).items() if k in fields}
    values.update(train_args=tuple(shlex.split(a.train_args)), env=tuple(env))
    return Run(**values), a.out


def main(argv: Sequence[str] | None = None) -> None:
    try:
        run, out = parse(sys.argv[1:] if argv is None else argv)
        text = to_yaml(render(run))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
