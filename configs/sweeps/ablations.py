"""The paper's architecture ablations on the tiny config: tied embeddings and merged attention
(the baseline), untied embeddings, separate cross-attention, and global-only cross-attention.

    python -m launch.sweep --sweep configs/sweeps/ablations.py --workdir workdir/ablations

The common overrides shorten each run so the whole sweep finishes in a few minutes on a
2-core CPU: held-out loss per denoiser every 25 steps and at the end, no greedy samples.
"""

from t5g2.sweep.spec import sweep


def get_sweep():
    return sweep(
        "ablations", "configs/tiny.py",
        members=[
            {},  # tied embeddings + merged attention (the paper's choice)
            {"model.tie_embeddings": False},
            {"model.cross_attention": "separate"},
            {"model.cross_attention": "global_only"},
        ],
        common={"train.steps": 100, "train.log_every": 10, "checkpoint.every": 50,
                "eval.every": 25, "eval.samples": 0},
    )
