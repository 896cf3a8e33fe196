"""t5g2: T5Gemma 2 encoder-decoders adapted from Gemma 3, in JAX / Flax NNX."""
