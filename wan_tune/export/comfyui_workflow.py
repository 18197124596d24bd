"""A ComfyUI workflow beside the ComfyUI adapter: the API-format graph ("File -> Export (API)",
what `POST /prompt` takes) of stock nodes that loads the base model, applies the adapter and
renders the recipe's prompt at its size, frames and shift.

The weights are named as the Comfy-Org repackaged files ComfyUI users download
(`Comfy-Org/Wan_2.1_ComfyUI_repackaged`, `Comfy-Org/Wan_2.2_ComfyUI_Repackaged`); the images and
videos a workflow reads (first frame, control video) go in ComfyUI's `input/` folder under the
names the workflow gives. Node and input names are ComfyUI's own (nodes.py, comfy_extras/
nodes_wan.py, nodes_hunyuan.py, nodes_model_advanced.py, nodes_video.py, nodes_images.py); a test
checks every node against that list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models.variants import Variant, expert_label

# (diffusion model file(s), VAE file) per variant, as ComfyUI users hold them. A14B: high, low noise.
MODEL_FILES: dict[str, tuple[tuple[str, ...], str]] = {
    "wan2.1-t2v-1.3b": (("wan2.1_t2v_1.3B_fp16.safetensors",), "wan_2.1_vae.safetensors"),
    "wan2.1-t2v-14b": (("wan2.1_t2v_14B_fp16.safetensors",), "wan_2.1_vae.safetensors"),
    "wan2.1-i2v-14b-480p": (("wan2.1_i2v_480p_14B_fp16.safetensors",), "wan_2.1_vae.safetensors"),
    "wan2.1-i2v-14b-720p": (("wan2.1_i2v_720p_14B_fp16.safetensors",), "wan_2.1_vae.safetensors"),
    "wan2.1-flf2v-14b-720p": (("wan2.1_flf2v_720p_14B_fp16.safetensors",), "wan_2.1_vae.safetensors"),
    "wan2.1-vace-1.3b": (("wan2.1_vace_1.3B_fp16.safetensors",), "wan_2.1_vae.safetensors"),
    "wan2.1-vace-14b": (("wan2.1_vace_14B_fp16.safetensors",), "wan_2.1_vae.safetensors"),
    "wan2.2-ti2v-5b": (("wan2.2_ti2v_5B_fp16.safetensors",), "wan2.2_vae.safetensors"),
    "wan2.2-t2v-a14b": (("wan2.2_t2v_high_noise_14B_fp16.safetensors", "wan2.2_t2v_low_noise_14B_fp16.safetensors"),
                        "wan_2.1_vae.safetensors"),
    "wan2.2-i2v-a14b": (("wan2.2_i2v_high_noise_14B_fp16.safetensors", "wan2.2_i2v_low_noise_14B_fp16.safetensors"),
                        "wan_2.1_vae.safetensors"),
    "wan2.2-vace-fun-a14b": (("wan2.2_fun_vace_high_noise_14B_bf16.safetensors",
                              "wan2.2_fun_vace_low_noise_14B_bf16.safetensors"), "wan_2.1_vae.safetensors"),
    "wan2.2-animate-14b": (("wan2.2_animate_14B_bf16.safetensors",), "wan_2.1_vae.safetensors"),
}
TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
CLIP_VISION = "clip_vision_h.safetensors"
# What the workflow reads from ComfyUI's input/ folder.
INPUTS = {"first": "first_frame.png", "last": "last_frame.png", "reference": "reference.png",
          "control": "control.mp4", "mask": "mask.mp4", "pose": "pose.mp4", "face": "face.mp4",
          "background": "background.mp4"}


@dataclass
class Graph:
    """API-format nodes: {"<id>": {"class_type", "inputs", "_meta"}}; a link is [node id, output index]."""

    nodes: dict[str, dict] = field(default_factory=dict)

    def add(self, class_type: str, title: str, **inputs) -> str:
        node = str(len(self.nodes) + 1)
        self.nodes[node] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
        return node


def out(node: str, index: int = 0) -> list:
    return [node, index]


@dataclass(frozen=True)
class Render:
    """What the workflow renders: the recipe's validation settings (prompt, size, frames, steps)."""

    prompt: str
    negative: str
    width: int
    height: int
    frames: int
    steps: int
    cfg: float
    shift: float
    fps: float
    seed: int = 0
    conditioning_scale: float = 1.0  # VACE: the run's vace.conditioning_scale (WanVaceToVideo's strength)
    replace: bool = False  # Wan2.2-Animate: animate.mode=replace (a background video and the person's mask)


