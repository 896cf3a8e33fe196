"""The T5Gemma 2 model (text path) in Flax NNX."""

from t5g2.model.config import ConfigError, ModelConfig, StackConfig
from t5g2.model.transformer import T5Gemma2

__all__ = ["ConfigError", "ModelConfig", "StackConfig", "T5Gemma2"]
