"""Encode clips and captions exactly as the diffusers Wan pipelines do at inference.

The encoders are held inside a real `WanPipeline` / `WanImageToVideoPipeline` (with no
transformer) and the pipeline's own methods do the work: prompt cleaning + umT5 for text,
`encode_image` (CLIP penultimate hidden states) and `prepare_latents` (mask + VAE condition
latents) for I2V. So what training sees is what sampling will feed, by construction.
"""

from __future__ import annotations

import hashlib
import json

import torch

from wan_tune.models.loading import ModelSource, load_image_encoder, load_text_encoder, load_vae


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=like.dtype, device=like.device).view(shape)
    return mean, std


def normalize_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    """(z - mean) / std per channel: the inverse of what the pipelines apply before decoding."""
    mean, std = _latent_stats(vae, latents)
    return (latents - mean) / std


def denormalize_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    mean, std = _latent_stats(vae, latents)
    return latents * std + mean


class Encoders:
    """umT5 + Wan VAE (+ CLIP for I2V), for one source model."""

    def __init__(self, source: ModelSource, i2v: bool, dtype: torch.dtype = torch.float32, device: str = "cpu", max_tokens: int = 512,
                 vae_dtype: torch.dtype = torch.float32, animate_mode: str = "animate"):
        from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline

        self.source, self.i2v, self.device, self.max_tokens = source, i2v, torch.device(device), max_tokens
        tokenizer, text_encoder = load_text_encoder(source, dtype)
        vae = load_vae(source, vae_dtype).eval().requires_grad_(False)  # model.vae_dtype: fp32 unless told
        parts = dict(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(),  # unused: the pipeline just requires one
            transformer=None,
        )
        self.clip = i2v and source.variant.clip_image_tokens  # Wan2.2 I2V conditions on latents alone
        if i2v:
            processor, image_encoder = load_image_encoder(source, dtype) if self.clip else (None, None)
            # TI2V-5B (expand_timesteps): the image replaces the first latent frame instead.
            self.pipe = WanImageToVideoPipeline(**parts, image_encoder=image_encoder, image_processor=processor,
                                                expand_timesteps=source.variant.expand_timesteps)
        else:
            self.pipe = WanPipeline(**parts)
        self.pipe.to(self.device)
        self.vace = _conditioning_pipeline(self.pipe, source.variant) if source.variant.vace else None
        self.animate = _conditioning_pipeline(self.pipe, source.variant) if source.variant.animate else None
        self.animate_mode = animate_mode  # Wan2.2-Animate: animation or replacement inputs (animate.mode)
        self._blank: dict[tuple, torch.Tensor] = {}

    @property
    def vae(self):
        return self.pipe.vae

    def vace_condition(self, num_frames: int, height: int, width: int, control=None, mask=None, references=()) -> dict:
        """VACE tensors of a clip: `vace_context` [96, R + F', H', W'] (what `WanVACEPipeline` feeds
        the transformer as `control_hidden_states`), and `vace_blank` [16, F', H', W'], the latent
        of the grey video the pipeline encodes when no control is given: training swaps it in for
        the control when `vace.drop_control` draws (inactive and reactive latents are both it)."""
        out = {"vace_context": vace_context(self.vace, self.device, height, width, num_frames, control, mask, references)}
        key = (num_frames, height, width)
        if key not in self._blank:
            self._blank[key] = vace_context(self.vace, self.device, height, width, num_frames)[:16]
        out["vace_blank"] = self._blank[key]
        return out

    def identity(self) -> dict:
        """What decides the encodings (goes into meta.json and every sample id)."""
        files = ["text_encoder/config.json", "vae/config.json", "tokenizer/tokenizer_config.json"]
        if self.clip:
            files += ["image_encoder/config.json"]
        digest = hashlib.sha256()
        for rel in files:
            path = self.source.folder / rel
            digest.update(path.read_bytes() if path.is_file() else rel.encode())
        return {
            "variant": self.source.variant.name,
            "model": str(self.source.folder.name),
            "configs_sha256": digest.hexdigest()[:16],
            "max_tokens": self.max_tokens,
            "vae_z_dim": self.vae.config.z_dim,
        }

    def vae_meta(self) -> dict:
        c = self.vae.config
        return {"z_dim": c.z_dim, "latents_mean": list(c.latents_mean), "latents_std": list(c.latents_std)}

    @torch.no_grad()
    def text(self, captions: list[str]) -> list[torch.Tensor]:
        """umT5 embeddings of the real tokens only, [L_i, D] each (the pipeline pads them with zeros)."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        padded, _ = self.pipe.encode_prompt(
            captions, do_classifier_free_guidance=False, max_sequence_length=self.max_tokens, device=self.device
        )
        lengths = self.pipe.tokenizer(
            [prompt_clean(c) for c in captions], max_length=self.max_tokens, truncation=True, add_special_tokens=True
        )["input_ids"]
        return [emb[: len(ids)].cpu() for emb, ids in zip(padded, lengths)]

    @torch.no_grad()
    def latents(self, video: torch.Tensor) -> torch.Tensor:
        """Pixel video [3, T, H, W] in [-1, 1] -> normalised latents [16, (T-1)/4+1, H/8, W/8]."""
        x = video.unsqueeze(0).to(self.device, self.vae.dtype)
        z = self.vae.encode(x).latent_dist.mode()  # the mode, as the I2V pipeline's condition: deterministic
        return normalize_latents(z.float(), self.vae)[0].cpu()

    @torch.no_grad()
    def image_condition(self, first_frame, num_frames: int, last_frame=None) -> dict[str, torch.Tensor]:
        """I2V inputs for a clip whose first frame is `first_frame` (a PIL image at bucket size).

        `condition` [20, F', H', W']: 4 mask channels + 16 condition-latent channels, as
        `WanImageToVideoPipeline.prepare_latents` builds them; `image_embeds` [257, 1280] (CLIP),
        Wan2.1 only. TI2V-5B: `condition` [48, 1, H', W'], the image's latent that replaces the
        first latent frame. FLF2V (`last_frame` given): the pipeline's `last_image` too: the mask
        and latents of both frames, and `image_embeds` [2 x 257, 1280], the first frame's tokens
        then the last's (`spec.transformer_inputs` hands them over as the pipeline does).
        """
        width, height = first_frame.size
        prepare = self.pipe.video_processor.preprocess
        image = prepare(first_frame, height=height, width=width).to(self.device, torch.float32)
        last = None if last_frame is None else prepare(last_frame, height=height, width=width).to(self.device, torch.float32)
        _, condition, *_mask = self.pipe.prepare_latents(  # TI2V also returns its first-frame mask
            image, 1, self.vae.config.z_dim, height, width, num_frames, torch.float32, self.device, last_image=last
        )
        out = {"condition": condition[0].cpu()}
        if self.clip:
            frames = first_frame if last_frame is None else [first_frame, last_frame]
            out["image_embeds"] = self.pipe.encode_image(frames, self.device).flatten(0, 1).float().cpu()
        return out


def _conditioning_pipeline(pipe, variant):
    """The variant's own pipeline (`WanVACEPipeline`, `WanAnimatePipeline`) over the same encoders,
    whose conditioning methods prep calls. Its transformer is built on the meta device: the methods
    read only its config (patch size; Animate's face size)."""
    from wan_tune.models.variants import pipeline_class, transformer_class

    with torch.device("meta"):
        transformer = transformer_class(variant)(**variant.transformer)
    clip = dict(image_processor=pipe.image_processor, image_encoder=pipe.image_encoder) if variant.animate else {}
    return pipeline_class(variant)(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                   scheduler=pipe.scheduler, transformer=transformer, **clip)


@torch.no_grad()
def vace_context(vace, device, height: int, width: int, num_frames: int, video=None, mask=None, references=()) -> torch.Tensor:
    """The VACE context [96, R + F', H', W'] of one clip, built by `WanVACEPipeline`'s own steps as
    its __call__ runs them: `preprocess_conditions` (references fitted on a white canvas, mask to
    [0, 1]), `prepare_video_latents` (inactive and reactive latents, references' latents in front),
    `prepare_masks` (the mask folded 8 x 8 into 64 channels, zeros for the reference frames).
    `video` / `mask`: lists of PIL frames at the clip's size, or None (a grey video, all generated)."""
    video, mask, refs = vace.preprocess_conditions(video, mask, list(references) or None, 1, height, width, num_frames,
                                                  torch.float32, device)
    latents = vace.prepare_video_latents(video, mask, refs, None, device)
    return torch.cat([latents, vace.prepare_masks(mask, refs, None)], dim=1)[0].float().cpu()


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
