"""The model card export writes beside the adapter (`README.md`, the Hugging Face Hub's format:
YAML front matter the hub reads, then the page), with the samples it shows in `samples/`.

What it says is read from the run, never typed: the checkpoint's recipe and step, the run's
losses (metrics.jsonl, best.json), the shards' index (clips, buckets, hours, its hash) and the
validation renders (videos for the hub's widget, the base-vs-LoRA contact sheet).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from ..config import Recipe, to_yaml
from ..config.sources import all_resolutions, data_sources
from ..models.variants import Variant, expert_label, get_variant, pipeline_class
from ..training.facts import data_facts
from ..training.heldout import EMA_SCORE

SAMPLES = "samples"
def inference_shift(recipe: Recipe, variant: Variant) -> float:
    """The flow shift renders use: timesteps.shift when a number (auto is a training schedule; inference keeps
    the variant's)."""
    shift = recipe.timesteps.shift
    return float(shift) if shift not in (None, "auto") else variant.flow_shift


LICENSE = "apache-2.0"  # Wan 2.1 and 2.2 are released under Apache 2.0


def run_facts(recipe: Recipe, checkpoint: Path, step: int) -> dict:
    """Losses at the checkpoint's step and the run's best held-out one, from the run folder."""
    from ..training.checkpoint import BEST_FILE
    from ..training.metrics import METRICS_FILE, read_metrics

    run = checkpoint.parent
    facts: dict = {"step": step}
    records, _damaged = read_metrics(run / METRICS_FILE)  # a torn or edited line is passed over, as training does
    for record in records:
        if record["step"] == step:
            facts.update({k: record[k] for k in ("loss", "heldout_loss", EMA_SCORE) if isinstance(record.get(k), (int, float))})
            facts.update({k: v for k, v in record.items() if k.startswith("heldout_loss/") and isinstance(v, (int, float))})
    try:
        best = json.loads((run / BEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent or damaged: the card leaves the line out
        best = None
    if (isinstance(best, dict) and isinstance(best.get("heldout_loss"), (int, float)) and isinstance(best.get("step"), int)
            and isinstance(best.get("checkpoint"), str)):
        facts["best"] = best
    return facts


def copy_samples(checkpoint: Path, step: int, out: Path) -> list[Path]:
    """The validation renders of the latest round at or before `step` (videos and sheets), into
    `out/samples/`; [] when the run rendered none."""
    rounds = sorted((p for p in (checkpoint.parent / "validation").glob("step-*") if int(p.name[5:]) <= step),
                    key=lambda p: int(p.name[5:]))
    if not rounds:
        return []
    target = out / SAMPLES
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for src in sorted(rounds[-1].glob("*")):
        if src.suffix in (".mp4", ".png"):
            copied.append(Path(shutil.copy2(src, target / src.name)))
    return copied


def model_card(recipe: Recipe, facts: dict, data: dict, files: dict[tuple[str, str], str], samples: list[Path], base: str,
               workflow: str | None = None, recipe_yaml: str | None = None) -> str:
    """README.md text. `files`: {(expert label, format): adapter file name} (one expert: `transformer`);
    `base`: what loads the base model; `workflow`: the ComfyUI workflow's file name; `recipe_yaml`:
    the recipe as the card shows it (shareable_yaml)."""
    variant = get_variant(recipe.model.variant)
    v, render = recipe.validation, render_settings(recipe, variant)
    videos = [p for p in samples if p.suffix == ".mp4"]
    front = {
        "base_model": variant.hub_id or base,
        "library_name": "diffusers",
        "license": LICENSE,
        "pipeline_tag": "image-to-video" if variant.image_conditioned(recipe.data.task) else "text-to-video",
        "tags": ["wan", "wan-tune", "full-fine-tune" if recipe.adapter.method == "full" else recipe.adapter.method,
                 "image-to-video" if variant.image_conditioned(recipe.data.task) else "text-to-video", variant.name],
        "instance_prompt": recipe.caption.trigger_word or None,
        "widget": [{"text": v.prompts[i] if i < len(v.prompts) else render.prompt, "output": {"url": f"{SAMPLES}/{p.name}"}}
                   for i, p in enumerate(videos)],
    }
    parts = [f"---\n{yaml.safe_dump(front, sort_keys=False, allow_unicode=True)}---\n",
             f"# {recipe.run.name}\n",
             f"A {'LoRA' if recipe.adapter.method == 'lora' else 'full fine-tune'} of {variant.name} "
             f"({variant.kind}) trained with wan-tune. Trigger word: `{recipe.caption.trigger_word or '(none)'}`.\n",
             _training_section(recipe, facts, data, samples),
             _diffusers_section(variant, files, base, render),
             _comfyui_section(variant, files, workflow, render.replace),
             _sample_section(variant, files, base, render),
             f"## Recipe\n\n```yaml\n{recipe_yaml or to_yaml(recipe)}```\n"]
    return "\n".join(parts)


def _training_section(recipe: Recipe, facts: dict, data: dict, samples: list[Path]) -> str:
    a, c = recipe.adapter, recipe.caption
    lines = ["## Training\n"]
    if data:
        buckets = ", ".join(f"{k} ({n})" for k, n in data["buckets"].items())
        lines.append(f"- Data: {data['clips']} clips, {data['samples']} training windows, {data['hours']:.2f} hours "
                     f"({data['hours'] * 3600:.0f} s) of footage; buckets (frames x height x width): {buckets}; shard index sha256 `{data['index_sha256']}`")
        if data.get("sources"):
            roles = {src.name: src.role for src in data_sources(recipe)}
            lines.append("- Sources (samples): " + ", ".join(
                f"{n} {k}" + (" (preserve: kept close to the base model)" if roles.get(n) == "preserve" else "")
                for n, k in data["sources"].items()))
    else:
        lines.append(f"- Data: the shards ({recipe.data.shards}) were not on the machine that exported")
    captions = f"template `{c.template}`" if c.mode == "template" else f"{c.mode} captions"
    lines.append(f"- Captions: {captions}; trigger word `{c.trigger_word or '(none)'}`")
    if a.method != "full":
        kind = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa (LyCORIS)", "lokr": "LoKr (LyCORIS)"}[a.method]
        lines.append(f"- {kind}: rank {a.rank}, alpha {a.alpha if a.alpha is not None else a.rank:g}, targets {', '.join(a.targets)}"
                     + (f", factor {a.lokr_factor}{', both factors split' if a.decompose_both else ''}" if a.method == "lokr" else ""))
    for source in facts.get("init_from", []):
        lines.append(f"- Started from the LoRA `{source['file']}` (sha256 `{source['sha256']}`), not from zeros")
    lines.append(f"- Steps: {facts['step']} at learning rate {recipe.train.lr:g} ({recipe.train.lr_schedule}), batch "
                 f"{recipe.train.batch_size} x accumulation {recipe.train.grad_accum}")
    if "loss" in facts:
        lines.append(f"- Training loss at step {facts['step']}: {facts['loss']:.4f}")
    ema = recipe.export.weights == "ema"
    if ema:
        lines.append(f"- Weights: the moving average of the trained weights (decay {recipe.train.ema_decay:g}), not the "
                     "raw weights of the last step")
    if "heldout_loss" in facts:
        average = f"; their moving average{' (these weights)' if ema else ''}: {facts[EMA_SCORE]:.4f}" if EMA_SCORE in facts else ""
        lines.append(f"- Held-out loss at step {facts['step']}: {facts['heldout_loss']:.4f} (raw weights){average}"
                     if average else f"- Held-out loss at step {facts['step']}: {facts['heldout_loss']:.4f}")
    per_source = {k.split("/", 1)[1]: v for k, v in facts.items() if k.startswith("heldout_loss/")}
    if per_source:
        lines.append("- Held-out loss by source (raw weights): " + ", ".join(f"{n} {v:.4f}" for n, v in per_source.items()))
    if "best" in facts:
        b = facts["best"]
        which = " (moving average)" if b.get("weights") == "ema" else ""
        lines.append(f"- Best held-out loss{which}: {b['heldout_loss']:.4f} at step {b['step']} ({b['checkpoint']})")
    sheets = [p for p in samples if p.suffix == ".png"]
    if sheets:
        lines.append("\nBase model (top) against this adapter, same seed:\n")
        lines += [f"![{p.stem}]({SAMPLES}/{p.name})" for p in sheets]
    return "\n".join(lines) + "\n"


def _inputs_code(variant: Variant, r) -> tuple[str, str]:
    """(lines loading the conditioning, keyword arguments passing it) for the variant's pipeline;
    VACE at the scale the run trained at."""
    if variant.vace:
        return ('from diffusers.utils import load_image, load_video\n'
                'control, mask = load_video("control.mp4"), load_video("mask.mp4")\n'
                'reference = load_image("reference.png")\n'), (f"video=control, mask=mask, reference_images=[reference], "
                                                               f"conditioning_scale={r.conditioning_scale:g}, ")
    if variant.animate:  # one segment of the pose and face videos (diffusers' load_video gives PIL frames)
        videos = ["pose", "face"] + (["background", "mask"] if r.replace else [])
        return ('from diffusers.utils import load_image, load_video\n'
                'reference = load_image("reference.png")\n'
                + "".join(f'{v} = load_video("{v}.mp4")\n' for v in videos)), (
            "image=reference, " + "".join(f"{v}_video={v}, " for v in videos) + ('mode="replace", ' if r.replace else ""))
    if variant.last_frame:
        return ('from diffusers.utils import load_image\n'
                'first, last = load_image("first_frame.png"), load_image("last_frame.png")\n'), "image=first, last_image=last, "
    if variant.is_i2v:
        return 'from diffusers.utils import load_image\nfirst = load_image("first_frame.png")\n', "image=first, "
    return "", ""


def _diffusers_section(variant: Variant, files: dict[tuple[str, str], str], base: str, r) -> str:
    load, kwargs = _inputs_code(variant, r)
    # The diffusers file, else the comfyui one (diffusers reads both); A14B: the low-noise file into transformer_2.
    chosen = {label: files.get((label, "diffusers")) or files.get((label, "comfyui")) for label, _ in files}
    lora = "".join(f'pipe.load_lora_weights(".", weight_name="{name}"'
                   + (f', adapter_name="{label}"' if variant.two_experts else "")
                   + (", load_into_transformer_2=True" if label == "low_noise" else "") + ")\n"
                   for label, name in chosen.items() if name)
    code = (f"import torch\nfrom diffusers import {pipeline_class(variant).__name__}\nfrom diffusers.utils import export_to_video\n\n"
            f'BASE = "{base}"\n'
            'DEVICE = "cuda" if torch.cuda.is_available() else "cpu"\n'
            "DTYPE = torch.bfloat16 if DEVICE == \"cuda\" else torch.float32\n"
            f"pipe = {pipeline_class(variant).__name__}.from_pretrained(BASE, torch_dtype=DTYPE).to(DEVICE)\n"
            f"{lora}{load}"
            f"video = pipe(prompt={r.prompt!r}, {kwargs}height={r.height}, width={r.width}, "
            f"{'segment_frame_length' if variant.animate else 'num_frames'}={r.frames},\n"
            f"             num_inference_steps={r.steps}, guidance_scale={r.cfg:g}).frames[0]\n"
            f'export_to_video(video, "sample.mp4", fps={r.fps})\n')
    return f"## Use it with diffusers\n\nRun from this folder (or pass the hub repository id in place of `\".\"`):\n\n```python\n{code}```\n"


def _comfyui_section(variant: Variant, files: dict[tuple[str, str], str], workflow: str | None, replace: bool) -> str:
    from .comfyui_workflow import INPUTS, TEXT_ENCODER, model_files

    models, vae = model_files(variant)
    adapters = [n for (_, fmt), n in files.items() if fmt == "comfyui"]
    lines = ["## Use it in ComfyUI\n",
             f"1. Copy {', '.join(f'`{a}`' for a in adapters) or 'the comfyui adapter'} into `ComfyUI/models/loras/`.",
             f"2. The base: {', '.join(f'`{m}`' for m in models)} in `models/diffusion_models/`, `{TEXT_ENCODER}` in "
             f"`models/text_encoders/`, `{vae}` in `models/vae/`"
             + (" (Comfy-Org's repackaged Wan files)." if not variant.tiny else " (a tiny test model: no ComfyUI release).")]
    if workflow:
        needs = [INPUTS[k] for k in workflow_inputs(variant, replace)]
        lines.append(f"3. Open `{workflow}` (an API-format workflow: load it in ComfyUI, or POST it to `/prompt`)"
                     + (f"; put {', '.join(f'`{n}`' for n in needs)} in `ComfyUI/input/`" if needs else "") + ".")
    return "\n".join(lines) + "\n"


def workflow_inputs(variant: Variant, replace: bool = False) -> list[str]:
    """What a render of the variant reads besides the prompt (keys of comfyui_workflow.INPUTS)."""
    if variant.vace:
        return ["reference", "control", "mask"]
    if variant.animate:
        return ["reference", "pose", "face"] + (["background", "mask"] if replace else [])
    return ["first", "last"] if variant.last_frame else ["first"] if variant.is_i2v else []


def _sample_section(variant: Variant, files: dict[tuple[str, str], str], base: str, r) -> str:
    adapters = [n for (_, fmt), n in files.items() if fmt == "comfyui"] or list(files.values())[:2]
    extra = {"VACE": " --reference-image reference.png --control-video control.mp4 --mask-video mask.mp4"
                     f" --conditioning-scale {r.conditioning_scale:g}",
             "FLF2V": " --image first_frame.png --last-image last_frame.png", "I2V": " --image first_frame.png",
             "Animate": " --reference-image reference.png --pose-video pose.mp4 --face-video face.mp4"
                        + (" --background-video background.mp4 --mask-video mask.mp4" if r.replace else "")}.get(variant.kind, "")
    loras = " ".join(f"--lora {a}" for a in adapters)
    return (f"## Use it with wan-tune\n\n```bash\nwan-tune sample --base {base} {loras} --prompt {json.dumps(r.prompt)}"
            f"{extra} --frames {r.frames}\n```\n")


def render_settings(recipe: Recipe, variant: Variant):
    """What the ComfyUI workflow renders: the recipe's first validation prompt, at its size, frames,
    steps, guidance and the run's shift."""
    from .comfyui_workflow import Render

    v = recipe.validation
    return Render(prompt=v.prompts[0] if v.prompts else f"{recipe.caption.trigger_word} style".strip(), negative="",
                  width=v.width or all_resolutions(recipe)[0][1], height=v.height or all_resolutions(recipe)[0][0],
                  frames=v.frames, steps=v.steps, cfg=v.guidance_scale, fps=variant.fps, seed=v.seed,
                  shift=inference_shift(recipe, variant), conditioning_scale=recipe.vace.conditioning_scale,
                  replace=variant.animate and recipe.animate.mode == "replace")


def base_reference(recipe: Recipe, variant: Variant, final: Path) -> str:
    """How the card names the base: a hub id (the recipe's, else the variant's, also when the run read
    a local copy), else (the tiny test models) its folder relative to the export folder `final`:
    a published card names no path of the machine it was made on."""
    path = recipe.model.path
    if path and not Path(path).expanduser().exists():
        return path  # a hub id
    if variant.hub_id:
        return variant.hub_id
    if not path:
        from ..models.loading import resolve_source

        path = str(resolve_source(variant).folder)
    return os.path.relpath(Path(path).expanduser().absolute(), final.absolute())


def shareable_yaml(recipe: Recipe, final: Path) -> str:
    """The recipe as YAML with every absolute path made relative to the export folder `final`."""

    def relative(value):
        if isinstance(value, dict):
            return {k: relative(v) for k, v in value.items()}
        if isinstance(value, list):
            return [relative(v) for v in value]
        if isinstance(value, str) and os.path.isabs(value):
            return os.path.relpath(value, final.absolute())
        return value

    body = yaml.safe_dump(relative(yaml.safe_load(to_yaml(recipe))), sort_keys=False, allow_unicode=True)
    return "# Paths are relative to the folder of this file (the export).\n" + body


def write_share_files(recipe: Recipe, state: dict, checkpoint: Path, out: Path, stem: str,
                      files: dict[tuple[str, str], str], final: Path | None = None) -> list[Path]:
    """The ComfyUI workflow (when a comfyui adapter was written), the samples and the model card, beside the adapters."""
    from ..data.atomic import write_json, write_text
    from .comfyui_workflow import workflow

    variant = get_variant(recipe.model.variant)
    written, workflow_name = [], None
    comfy = {e: files[(expert_label(variant, e), "comfyui")] for e in variant.experts
             if (expert_label(variant, e), "comfyui") in files}
    if comfy:
        workflow_name = f"{stem}-comfyui-workflow.json"
        written.append(write_json(out / workflow_name, workflow(variant, comfy, render_settings(recipe, variant))))
    samples = copy_samples(checkpoint, state["step"], out)
    facts = run_facts(recipe, checkpoint, state["step"])
    facts["init_from"] = (state.get("training") or {}).get("init_from", [])  # adapter.init_from, as recorded
    # The data the checkpoint trained on, as recorded then (shards prepped since would say otherwise);
    # a checkpoint from before the record: the shards as they are.
    data = state.get("data") if "data" in state else data_facts(recipe.data.shards)
    final = final or out  # where the files are delivered (out: their staging folder)
    card = model_card(recipe, facts, data, files, samples, base_reference(recipe, variant, final), workflow_name,
                      shareable_yaml(recipe, final))
    written.append(write_text(out / "README.md", card))
    written.append(write_text(out / "recipe.yaml", shareable_yaml(recipe, final)))  # the run's recipe, to train it again
    return written + samples