def model_files(variant: Variant) -> tuple[tuple[str, ...], str]:
    """(diffusion model file per expert, VAE file) a ComfyUI user holds. The tiny models have no
    ComfyUI release: their files are named after them (write them with `export` of a full run)."""
    if variant.name in MODEL_FILES:
        return MODEL_FILES[variant.name]
    return tuple(f"{variant.name}_{e}.safetensors" for e in variant.experts), f"{variant.name}_vae.safetensors"


def workflow(variant: Variant, loras: dict[str, str], render: Render, strength: float = 1.0) -> dict:
    """The graph for `variant` with `loras` ({expert: adapter file name}; one per A14B expert)."""
    files, vae_file = model_files(variant)
    g = Graph()
    clip = g.add("CLIPLoader", "Load umT5", clip_name=TEXT_ENCODER, type="wan", device="default")
    vae = g.add("VAELoader", "Load VAE", vae_name=vae_file)
    positive = g.add("CLIPTextEncode", "Prompt", text=render.prompt, clip=out(clip))
    negative = g.add("CLIPTextEncode", "Negative prompt", text=render.negative, clip=out(clip))
    models = []
    for expert, file in zip(variant.experts, files):
        unet = g.add("UNETLoader", f"Load {file}", unet_name=file, weight_dtype="default")
        model = out(unet)
        if expert in loras:
            model = out(g.add("LoraLoaderModelOnly", f"LoRA ({expert_label(variant, expert)})", model=model,
                              lora_name=loras[expert], strength_model=strength))
        models.append(out(g.add("ModelSamplingSD3", "Shift", model=model, shift=render.shift)))
    positive, negative, latent, trim = _conditioning(g, variant, render, out(positive), out(negative), out(vae))
    samples = _sample(g, variant, render, models, positive, negative, latent)
    if trim is not None:  # VACE, Animate: the references' latent frames come off before decoding
        samples = out(g.add("TrimVideoLatent", "Drop the reference frames", samples=samples, trim_amount=trim))
    images = g.add("VAEDecode", "Decode", samples=samples, vae=out(vae))
    g.add("SaveAnimatedWEBP", "Save", images=out(images), filename_prefix=f"wan-tune/{variant.name}", fps=render.fps,
          lossless=False, quality=90, method="default")
    return g.nodes


def _conditioning(g: Graph, variant: Variant, r: Render, positive, negative, vae):
    """(positive, negative, latent, trim) for the variant's task."""
    size = dict(width=r.width, height=r.height, length=r.frames, batch_size=1)
    if variant.animate:
        return _animate(g, r, positive, negative, vae, size)
    if variant.vace:
        control = g.add("GetVideoComponents", "Control frames", video=out(g.add("LoadVideo", "Control video", file=INPUTS["control"])))
        mask_frames = g.add("GetVideoComponents", "Mask frames", video=out(g.add("LoadVideo", "Mask video", file=INPUTS["mask"])))
        mask = g.add("ImageToMask", "Mask (white: generate)", image=out(mask_frames), channel="red")
        reference = g.add("LoadImage", "Reference image", image=INPUTS["reference"])
        node = g.add("WanVaceToVideo", "VACE", positive=positive, negative=negative, vae=vae, **size,
                     strength=r.conditioning_scale,
                     control_video=out(control), control_masks=out(mask), reference_image=out(reference))
        return out(node, 0), out(node, 1), out(node, 2), out(node, 3)
    if variant.expand_timesteps:  # TI2V-5B: text to video here; give start_image to start on a frame
        return positive, negative, out(g.add("Wan22ImageToVideoLatent", "Latent", vae=vae, **size)), None
    if not variant.is_i2v:
        return positive, negative, out(g.add("EmptyHunyuanLatentVideo", "Empty latent video", **size)), None
    first = g.add("LoadImage", "First frame", image=INPUTS["first"])
    extra = {}
    if variant.clip_image_tokens:
        vision = g.add("CLIPVisionLoader", "Load CLIP vision", clip_name=CLIP_VISION)
        extra["first"] = out(g.add("CLIPVisionEncode", "CLIP of the first frame", clip_vision=out(vision), image=out(first),
                                   crop="none"))
    if variant.last_frame:
        last = g.add("LoadImage", "Last frame", image=INPUTS["last"])
        last_clip = g.add("CLIPVisionEncode", "CLIP of the last frame", clip_vision=out(vision), image=out(last), crop="none")
        node = g.add("WanFirstLastFrameToVideo", "First and last frame", positive=positive, negative=negative, vae=vae,
                     **size, clip_vision_start_image=extra["first"], clip_vision_end_image=out(last_clip),
                     start_image=out(first), end_image=out(last))
    else:
        vision_input = {"clip_vision_output": extra["first"]} if "first" in extra else {}
        node = g.add("WanImageToVideo", "Image to video", positive=positive, negative=negative, vae=vae, **size,
                     start_image=out(first), **vision_input)
    return out(node, 0), out(node, 1), out(node, 2), None


