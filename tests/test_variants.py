"""The variant registry: real configs built on the meta device, LoRA target presets."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from wan_tune.models import VARIANTS, get_variant
from wan_tune.models.lora_targets import expand_targets
from wan_tune.models.variant_checks import architecture_mismatches
from wan_tune.models.variants import transformer_class

REAL = [v for v in VARIANTS.values() if not v.tiny]


@pytest.mark.parametrize("variant", REAL, ids=lambda v: v.name)
def test_real_variant_parameter_count_matches_design(variant):
    with torch.device("meta"):  # no memory: shapes only
        model = transformer_class(variant)(**variant.transformer)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / variant.expected_params - 1) < 0.01, f"{variant.name}: {count / 1e9:.3f} B"
    # The FLF2V repository spells it "-diffusers", the others "-Diffusers".
    # Wan2.2-VACE-Fun-A14B is alibaba-pai's model; its diffusers-format copy is a community conversion.
    owners = ("Wan-AI/Wan2.1-", "Wan-AI/Wan2.2-", "linoyts/Wan2.2-VACE-Fun")
    assert variant.hub_id.startswith(owners) and variant.hub_id.lower().endswith("-diffusers")


def test_i2v_variants_take_mask_and_condition_channels():
    for v in VARIANTS.values():
        if v.vae_z_dim == 16:
            assert v.in_channels == (36 if v.is_i2v else 16)
        # CLIP image tokens: Wan2.1 I2V only (Wan2.2 A14B I2V conditions on latents alone).
        assert v.clip_image_tokens == (v.is_i2v and not v.two_experts)


def test_wan22_facts_from_the_diffusers_pipelines():
    """Pinned from diffusers' Wan conversion script (the hub pipelines' model_index / scheduler)."""
    ti2v, t2v, i2v = (get_variant(n) for n in ("wan2.2-ti2v-5b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b"))
    assert (ti2v.vae_z_dim, ti2v.in_channels, ti2v.transformer["out_channels"], ti2v.expand_timesteps) == (48, 48, 48, True)
    assert (ti2v.flow_shift, ti2v.fps, ti2v.resolution, ti2v.frames, ti2v.two_experts) == (5.0, 24, (704, 1280), 121, False)
    assert (t2v.boundary_ratio, i2v.boundary_ratio, t2v.flow_shift, i2v.flow_shift) == (0.875, 0.9, 3.0, 3.0)
    assert t2v.experts == i2v.experts == ("transformer", "transformer_2")
    assert (t2v.in_channels, i2v.in_channels, i2v.clip_image_tokens) == (16, 36, False)
    # The high-noise expert owns the boundary itself and everything above it.
    assert [t2v.expert_for(s) for s in (0.99, 0.875, 0.874, 0.1)] == ["transformer", "transformer", "transformer_2", "transformer_2"]
    assert t2v.expert_for(0.85, boundary_ratio=0.8) == "transformer" and ti2v.expert_for(0.1) == "transformer"


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(KeyError, match="wan2.1-t2v-1.3b"):
        get_variant("wan9")


def test_architecture_mismatch_names_the_differing_keys():
    t2v, i2v = get_variant("tiny"), get_variant("tiny-i2v")
    problems = architecture_mismatches(t2v, dict(i2v.transformer))
    assert any(p.startswith("in_channels") for p in problems)
    assert architecture_mismatches(t2v, dict(t2v.transformer)) == []


def test_target_presets_expand_to_real_module_names():
    i2v = get_variant("tiny-i2v")
    model = WanTransformer3DModel(**i2v.transformer)
    names = [n for n, _ in model.named_modules()]
    targets = expand_targets(["attention", "ffn", "attn1.to_q"], i2v)
    assert targets.count("attn1.to_q") == 1  # explicit names already in a preset are not repeated
    assert "attn2.add_k_proj" in targets  # the I2V image branch belongs to cross-attention
    for t in targets:  # every suffix names a Linear in each block, never anything else
        hits = [n for n in names if n.endswith("." + t)]
        assert len(hits) == i2v.transformer["num_layers"], t
        assert all(isinstance(model.get_submodule(h), torch.nn.Linear) for h in hits)
    assert "attn2.add_k_proj" not in expand_targets(["attention"], get_variant("tiny"))
