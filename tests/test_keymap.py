"""Original <-> diffusers key names agree with diffusers' own single-file converter."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from wan_tune.models import VARIANTS
from wan_tune.models.keymap import UnmappedKeyError, state_dict_to_original, to_diffusers, to_original
from wan_tune.models.variants import transformer_class


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.1-i2v-14b-480p", "tiny-i2v", "wan2.1-vace-1.3b", "tiny-vace"])
def test_every_key_round_trips_through_diffusers_converter(name):
    with torch.device("meta"):
        model = transformer_class(VARIANTS[name])(**VARIANTS[name].transformer)
    ours = state_dict_to_original(model.state_dict())
    assert len(ours) == len(model.state_dict())
    back = convert_wan_transformer_to_diffusers(dict(ours))
    assert sorted(back) == sorted(model.state_dict())
    assert all(to_diffusers(k) in model.state_dict() for k in ours)


def test_known_names():
    assert to_original("blocks.3.attn1.to_out.0") == "blocks.3.self_attn.o"
    assert to_original("blocks.0.attn2.add_k_proj.weight") == "blocks.0.cross_attn.k_img.weight"
    assert to_original("blocks.12.ffn.net.0.proj") == "blocks.12.ffn.0"
    assert to_original("blocks.1.norm2.bias") == "blocks.1.norm3.bias"
    assert to_diffusers("head.modulation") == "scale_shift_table"
    # VACE, as ComfyUI's Wan VACE model names its blocks' hint projections.
    assert to_original("vace_blocks.0.proj_in.weight") == "vace_blocks.0.before_proj.weight"
    assert to_original("vace_blocks.7.proj_out") == "vace_blocks.7.after_proj"
    assert to_original("vace_blocks.2.attn1.to_q") == "vace_blocks.2.self_attn.q"
    with pytest.raises(UnmappedKeyError):
        to_original("blocks.0.attn1.to_qq")
