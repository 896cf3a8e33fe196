"""Train a T5Gemma 2 from a config file, on one host or as one process of a multi-host job.

    python -m launch.train --config configs/tiny.py --workdir /tmp/t5g2_tiny
    python -m launch.train --config configs/t5g2_270m.py --config.mesh.fsdp=8 --workdir /mnt/runs/a

Multi-host: every process runs this same command; `jax.distributed` is initialised from the
environment (T5G2_CLUSTER, TPU VM metadata, Slurm variables, or T5G2_COORDINATOR_ADDRESS /
T5G2_NUM_PROCESSES / T5G2_PROCESS_ID), see launch/README.md. The workdir is a local or mounted
path (object-store URLs are not supported yet).
"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

from t5g2 import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for metrics and checkpoints")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    distributed.initialize()
    from t5g2.train import loop  # after jax.distributed, which must precede other JAX calls

    metrics = loop.train(_CONFIG.value, _WORKDIR.value)
    logging.info("final metrics: %s", loop.summary(metrics))


if __name__ == "__main__":
    app.run(main)
