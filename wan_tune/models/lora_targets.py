"""Which transformer modules a LoRA preset names, in diffusers module names.

peft matches `target_modules` entries as suffixes of module paths, so `attn1.to_q` picks the
self-attention query of every block and nothing in the embedders.
"""

from __future__ import annotations

from .variants import Variant

_QKVO = ("to_q", "to_k", "to_v", "to_out.0")

PRESETS: dict[str, tuple[str, ...]] = {
    "self_attention": tuple(f"attn1.{m}" for m in _QKVO),
    "cross_attention": tuple(f"attn2.{m}" for m in _QKVO),
    "attention": tuple(f"attn{i}.{m}" for i in (1, 2) for m in _QKVO),
    "ffn": ("ffn.net.0.proj", "ffn.net.2"),
}
# Wan2.1 I2V: the image branch of cross-attention belongs to the cross-attention presets.
_I2V_EXTRA = ("attn2.add_k_proj", "attn2.add_v_proj")


def expand_targets(targets: list[str], variant: Variant) -> list[str]:
    """Module-name suffixes for peft's `target_modules`, presets expanded, order kept, no repeats."""
    out: list[str] = []
    for t in targets:
        names = PRESETS.get(t, (t,))
        if variant.is_i2v and t in ("attention", "cross_attention"):
            names = names + _I2V_EXTRA
        out.extend(n for n in names if n not in out)
    return out
