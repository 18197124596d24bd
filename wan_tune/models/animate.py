"""Wan2.2-Animate's conditioning, as `WanAnimatePipeline` makes it, and the transformer call a
training step makes from it.

Each clip's conditioning is encoded once, by the pipeline's own methods (the same resizing, VAE
encoding with the posterior's mode, latent normalisation and masks inference uses), so training
feeds the transformer exactly what a render feeds it (`encode_conditions`). A step then lays the
noisy latents beside them as the pipeline's denoising loop does (`transformer_kwargs`):

- latents: `T + 1` frames, the first the reference image's slot (the pipeline decodes frames 1..T
  and drops it), so the clean target is the reference's latent, then the clip's (`clean_latents`);
- 36 channels in: those latents, then the reference (a mask of ones and its latent: 20 channels, one
  frame) followed in time by the segment condition (animation: a black video's latents with a mask of
  zeros; replacement: the background's latents with the character's mask inverted);
- the pose video's latents (T frames: none beside the reference), the face video's pixels at the
  motion encoder's size (its frames map to T latent frames through the face encoder's two stride-2
  convolutions), and the reference's CLIP tokens.
"""

from __future__ import annotations

import torch

MODES = ("animate", "replace")


@torch.no_grad()
def encode_conditions(pipe, image, pose_video: list, face_video: list, height: int, width: int, mode: str = "animate",
                      background: list | None = None, mask: list | None = None) -> dict[str, torch.Tensor]:
    """One clip's conditioning through `pipe` (a `WanAnimatePipeline`; prep's holds its transformer on
    the meta device: only its config is read): PIL image / frames in, the tensors a training step
    stores out (batch dimension dropped). `pose_video`, `face_video` (and replacement's
    `background`, `mask`) have the clip's frame count, 4k + 1. The face video is kept as the 8-bit
    frames the pipeline resized (`face_pixels` gives back exactly its [-1, 1] values): a quarter of
    the bytes, 77 frames at 512 px being 60 MB."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    frames = len(pose_video)
    device, vae_dtype = pipe._execution_device, pipe.vae.dtype
    pixels = pipe.vae_image_processor.preprocess(image, height=height, width=width, resize_mode="fill")
    reference = pipe.prepare_reference_image_latents(pixels.to(device, torch.float32), 1, device=device)
    pose = pipe.video_processor.preprocess_video(pose_video, height=height, width=width).to(device, torch.float32)
    size = pipe.transformer.config.motion_encoder_size
    face = pipe.video_processor.preprocess_video(face_video, height=size, width=size)
    face = ((face[0].float() + 1) / 2 * 255).round().to(torch.uint8)  # exact: x / 255 * 2 - 1 made it
    replacing = {}
    if mode == "replace":
        replacing = dict(
            background_video=pipe.video_processor.preprocess_video(background, height=height, width=width).to(
                device, torch.float32),
            mask_video=pipe.video_processor_for_mask.preprocess_video(mask, height=height, width=width).to(
                device, torch.float32))
    segment = pipe.prepare_prev_segment_cond_latents(
        None, batch_size=1, segment_frame_length=frames, start_frame=0, height=height, width=width,
        prev_segment_cond_frames=1, task=mode, device=device, **replacing)
    return {
        "reference": reference[0].to(vae_dtype),
        "segment": segment[0],
        "pose": pipe.prepare_pose_latents(pose, 1, device=device)[0],
        "face": face,
        "image_embeds": pipe.encode_image(image, device)[0],
    }


def animate_batch(batch: dict, drop_face: bool = False) -> dict:
    """The batch an Animate step trains on: its latents with the reference's slot first, and with
    `drop_face` the face video blanked as the pipeline's unconditional branch blanks it (every pixel
    -1: an 8-bit 0)."""
    out = {**batch, "latents": clean_latents(batch["latents"], batch["reference"])}
    if drop_face:
        out["face"] = torch.zeros_like(batch["face"]) if batch["face"].dtype == torch.uint8 else -torch.ones_like(batch["face"])
    return out


def face_pixels(face: torch.Tensor) -> torch.Tensor:
    """The face video's [-1, 1] pixels from its stored 8-bit frames, computed as diffusers'
    VideoProcessor computes them (x / 255, then 2x - 1, in fp32): the values a render feeds."""
    if face.dtype != torch.uint8:
        return face
    return 2.0 * (face.float() / 255.0) - 1.0


def clean_latents(latents: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The clean target of a step: the reference image's latent (its 16 channels after the 4 mask
    channels) in frame 0, the clip's latents after it. Batched: [B, 16, T, h, w] and [B, 20, 1, h, w]."""
    return torch.cat([reference[:, 4:].to(latents.dtype), latents], dim=2)


def transformer_kwargs(noisy: torch.Tensor, conditions: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """The Animate transformer's inputs besides timestep and text, as the pipeline's denoising loop
    makes them: `noisy` [B, 16, T + 1, h, w] beside the reference and segment condition, the pose
    latents, the face pixels and the CLIP tokens, in the transformer's `dtype`."""
    condition = torch.cat([conditions["reference"], conditions["segment"]], dim=2)
    return {
        "hidden_states": torch.cat([noisy, condition.to(noisy.dtype)], dim=1).to(dtype),
        "pose_hidden_states": conditions["pose"].to(dtype),
        "face_pixel_values": face_pixels(conditions["face"]).to(dtype),
        "encoder_hidden_states_image": conditions["image_embeds"].to(dtype),
    }
