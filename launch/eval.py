"""Held-out loss and token accuracy per denoiser of a training run's checkpoint, as JSON.

    python -m launch.eval --workdir workdir/tiny [--step 300]

Reads the step's parameters (not the optimizer state) with the config the run recorded, on the
run's mesh (as many devices as it had, or a mesh whose -1 axis absorbs them), and evaluates the
same held-out batches the run logs as `eval/<denoiser>/loss` and `eval/<denoiser>/accuracy`: the
figures equal those in its metrics.jsonl at that step. The run must have held documents out
(`eval.holdout_documents` or `eval.source_paths`; configs/base.py).
"""

from __future__ import annotations

import json

from absl import flags

from launch import cli

_WORKDIR = flags.DEFINE_string("workdir", None,
                               "the training run's workdir (a path or a gs:// URL)")
_STEP = flags.DEFINE_integer("step", None, "the checkpoint step (default: the latest)")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    cli.setup_logging()
    from t5g2.train.eval import evaluate_checkpoint

    result = evaluate_checkpoint(_WORKDIR.value, _STEP.value)
    print(json.dumps({"step": result.step, **result.metrics}, indent=2), flush=True)


if __name__ == "__main__":
    cli.run(main)
