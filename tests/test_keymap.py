"""Original <-> diffusers key names agree with diffusers' own single-file converter."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from wan_tune.models import VARIANTS
from wan_tune.models.keymap import UnmappedKeyError, state_dict_to_original, to_diffusers, to_original


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.1-i2v-14b-480p", "tiny-i2v"])
def test_every_key_round_trips_through_diffusers_converter(name):
    with torch.device("meta"):
        model = WanTransformer3DModel(**VARIANTS[name].transformer)
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
    with pytest.raises(UnmappedKeyError):
        to_original("blocks.0.attn1.to_qq")
