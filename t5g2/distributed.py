"""Multi-controller start-up: `jax.distributed.initialize` from the environment.

Every process of a job runs the same program. Which cluster it is in is read from the
environment, in this order:
- explicit: T5G2_COORDINATOR_ADDRESS (host:port), T5G2_NUM_PROCESSES, T5G2_PROCESS_ID
  (GKE GPU jobs, bare metal, and the 2-process localhost test);
- Slurm: SLURM_JOB_ID with SLURM_NTASKS > 1 (JAX reads the Slurm variables itself);
- Cloud TPU pod slices / GKE TPU: TPU_WORKER_HOSTNAMES or MEGASCALE_COORDINATOR_ADDRESS (JAX reads
  the TPU metadata itself);
- otherwise a single process: nothing to initialise.
On CPU, cross-process collectives use gloo.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def cluster_kind(env=os.environ) -> str:
    if env.get("T5G2_COORDINATOR_ADDRESS"):
        return "explicit"
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return "single"


def initialize(env=os.environ) -> str:
    """Initialises jax.distributed as the environment says; returns the cluster kind."""
    kind = cluster_kind(env)
    if kind == "single":
        return kind
    if jax.config.jax_platforms in (None, "", "cpu") or env.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if kind == "explicit":
        missing = [v for v in ("T5G2_NUM_PROCESSES", "T5G2_PROCESS_ID") if v not in env]
        if missing:
            raise ValueError(f"T5G2_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not")
        jax.distributed.initialize(coordinator_address=env["T5G2_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["T5G2_NUM_PROCESSES"]),
                                   process_id=int(env["T5G2_PROCESS_ID"]))
    else:
        jax.distributed.initialize()  # JAX detects Slurm / TPU itself
    log.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", kind,
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return kind
