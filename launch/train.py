"""Train a T5Gemma 2 from a config file, on one host or as one process of a multi-host job.

    python -m launch.train --config configs/tiny.py --workdir /tmp/t5g2_tiny
    python -m launch.train --config configs/t5g2_270m.py:text --config.mesh.fsdp=8 --workdir /mnt/a
    python -m launch.train --config configs/t5g2_270m.py --workdir gs://bucket/runs/b \
        --config.init.from_gemma3=/mnt/gemma-3-270m --config.init.vision_from=/mnt/t5gemma-2-270m

A workdir that holds checkpoints resumes from the latest, so after a preemption the same command
continues the run. On SIGTERM the run saves a checkpoint at the next step boundary and exits with
status 143 (128 + SIGTERM), so schedulers restart it rather than count it finished.

Multi-host: every process runs this same command; `jax.distributed` is initialised from the
environment (T5G2_CLUSTER, TPU VM metadata, Slurm variables, or T5G2_COORDINATOR_ADDRESS /
T5G2_NUM_PROCESSES / T5G2_PROCESS_ID), see launch/README.md. The workdir is a local or mounted
path shared by all processes, or an object-store URL (gs://bucket/run): config.json, metrics and
TensorBoard files go through etils.epath (`t5g2/fs.py`), checkpoints through orbax and tensorstore
(gs:// checkpoints also need `pip install google-cloud-storage`).
"""

from __future__ import annotations

import logging
import sys

from absl import flags
from ml_collections import config_flags

from launch import cli
from t5g2 import distributed, fs

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for metrics and checkpoints")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    cli.setup_logging()
    distributed.initialize()
    import jax

    from t5g2.train import loop  # after jax.distributed, which must precede other JAX calls
    from t5g2.train.preemption import PREEMPTED_EXIT_CODE

    workdir = fs.absolute(_WORKDIR.value)  # a URL stays a URL
    result = loop.train(_CONFIG.value, workdir)
    logging.info("final metrics: %s", loop.summary(result.metrics))  # every process
    if jax.process_index() == 0:
        if result.samples:
            print("\ngreedy samples on held-out inputs (eval.samples):")
            print("\n".join(sample.render() for sample in result.samples))
        print(f"\nstopped at step {result.step}{' (preempted)' if result.preempted else ''}\n"
              f"  workdir      {workdir}\n"
              f"  checkpoint   {result.checkpoint or 'none written'}\n"
              f"  metrics      {fs.join(workdir, 'metrics.jsonl')}\n"
              f"  tensorboard  tensorboard --logdir {fs.join(workdir, 'tensorboard')}\n"
              f"  export       python -m launch.export --workdir {workdir} --out <hf_dir>",
              flush=True)
    if result.preempted:
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    cli.run(main)
