"""Model-family knowledge: the Wan variants (`variants`), where their weights live and how they
load (`loading`), their key names (`keymap`), LoRA target presets and the tiny test model.

This package's root imports nothing heavy, so `wan-tune check` answers before torch loads.
"""

from .variants import VARIANTS, Variant, get_variant

__all__ = ["VARIANTS", "Variant", "get_variant"]
