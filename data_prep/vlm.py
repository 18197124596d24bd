"""Caption clips with a local Qwen2-VL / Qwen2.5-VL model.

A clip's sampled frames go in as several images in one user turn rather than as a video: that
keeps us on the PIL image processor and lets one code path handle stills and clips alike. The
video processor needs torchvision, which this environment must not have; transformers' own
Qwen2-VL processor insists on building one (AutoProcessor raises "Qwen2VLVideoProcessor requires
the Torchvision library"), so Qwen models load through `ImageOnlyQwen2VLProcessor` below.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from transformers import Qwen2VLProcessor

# The Qwen2-VL chat template, trimmed to what captioning uses (text and image parts); only the
# tiny test model ships it, real checkpoints bring their own.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class CaptionModelError(RuntimeError):
    """The captioning model could not be loaded; the message says what to do about it."""


def _is_hub_id(model: str) -> bool:
    # An existing or path-like name is a local folder; only a bare "owner/name" is a hub id.
    path_like = model.startswith(("/", ".", "~")) or model.count("/") != 1
    return not path_like and not Path(model).expanduser().exists()


def _fetch_help(model: str) -> str:
    if _is_hub_id(model):
        hub_id, folder = model, f"/models/{model.split('/')[-1]}"
    else:
        hub_id, folder = "<hub-id>", str(Path(model).expanduser().absolute())
    return (
        f"download it on a machine with access (`hf download {hub_id} --local-dir {folder}`), "
        f"copy the folder here, and set the recipe key `caption.vlm_model={folder}`"
    )


def _resolve(model: str) -> Path:
    """A local folder for `model`: the folder itself, or the hub snapshot (cached or fetched)."""
    if not _is_hub_id(model):
        path = Path(model).expanduser().absolute()
        if not (path / "config.json").is_file():
            raise CaptionModelError(
                f"caption model folder {path} does not exist or has no config.json; {_fetch_help(model)}"
            )
        return path
    from huggingface_hub import snapshot_download

    try:
        # Offline (HF_HUB_OFFLINE=1 or no network) this fails fast unless the snapshot is cached.
        return Path(snapshot_download(model))
    except Exception as e:  # noqa: BLE001 - every failure here means "not available", same fix
        raise CaptionModelError(
            f"caption model {model!r} is not available on this machine (offline and not in the "
            f"Hugging Face cache: {type(e).__name__}); {_fetch_help(model)}"
        ) from None


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without the video processor (the only torchvision-bound part).

    ProcessorMixin derives its sub-processors from the `__init__` signature, so dropping
    `video_processor` from it is what makes `from_pretrained` skip loading one. Qwen2.5-VL's
    processor treats images identically, so this serves both.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def _load(folder: Path, dtype):
    import transformers

    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    qwen = {
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
    }
    if model_type in qwen:
        processor, model_cls = ImageOnlyQwen2VLProcessor, qwen[model_type]
    else:  # other image-text-to-text models: best effort through the auto classes
        processor, model_cls = transformers.AutoProcessor, transformers.AutoModelForImageTextToText
    return processor.from_pretrained(folder), model_cls.from_pretrained(folder, dtype=dtype)


class VLMCaptioner:
    def __init__(
        self,
        model: str,
        prompt: str,
        max_new_tokens: int = 120,
        batch_size: int = 4,
        device: str = "cpu",
        dtype=torch.float32,
    ):
        folder = _resolve(str(model))
        try:
            self.processor, vlm = _load(folder, dtype)
        except Exception as e:  # noqa: BLE001 - e.g. a partial download; report it in one line
            reason = (str(e).strip().splitlines() or [""])[0]
            raise CaptionModelError(
                f"could not load caption model from {folder} ({type(e).__name__}: {reason}); "
                f"it must be a complete Qwen2-VL / Qwen2.5-VL folder: {_fetch_help(str(model))}"
            ) from None
        self.model = vlm.to(device).eval()
        # Batched generation appends new tokens on the right, so prompts must be padded on the left.
        self.processor.tokenizer.padding_side = "left"
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.device = device

    @torch.inference_mode()
    def caption(self, clips: list[list[Image.Image]]) -> list[str]:
        """One caption per clip; a clip is its sampled RGB frames (one frame for a still)."""
        captions: list[str] = []
        for i in range(0, len(clips), self.batch_size):
            captions += self._caption_batch(clips[i : i + self.batch_size])
        return captions

    def _caption_batch(self, clips: list[list[Image.Image]]) -> list[str]:
        # One user turn per clip: an image placeholder per frame, then the instruction.
        prompt = {"type": "text", "text": self.prompt}
        texts = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}] * len(frames) + [prompt]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for frames in clips
        ]
        images = [frame.convert("RGB") for frames in clips for frame in frames]
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.device)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        decoded = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [" ".join(text.split()) for text in decoded]


def save_tiny_vlm(path, seed: int = 0) -> Path:
    """Write a tiny random-init Qwen2-VL model + processor folder, for tests (no downloads).

    It generates gibberish, but loading, image processing, placeholder expansion, the vision
    tower and batched generation all run the real code paths.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    path = Path(path)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>", "<unk>"]  # fmt: skip
    words = ["user", "assistant", "system", "a", "the", "clip", "video", "image", "shows", "of", "person",
             "walking", "car", "red", "blue", "slowly", "describe", ".", ",", "\n"]  # fmt: skip
    vocab = {tok: i for i, tok in enumerate(special + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=special[1:7],
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(path)
    # Saved piecewise, as in a hub snapshot: the processor class itself can't be built here.
    tokenizer.save_pretrained(path)
    # 28x28..56x56 px: every frame becomes 1-4 merged vision tokens, which keeps tests fast.
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56).save_pretrained(path)
    return path
