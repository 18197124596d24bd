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
# VACE: every Linear of the VACE blocks (attention, ffn, and the hint projections in and out).
VACE_PRESET = "vace_blocks"
_VACE_LINEARS = PRESETS["attention"] + PRESETS["ffn"] + ("proj_in", "proj_out")
# Wan2.2-Animate: the face adapters' projections (queries of the tokens, keys and values of the face's
# motion tokens, output), which add the face's expression to the stream after every 5th block.
FACE_PRESET = "face_adapters"
FACE_LINEARS = ("to_q", "to_k", "to_v", "to_out")
PRESET_NAMES = (*PRESETS, VACE_PRESET, FACE_PRESET)


def expand_targets(targets: list[str], variant: Variant) -> list[str]:
    """Module-name suffixes for peft's `target_modules`, presets expanded, order kept, no repeats.

    On a VACE model a preset's suffix (`attn1.to_q`) would match the VACE blocks too, so presets
    name the main blocks' modules in full (`blocks.3.attn1.to_q`), and `vace_blocks` theirs: each
    trains alone or both together."""
    out: list[str] = []
    for t in targets:
        names = PRESETS.get(t, (t,))
        if variant.is_i2v and t in ("attention", "cross_attention"):
            names = names + _I2V_EXTRA
        if t == FACE_PRESET:
            names = tuple(f"face_adapter.{i}.{n}" for i in range(variant.face_adapters) for n in FACE_LINEARS)
        elif t == VACE_PRESET:
            names = tuple(f"vace_blocks.{i}.{n}" for i in range(variant.vace_blocks)
                          for n in _VACE_LINEARS if i == 0 or n != "proj_in")  # only the first projects in
        elif variant.vace and t in PRESETS:
            names = tuple(f"blocks.{i}.{n}" for i in range(variant.transformer["num_layers"]) for n in names)
        out.extend(n for n in names if n not in out)
    return out


def module_widths(variant: Variant) -> dict[str, tuple[int, int] | None]:
    """Every module of the variant's transformer a LoRA can target, by diffusers name:
    (in_features, out_features) of each Linear, None for the patch embedding (a Conv3d).
    Derived from the config, so `wan-tune check` needs no model; a test compares it with the
    modules of each variant built on the meta device."""
    c = variant.transformer
    inner, ffn = variant.inner_dim, c["ffn_dim"]
    patch = c["patch_size"][0] * c["patch_size"][1] * c["patch_size"][2]
    out: dict[str, tuple[int, int] | None] = {
        "patch_embedding": None,
        "condition_embedder.time_embedder.linear_1": (c["freq_dim"], inner),
        "condition_embedder.time_embedder.linear_2": (inner, inner),
        "condition_embedder.time_proj": (inner, 6 * inner),
        "condition_embedder.text_embedder.linear_1": (c["text_dim"], inner),
        "condition_embedder.text_embedder.linear_2": (inner, inner),
    }
    if c.get("image_dim"):
        out["condition_embedder.image_embedder.ff.net.0.proj"] = (c["image_dim"], c["image_dim"])
        out["condition_embedder.image_embedder.ff.net.2"] = (c["image_dim"], inner)
    block = {f"attn{n}.{m}": (inner, inner) for n in (1, 2) for m in _QKVO}
    if c.get("added_kv_proj_dim"):
        block.update({m: (c["added_kv_proj_dim"], inner) for m in _I2V_EXTRA})
    block.update({"ffn.net.0.proj": (inner, ffn), "ffn.net.2": (ffn, inner)})
    for i in range(c["num_layers"]):
        out.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    for i in range(variant.vace_blocks):
        out.update({f"vace_blocks.{i}.{name}": shape for name, shape in block.items()})
        out.update({f"vace_blocks.{i}.proj_in": (inner, inner)} if i == 0 else {})
        out[f"vace_blocks.{i}.proj_out"] = (inner, inner)
    if "vace_layers" in c:
        out["vace_patch_embedding"] = None
    for i in range(variant.face_adapters):  # the face encoder hands the adapters motion tokens of the stream's width
        out.update({f"face_adapter.{i}.{n}": (inner, inner) for n in FACE_LINEARS})
    out["proj_out"] = (inner, c["out_channels"] * patch)
    return out


def matching(target: str, modules) -> list[str]:
    """The modules a `target_modules` entry picks: peft matches it as a whole dotted suffix."""
    return [m for m in modules if m == target or m.endswith(f".{target}")]
