"""`wan-tune sample`: a base model (+ an exported LoRA) -> mp4 and a contact sheet, through the
diffusers Wan pipelines. The pipeline class comes from the base folder's model_index.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data.atomic import atomic_write, writable_problem, write_json
from .media.vace_media import (
    ConditioningError,
    control_frames,
    mask_frames,
    pipeline_inputs,
    reference_images,
    sheet_rows,
)
from .media.video_io import frame_row, to_uint8, write_video
from .models.loading import ModelLoadError, read_pipeline_config, resolve_source
from .models.variant_checks import architecture_mismatches, pipeline_mismatches
from .models.variants import VARIANTS, Variant
from .training.overview import write_sheet


class SampleError(RuntimeError):
    pass


@dataclass
class SampleArgs:
    base: str
    prompt: str
    out: str
    lora: str | list[str] | None = None
    """One adapter, or a Wan2.2 A14B pair (each file's header says its expert)."""
    lora_scale: float = 1.0
    image: str | None = None
    last_image: str | None = None
    """FLF2V: the last frame (with `image`, the first)."""
    reference_image: list[str] = field(default_factory=list)
    """VACE: reference images (product, logo, character) the video keeps."""
    control_video: str | None = None
    """VACE: the control video (depth, pose, edges, grey, layout), at least `frames` long."""
    mask_video: str | None = None
    """VACE: which parts of the control to keep (black) and to generate (white)."""
    conditioning_scale: float = 1.0
    """VACE: weight of the hints from the references and control."""
    pose_video: str | None = None
    """Wan2.2-Animate: the pose video (with --reference-image, the character, and --face-video)."""
    face_video: str | None = None
    """Wan2.2-Animate: the face video (cropped square), one frame per pose frame."""
    background_video: str | None = None
    """Wan2.2-Animate, replacement: the background the character goes into (with --mask-video, the person's)."""
    segment_frames: int | None = None
    """Wan2.2-Animate: frames per segment (None: the model's 77, or `frames` when fewer)."""
    negative_prompt: str = ""
    frames: int = 33
    steps: int = 30
    seed: int = 0
    height: int | None = None
    width: int | None = None
    guidance_scale: float = 5.0
    guidance_scale_2: float | None = None
    """Wan2.2 A14B: the low-noise expert's guidance (None: guidance_scale)."""
    variant: str | None = None


def lora_header(path: str) -> dict[str, str]:
    """The adapter file's header, after checking it holds tensors and all of them are finite."""
    import torch
    from safetensors import safe_open

    if not Path(path).is_file():
        raise SampleError(f"--lora: {path} does not exist")
    try:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
            bad = [k for k in keys if not torch.isfinite(f.get_tensor(k).float()).all()]  # adapters are small
            header = f.metadata() or {}
    except Exception as err:
        raise SampleError(f"--lora: {path} is not a safetensors file ({err})") from None
    if not keys:
        raise SampleError(f"--lora: {path} holds no tensors: not an adapter (export one with `wan-tune export`)")
    if bad:
        raise SampleError(f"--lora: {path} holds NaN or infinite values ({len(bad)} of {len(keys)} tensors, e.g. {bad[0]}): "
                          "the run diverged; export an earlier checkpoint")
    return header


def argument_problems(args: SampleArgs, variant: Variant | None) -> list[str]:
    """What in the arguments the pipeline cannot render, each naming its option."""
    step = 32 if variant is not None and variant.vae_z_dim == 48 else 16  # VAE 8x (Wan2.2: 16x) times 2x2 patches
    problems = []
    if args.steps < 1:
        problems.append(f"--steps must be at least 1, got {args.steps}")
    if args.frames < 1 or (args.frames - 1) % 4:
        hint = max(1, (args.frames - 1) // 4 * 4 + 1)
        problems.append(f"--frames must be 4k+1 (1, 5, 9, ..., 81), e.g. {hint} or {hint + 4}; got {args.frames}")
    for name, side in (("--height", args.height), ("--width", args.width)):
        if side is not None and (side <= 0 or side % step):
            problems.append(f"{name} must be a positive multiple of {step} px, got {side}")
    for name, value in (("--lora-scale", args.lora_scale), ("--guidance-scale", args.guidance_scale),
                        ("--guidance-scale-2", args.guidance_scale_2)):
        if value is not None and not np.isfinite(value):
            problems.append(f"{name} must be a finite number, got {value}")
    return problems


def variant_of(folder: Path) -> Variant | None:
    """The registered variant whose architecture (and pipeline) the folder has."""
    from diffusers import WanTransformer3DModel

    config = WanTransformer3DModel.load_config(folder / "transformer")  # ConfigMixin: any Wan class reads it
    index = read_pipeline_config(folder)
    return next((v for v in VARIANTS.values() if not architecture_mismatches(v, config) + pipeline_mismatches(v, index)), None)


def animate_problems(args: SampleArgs, variant: Variant | None, base: str) -> list[str]:
    """Wan2.2-Animate: one reference image, a pose and a face video (replacement: a background and a
    mask video too); its options refused for other models."""
    given = [name for name, value in (("--pose-video", args.pose_video), ("--face-video", args.face_video),
                                      ("--background-video", args.background_video)) if value]
    if variant is None or not variant.animate:
        return [f"{', '.join(given)}: for Wan2.2-Animate models; {base} is not one"] if given else []
    missing = [n for n, v in (("--reference-image", args.reference_image), ("--pose-video", args.pose_video),
                              ("--face-video", args.face_video)) if not v]
    problems = [f"{base} is {variant.name}: give {', '.join(missing)}"] if missing else []
    if len(args.reference_image) > 1:
        problems.append(f"--reference-image: Wan2.2-Animate takes one character image, got {len(args.reference_image)}")
    if args.control_video:
        problems.append("--control-video is VACE's; Wan2.2-Animate follows --pose-video")
    if args.background_video and not args.mask_video:
        problems.append("--background-video replaces the person in it: give the person's --mask-video too")
    if args.segment_frames is not None and (args.segment_frames < 5 or (args.segment_frames - 1) % 4):
        problems.append(f"--segment-frames must be 4k+1 and at least 5 (e.g. 77), got {args.segment_frames}")
    return problems


def vace_problems(args: SampleArgs, variant: Variant | None, base: str) -> list[str]:
    given = [name for name, value in (("--reference-image", args.reference_image), ("--control-video", args.control_video),
                                      ("--mask-video", args.mask_video)) if value]
    if variant is not None and variant.animate:
        return []  # its reference image and mask: animate_problems
    if variant is not None and not variant.vace:
        return [f"{', '.join(given)}: for VACE models; {base} is {variant.name}, not one"] if given else []
    problems = []
    if args.mask_video and not args.control_video:
        problems.append("--mask-video masks a control video: give --control-video too")
    if not np.isfinite(args.conditioning_scale) or args.conditioning_scale < 0:
        problems.append(f"--conditioning-scale must be a finite number >= 0, got {args.conditioning_scale}")
    return problems


def _vace_media(args: SampleArgs, height: int, width: int, fps: float) -> dict:
    """The control and mask (--frames of them from the start, at the model's frame rate, as prep
    resamples training footage) and the references, as the pipeline takes them."""
    try:
        return {
            "video": control_frames(args.control_video, args.frames, height, width, fps=fps) if args.control_video else None,
            "mask": mask_frames(args.mask_video, args.frames, height, width, fps=fps) if args.mask_video else None,
            "reference_images": reference_images(args.reference_image, height, width),
        }
    except ConditioningError as err:
        raise SampleError(str(err)) from None


def _lora_weights(path: str):
    """The file, or, for an original-key LoRA of VACE blocks or Animate's face adapters (which
    diffusers 0.42's converter refuses), its weights in diffusers' keys."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .export.adapters import peft_from_original

    with safe_open(path, "pt") as f:
        unread = any(k.startswith(("diffusion_model.vace_blocks.", "diffusion_model.face_adapter.")) for k in f.keys())
    return peft_from_original(load_file(path)) if unread else path


def _load_adapters(pipe, headers: list, experts: list[str], args: SampleArgs) -> None:
    """Each --lora into its transformer at --lora-scale: LoRA files through diffusers' loader,
    LoHa / LoKr files merged into the weights (diffusers' loader takes LoRA pairs only)."""
    loaded = []
    for (path, h), expert in zip(headers, experts):
        low = h.get("wan_tune.expert") == "low_noise"  # A14B: the low-noise file goes into transformer_2
        try:
            if _merge_lycoris(pipe.transformer_2 if low else pipe.transformer, path, args.lora_scale):
                continue
            pipe.load_lora_weights(_lora_weights(path), adapter_name=f"lora_{expert}", load_into_transformer_2=low)
            loaded.append(f"lora_{expert}")
        except Exception as err:
            raise SampleError(f"--lora {path} does not load into {args.base}: {err}") from None
    if loaded:
        pipe.set_adapters(loaded, [args.lora_scale] * len(loaded))


def _merge_lycoris(transformer, path: str, scale: float) -> bool:
    """A LoHa / LoKr file (ComfyUI's keys) added into the transformer's weights at `scale`, each
    update computed as ComfyUI computes it; False (nothing done) for a LoRA file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .export.lycoris import comfyui_updates, is_lycoris

    with safe_open(path, "pt") as f:
        if not is_lycoris(f.keys()):
            return False
    with torch.no_grad():
        for module, update in comfyui_updates(load_file(path)).items():
            weight = transformer.get_submodule(module).weight
            weight += (scale * update).to(weight.device, weight.dtype)
    return True


def contact_sheet(frames: np.ndarray, count: int = 8) -> "Image.Image":
    """`count` evenly spaced frames side by side (uint8 [T, H, W, 3] in)."""
    from PIL import Image


    return Image.fromarray(frame_row(frames, count))


def sample(args: SampleArgs, say=print) -> tuple[Path, Path]:
    from diffusers import DiffusionPipeline

    loras = [args.lora] if isinstance(args.lora, str) else list(args.lora or [])
    headers = [(path, lora_header(path)) for path in loras]
    header = headers[0][1] if headers else {}
    hint = args.variant or header.get("wan_tune.variant") or "wan2.1-t2v-1.3b"
    try:
        folder = resolve_source(VARIANTS.get(hint, VARIANTS["wan2.1-t2v-1.3b"]), path=args.base).folder
    except ModelLoadError as err:
        raise SampleError(f"--base: {err}") from None
    variant = variant_of(folder)
    for path, h in headers:
        if h.get("wan_tune.variant") and variant and h["wan_tune.variant"] != variant.name:
            raise SampleError(f"--lora {path} was trained for {h['wan_tune.variant']}, but --base {args.base} is {variant.name}")
    experts = [h.get("wan_tune.expert", "high_noise") for _, h in headers]
    if len(set(experts)) != len(experts):
        raise SampleError(f"--lora: two files for the same expert ({', '.join(experts)}); give one per expert")
    is_i2v = variant.is_i2v and not variant.animate if variant else False  # Animate: its character, --reference-image
    if is_i2v and not args.image:
        raise SampleError(f"{args.base} is an image-to-video model: give the first frame with --image")
    takes_image = variant is not None and variant.image_conditioned("i2v") and not variant.animate  # I2V, or TI2V-5B
    if args.image and not takes_image:
        raise SampleError(f"--image is for image-to-video models; {args.base} is text-to-video")
    last_frame = variant is not None and variant.last_frame
    if last_frame and not args.last_image:
        raise SampleError(f"{args.base} is a first-and-last-frame model: give the last frame with --last-image (and the first with --image)")
    if args.last_image and not last_frame:
        raise SampleError(f"--last-image is for first-and-last-frame (FLF2V) models; {args.base} is not one")
    problems = argument_problems(args, variant) + vace_problems(args, variant, args.base) + animate_problems(
        args, variant, args.base)
    if problems:
        raise SampleError("; ".join(problems))
    problem = writable_problem(Path(args.out).parent)
    if problem:
        raise SampleError(f"--out: {problem}; give a writable place (nothing was rendered)")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # no fast bf16 on CPUs
    if args.image and not is_i2v:  # TI2V-5B with a first frame: its folder names WanPipeline
        from diffusers import WanImageToVideoPipeline

        pipe = WanImageToVideoPipeline.from_pretrained(folder, torch_dtype=dtype)
    else:
        pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
    pipe.vae.to(torch.float32)  # as diffusers' Wan examples load it: the VAE decodes in fp32
    place(pipe, device, say)
    _load_adapters(pipe, headers, experts, args)
    height = args.height or (variant.resolution[0] if variant else 480)
    width = args.width or (variant.resolution[1] if variant else 832)
    kwargs, rows = _render_inputs(args, variant, height, width)
    segments = ""
    if variant is not None and variant.animate and args.frames > segment_length(args, variant):
        length = segment_length(args, variant)
        count = -(-(args.frames - 1) // (length - 1))  # each further segment adds length - 1 frames
        segments = f" in {count} segments of {length}"
    say(f"sampling {args.frames} frames{segments} at {width}x{height}, {args.steps} steps on {device}")
    frames = to_uint8(pipe(**kwargs).frames[0])
    out = write_video(args.out, frames, fps=variant.fps if variant else 16)  # TI2V-5B: 24 fps
    if rows:  # the conditioning above the render
        sheet = write_sheet(Path(out).with_suffix(".png"), [*rows, ("sample", frame_row(frames))])
    else:
        sheet = atomic_write(Path(out).with_suffix(".png"), lambda tmp: contact_sheet(frames).save(tmp, format="PNG"))
    write_json(Path(out).with_suffix(".json"), {**vars(args), "height": height, "width": width})  # how it was made
    return out, sheet


def _render_inputs(args: SampleArgs, variant: Variant | None, height: int, width: int) -> tuple[dict, list]:
    """The pipeline call's arguments, and the contact-sheet rows of its conditioning ([] for none)."""
    from PIL import Image

    kwargs = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, height=height, width=width,
                  num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                  **({"guidance_scale_2": args.guidance_scale_2} if variant and variant.two_experts else {}),
                  generator=torch.Generator().manual_seed(args.seed), output_type="np")
    if variant is not None and variant.animate:  # WanAnimatePipeline: segments of --segment-frames
        from .media.animate_media import animate_media, animate_rows

        try:
            media = animate_media(args.reference_image[0], args.pose_video, args.face_video, args.frames, height, width,
                                  variant.transformer["motion_encoder_size"], variant.fps, args.background_video,
                                  args.mask_video)
        except ConditioningError as err:
            raise SampleError(str(err)) from None
        return dict(kwargs, segment_frame_length=segment_length(args, variant), **media), animate_rows(media, height, width)
    kwargs["num_frames"] = args.frames
    for key, path in (("image", args.image), ("last_image", args.last_image)):
        if path:
            kwargs[key] = Image.open(path).convert("RGB")
    if variant is not None and variant.vace:
        media = _vace_media(args, height, width, variant.fps)
        return dict(kwargs, conditioning_scale=args.conditioning_scale, **pipeline_inputs(media)), sheet_rows(media, height, width)
    return kwargs, []


def segment_length(args: SampleArgs, variant: Variant) -> int:
    """Wan2.2-Animate's frames per segment: --segment-frames, else the model's own (77), or --frames
    when fewer. The pipeline renders --frames as segments that each start on the previous one's last
    frame (the pose and face videos padded to whole segments, the video cut back to --frames)."""
    return args.segment_frames or min(args.frames, variant.frames)


def place(pipe, device: str, say=print) -> None:
    """The pipeline on `device`; on a GPU too small for all of it at once (an A14B's two experts,
    ~64 GiB in bf16; a 14B and umT5 on a 24 GB card), each model moves to the GPU only while it runs
    (diffusers' model CPU offload)."""
    if device != "cuda":
        pipe.to(device)
        return
    need = sum(p.numel() * p.element_size() for c in pipe.components.values() if isinstance(c, torch.nn.Module)
               for p in c.parameters())
    free, _ = torch.cuda.mem_get_info()
    if need > 0.8 * free:
        say(f"the pipeline's {need / 2**30:.1f} GiB of weights do not fit beside the render in {free / 2**30:.1f} GiB "
            "free: each model goes to the GPU only while it runs (enable_model_cpu_offload)")
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