def _animate(g: Graph, r: Render, positive, negative, vae, size: dict):
    """Wan2.2-Animate: the character (its CLIP too), the pose and face videos (replacement: the
    background and the person's mask) into `WanAnimateToVideo`, one segment of `length` frames from
    the videos' start; its `trim_latent` output takes the reference's latent frame off."""

    def frames(key: str, title: str):
        return out(g.add("GetVideoComponents", f"{title} frames", video=out(g.add("LoadVideo", title, file=INPUTS[key]))))

    reference = g.add("LoadImage", "Character (reference image)", image=INPUTS["reference"])
    vision = g.add("CLIPVisionLoader", "Load CLIP vision", clip_name=CLIP_VISION)
    clip = g.add("CLIPVisionEncode", "CLIP of the character", clip_vision=out(vision), image=out(reference), crop="none")
    extra = {}
    if r.replace:
        extra = dict(background_video=frames("background", "Background video"),
                     character_mask=out(g.add("ImageToMask", "Mask (white: the person)",
                                              image=frames("mask", "Mask video"), channel="red")))
    node = g.add("WanAnimateToVideo", "Animate", positive=positive, negative=negative, vae=vae, **size,
                 clip_vision_output=out(clip), reference_image=out(reference), pose_video=frames("pose", "Pose video"),
                 face_video=frames("face", "Face video"), continue_motion_max_frames=5, video_frame_offset=0, **extra)
    return out(node, 0), out(node, 1), out(node, 2), out(node, 3)


def _sample(g: Graph, variant: Variant, r: Render, models: list, positive, negative, latent):
    common = dict(cfg=r.cfg, sampler_name="uni_pc", scheduler="simple", positive=positive, negative=negative)
    if len(models) == 1:
        return out(g.add("KSampler", "Sample", model=models[0], seed=r.seed, steps=r.steps, denoise=1.0,
                         latent_image=latent, **common))
    switch = switch_step(r.steps, r.shift, variant.boundary_ratio)
    high = g.add("KSamplerAdvanced", "High noise", model=models[0], add_noise="enable", noise_seed=r.seed, steps=r.steps,
                 latent_image=latent, start_at_step=0, end_at_step=switch, return_with_leftover_noise="enable", **common)
    low = g.add("KSamplerAdvanced", "Low noise", model=models[1], add_noise="disable", noise_seed=r.seed, steps=r.steps,
                latent_image=out(high), start_at_step=switch, end_at_step=10000, return_with_leftover_noise="disable",
                **common)
    return out(low)


def switch_step(steps: int, shift: float, boundary: float) -> int:
    """The step at which Wan2.2 A14B hands over to the low-noise expert: the first whose sigma
    (ComfyUI's `simple` schedule, shifted) falls below the boundary, as the diffusers pipeline
    switches on timestep < boundary * 1000."""
    for i in range(steps):
        t = 1 - i / steps
        sigma = shift * t / (1 + (shift - 1) * t)
        if sigma < boundary - 1e-9:
            return i
    return steps


__all__ = ["INPUTS", "MODEL_FILES", "Render", "model_files", "switch_step", "workflow"]
