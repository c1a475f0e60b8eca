"""Model: config and presets, the decoder, the checkpoint format, format adapters."""

from chipshift.model.config import PRESETS, ModelConfig, preset
from chipshift.model.transformer import Transformer, build_model

__all__ = ["ModelConfig", "PRESETS", "preset", "Transformer", "build_model"]
