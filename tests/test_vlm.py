"""The VLM captioner on a tiny random-init Qwen2-VL built locally: real load, processing and generate."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data_prep.vlm import CaptionModelError, VLMCaptioner, save_tiny_vlm

MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("vlm") / "vlm")


def _clips() -> list[list[Image.Image]]:
    """Two 4-frame clips and a still, 64x64 random-colour frames.

    The still comes second so that with batch_size=2 it shares a batch with a longer clip and
    gets padded: that is what the batch-invariance check exercises.
    """
    rng = np.random.default_rng(0)

    def frame():
        return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")

    return [[frame() for _ in range(4)], [frame()], [frame() for _ in range(4)]]


def test_captions_are_per_clip_deterministic_and_batch_invariant(tiny_vlm):
    clips = _clips()
    captioner = VLMCaptioner(str(tiny_vlm), "describe the clip .", max_new_tokens=MAX_NEW_TOKENS, batch_size=2)

    captions = captioner.caption(clips)
    assert len(captions) == len(clips)
    for caption in captions:
        assert isinstance(caption, str) and caption
        assert caption == caption.strip() and "\n" not in caption
        assert len(caption.split()) <= MAX_NEW_TOKENS  # word-level tokenizer: one word per token
    # The frames reach the model: different clips give different (gibberish) captions.
    assert len(set(captions)) > 1

    assert captioner.caption(clips) == captions
    # Left padding + attention mask: a clip's greedy tokens don't depend on its batch-mates.
    one_by_one = VLMCaptioner(str(tiny_vlm), "describe the clip .", max_new_tokens=MAX_NEW_TOKENS, batch_size=1)
    assert one_by_one.caption(clips) == captions


def test_hub_id_not_available_offline_says_how_to_fetch_it():
    with pytest.raises(CaptionModelError) as err:
        VLMCaptioner("Qwen/Qwen2.5-VL-7B-Instruct", "describe")
    message = str(err.value)
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in message
    assert "hf download" in message and "caption.vlm_model" in message
    assert "Traceback" not in message


def test_missing_local_folder_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(CaptionModelError, match="caption.vlm_model") as err:
        VLMCaptioner(str(missing), "describe")
    assert str(missing) in str(err.value)
