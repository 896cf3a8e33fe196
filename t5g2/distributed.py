"""Multi-controller start-up: `jax.distributed.initialize` from the environment.

Every process of a job runs the same program. Which cluster it is in is read from the
environment, in this order:
- T5G2_CLUSTER=explicit|slurm|tpu|single forces a kind (`auto` or unset: detect). Cloud TPU VM
  pod slices started over ssh need `T5G2_CLUSTER=tpu` (launch/tpu_vm.sh sets it): their topology
  is in the VM metadata, not in environment variables;
- explicit: T5G2_COORDINATOR_ADDRESS (host:port), T5G2_NUM_PROCESSES, T5G2_PROCESS_ID
  (GKE GPU jobs, bare metal, and the 2-process localhost test);
- Slurm: SLURM_JOB_ID with SLURM_NTASKS > 1. With one task per node the task owns all of the
  node's devices (coordinator, process count and id are read from the Slurm variables here);
  with several tasks per node JAX's own Slurm detection gives each task one GPU
  (local device SLURM_LOCALID);
- Cloud TPU pod slices on GKE: TPU_WORKER_HOSTNAMES (more than one host) or
  MEGASCALE_COORDINATOR_ADDRESS (JAX reads the TPU metadata itself);
- otherwise a single process: nothing to initialise.
A missing or invalid variable is a ConfigError (launch scripts print it as one line).
On CPU, cross-process collectives use gloo.
"""

from __future__ import annotations

import logging
import os
import re

import jax

from t5g2.configlib import ConfigError

log = logging.getLogger(__name__)

KINDS = ("explicit", "slurm", "tpu", "single")


def cluster_kind(env=os.environ) -> str:
    forced = env.get("T5G2_CLUSTER", "").strip().lower()
    if forced and forced != "auto":
        if forced not in KINDS:
            raise ConfigError(f"T5G2_CLUSTER={env['T5G2_CLUSTER']!r}: valid are auto, "
                             + ", ".join(KINDS))
        return forced
    if env.get("T5G2_COORDINATOR_ADDRESS"):
        return "explicit"
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return "single"


def slurm_first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'node[001-004],gpu7' -> 'node001'."""
    m = re.match(r"([^,\[]*)(?:\[([^,\-\]]*))?", nodelist.strip())
    return m.group(1) + (m.group(2) or "")


def slurm_one_task_per_node(env=os.environ) -> dict | None:
    """jax.distributed.initialize arguments for a Slurm step with one task per node, else None.

    JAX's own Slurm detection restricts each task to the one local device SLURM_LOCALID (one task
    per GPU); with one task per node that would be GPU 0 alone, so the arguments are computed here
    (the same coordinator and port JAX would choose) and every local device stays visible.
    """
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", "1"))
    nnodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES")
                 or env.get("SLURM_JOB_NUM_NODES") or 0)
    if ntasks != nnodes:
        return None
    missing = [v for v in ("SLURM_PROCID", "SLURM_STEP_NODELIST") if v not in env]
    if missing:
        raise ConfigError(f"Slurm job with {ntasks} tasks but {', '.join(missing)} is not set: "
                         "start every task with srun (or set T5G2_CLUSTER=single)")
    port = env.get("JAX_COORDINATOR_PORT") or str(int(env["SLURM_JOB_ID"]) % 4096 + 61440)
    return dict(coordinator_address=f"{slurm_first_host(env['SLURM_STEP_NODELIST'])}:{port}",
                num_processes=ntasks, process_id=int(env["SLURM_PROCID"]))


def initialize(env=os.environ) -> str:
    """Initialises jax.distributed as the environment says; returns the cluster kind."""
    kind = cluster_kind(env)
    if kind == "single":
        return kind
    if jax.config.jax_platforms in (None, "", "cpu") or env.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if kind == "explicit":
        missing = [v for v in ("T5G2_COORDINATOR_ADDRESS", "T5G2_NUM_PROCESSES",
                               "T5G2_PROCESS_ID") if not env.get(v)]
        if missing:
            raise ConfigError(f"explicit cluster: {', '.join(missing)} is not set (all of "
                             "T5G2_COORDINATOR_ADDRESS, T5G2_NUM_PROCESSES, T5G2_PROCESS_ID are "
                             "needed)")
        # No auto-detection: inside a Slurm/MPI/Kubernetes environment JAX would otherwise still
        # restrict each process to one local device.
        jax.distributed.initialize(coordinator_address=env["T5G2_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["T5G2_NUM_PROCESSES"]),
                                   process_id=int(env["T5G2_PROCESS_ID"]),
                                   cluster_detection_method="deactivate")
    elif kind == "slurm" and (args := slurm_one_task_per_node(env)) is not None:
        jax.distributed.initialize(**args, cluster_detection_method="deactivate")
    else:
        jax.distributed.initialize()  # JAX detects Slurm (a device per task) / TPU itself
    log.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", kind,
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return kind
