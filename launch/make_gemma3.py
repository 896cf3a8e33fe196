"""Write a random Gemma 3 checkpoint shaped like a config's decoder stack and vocabulary.

    python -m launch.make_gemma3 --config configs/tiny.py --out workdir/tiny_gemma3 [--seed 0]
        [--rope=published]

A stand-in for a real Gemma 3 download, so the adaptation path (`--config.init.from_gemma3=DIR`)
runs end to end anywhere: the same files `Gemma3ForCausalLM.save_pretrained` writes (config.json,
safetensors shards and their index when larger than --max_shard_mb), deterministic by seed, with
neither torch nor transformers. Weights are a freshly initialised t5g2 decoder (the model's own
initialiser) with random norm scales, so no weight is trivially zero. RoPE is the config's
(--rope=config), or the form Gemma 3 270M and 1B are published in (--rope=published: no scaling,
32K context), which the adaptation then replaces by the config's, as with a real download.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from flax import nnx

from t5g2.convert import checkpoint_files, gemma3
from t5g2.model import ModelConfig, T5Gemma2
from t5g2.model.params import flat_params

NORM_SCALE_STD = 0.1  # norms apply (1 + w): small random w keeps them near identity, not at it


def random_gemma3(cfg: ModelConfig, seed: int,
                  rope: str = "config") -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json, state dict) of a random Gemma 3 causal LM shaped like `cfg`'s decoder, with
    RoPE per `rope` (one of gemma3.ROPE_FORMS; the weights do not depend on it)."""
    # Merged attention: the decoder is exactly a Gemma 3 stack, with no cross-attention weights.
    cfg = dataclasses.replace(cfg, cross_attention="merged", param_dtype="float32")
    flat = flat_params(T5Gemma2(cfg, rngs=nnx.Rngs(seed)))
    rng = np.random.default_rng(seed)
    flat = {k: (rng.normal(0.0, NORM_SCALE_STD, v.shape).astype(v.dtype)
                if k.endswith("norm/scale") else v) for k, v in flat.items()}
    return gemma3.to_gemma3_config(cfg, rope=rope), gemma3.to_gemma3_state_dict(flat, cfg)


def make_gemma3(cfg: ModelConfig, out: str, *, seed: int = 0, max_shard_bytes: int | None = None,
                overwrite: bool = False, rope: str = "config") -> list[str]:
    """Writes the checkpoint to `out`; returns the file names. A non-empty `out` is refused
    unless `overwrite`."""
    checkpoint_files.require_empty(out, overwrite)
    config, state_dict = random_gemma3(cfg, seed, rope)
    return checkpoint_files.write_checkpoint(out, state_dict, config, max_shard_bytes)


def main(argv) -> None:
    del argv
    cfg = ModelConfig.from_config_dict(_CONFIG.value.model)
    max_bytes = int(_MAX_SHARD_MB.value * 1e6) if _MAX_SHARD_MB.value > 0 else None
    files = make_gemma3(cfg, _OUT.value, seed=_SEED.value, max_shard_bytes=max_bytes,
                        overwrite=_OVERWRITE.value, rope=_ROPE.value)
    d = cfg.decoder
    size = sum(os.path.getsize(os.path.join(_OUT.value, f)) for f in files)
    print(f"wrote a random Gemma 3 (seed {_SEED.value}: {d.num_layers} layers, d_model "
          f"{d.d_model}, vocab {cfg.vocab_size}, {_ROPE.value} RoPE) to {_OUT.value}: "
          f"{', '.join(files)} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    # Flags are defined here, not at import, so tests can import this module beside others that
    # define --config.
    from absl import flags
    from ml_collections import config_flags

    from launch import cli

    _CONFIG = config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)",
                                              lock_config=True)
    _OUT = flags.DEFINE_string("out", None, "the Gemma 3 checkpoint directory to write")
    _SEED = flags.DEFINE_integer("seed", 0, "random seed (the same seed writes the same weights)")
    # Small by default so the stand-in takes the sharded path a real Gemma 3 download takes.
    _MAX_SHARD_MB = flags.DEFINE_float("max_shard_mb", 1.0,
                                       "safetensors shard size limit in MB (0: one file)")
    _OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace a non-empty --out directory")
    _ROPE = flags.DEFINE_enum("rope", "config", gemma3.ROPE_FORMS,
                              "config: the config's RoPE; published: as Gemma 3 270M and 1B are "
                              "published (rope_scaling null, theta 1e4 local / 1e6 global, 32K "
                              "context), which the adaptation replaces by the config's")
    flags.mark_flags_as_required(["config", "out"])
    cli.run(main)
