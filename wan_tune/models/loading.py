"""Load the parts of a Wan pipeline from wherever a user holds them.

Three layouts, one code path: (a) a hub id is first resolved to its local snapshot folder,
then everything loads from (b) a diffusers-format folder; (c) an original-key single-file
transformer (what ComfyUI users hold) takes its config from that folder, never from a guess
through the hub. The tiny variants are built into a local folder on first use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .variant_checks import architecture_mismatches, pipeline_mismatches
from .variants import Variant, get_variant, transformer_class

# Files every component needs besides weights (configs, tokenizer, processor).
_META_PATTERNS = ["model_index.json", "*.json", "*.txt", "*.model", "*.spm"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    """Where a recipe's model lives on this machine."""

    variant: Variant
    folder: Path
    """Local diffusers-format pipeline folder (a hub snapshot, a user folder, or the tiny cache)."""
    transformer_file: Path | None = None
    """Original-key single-file transformer that replaces `folder/transformer` weights."""
    transformer_2_file: Path | None = None
    """Wan2.2 A14B: the low-noise expert's single file, replacing `folder/transformer_2` weights."""

    def single_file(self, expert: str) -> Path | None:
        return self.transformer_2_file if expert == "transformer_2" else self.transformer_file

    def pipeline_config(self) -> dict:
        return read_pipeline_config(self.folder)

    @property
    def boundary_ratio(self) -> float | None:
        """Where a two-expert model hands over: the pipeline config's value, else the variant's."""
        return self.pipeline_config().get("boundary_ratio") or self.variant.boundary_ratio


def read_pipeline_config(folder: Path) -> dict:
    """A folder's model_index.json (the pipeline's own settings), or {} without one."""
    import json

    index = Path(folder) / "model_index.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or "\\" in ref or not _HUB_ID.match(ref)


def _download(repo_id: str, revision: str | None, patterns: list[str], from_recipe: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as err:  # offline, unknown repo, gated, disk full: all end the same way
        raise ModelLoadError(
            f"could not get {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}).\n"
            f"  On a machine with access, download it:\n"
            f"    hf download {repo_id} --local-dir /models/{repo_id.split('/')[-1]}\n"
            f"  then point the recipe at the folder: model.path=/models/{repo_id.split('/')[-1]}"
            + (f"\n  (there is no local folder {repo_id!r} either)" if from_recipe else "")
        ) from None


def resolve_source(
    variant: str | Variant,
    path: str | None = None,
    transformer_file: str | None = None,
    revision: str | None = None,
    components: tuple[str, ...] = ("transformer", "vae", "text_encoder", "tokenizer", "image_encoder", "image_processor"),
    transformer_2_file: str | None = None,
) -> ModelSource:
    """Find (or fetch) the folder holding `components` of a variant's pipeline.

    `path` is a local diffusers folder or a hub id; None means the variant's own hub id (or,
    for tiny variants, the locally built folder). Weights of components not asked for are not
    downloaded, nor an expert's when its single file replaces it. Asking for "transformer"
    asks for every expert of a two-expert model.
    """
    variant = get_variant(variant) if isinstance(variant, str) else variant
    file = _existing_file("model.transformer_file", transformer_file)
    file_2 = _existing_file("model.transformer_2_file", transformer_2_file)
    if file_2 is not None and not variant.two_experts:
        raise ModelLoadError(f"model.transformer_2_file: {variant.name} has one transformer; the low-noise file is for Wan2.2 A14B")
    if "transformer" in components and variant.two_experts:
        components = (*components, "transformer_2")

    if path is None and variant.tiny:
        from .tiny import ensure_tiny_pipeline

        folder = ensure_tiny_pipeline(variant)
    elif path is None or (not Path(path).expanduser().exists() and not _looks_like_path(path)):
        repo_id = path or variant.hub_id
        replaced = {"transformer": file, "transformer_2": file_2}
        weights = [c for c in components if replaced.get(c) is None]
        folder = _download(repo_id, revision, _META_PATTERNS + [f"{c}/*" for c in weights], path is not None)
    else:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(
                f"model.path: {folder} is not a folder. Point it at a diffusers-format pipeline folder "
                f"(with model_index.json) or a hub id such as {variant.hub_id or 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers'}"
            )
    if not (folder / "model_index.json").is_file() and not (folder / "transformer" / "config.json").is_file():
        raise ModelLoadError(
            f"model.path: {folder} is not a diffusers-format Wan folder (no model_index.json, no transformer/config.json)"
        )
    return ModelSource(variant=variant, folder=folder, transformer_file=file, transformer_2_file=file_2)


def recipe_source(recipe, components: tuple[str, ...] = ("transformer",)) -> ModelSource:
    """`resolve_source` with the recipe's `model` settings."""
    m = recipe.model
    return resolve_source(m.variant, m.path, m.transformer_file, m.revision, components, m.transformer_2_file)


def _existing_file(key: str, value: str | None) -> Path | None:
    if value is None:
        return None
    file = Path(value).expanduser()
    if not file.is_file():
        raise ModelLoadError(f"{key}: {file} does not exist (expected an original-key .safetensors transformer)")
    return file


def _component_dir(source: ModelSource, name: str) -> Path:
    sub = source.folder / name
    if not sub.is_dir():
        raise ModelLoadError(f"{source.folder} has no {name}/ folder; variant {source.variant.name!r} needs it")
    return sub


def check_transformer_config(source: ModelSource, expert: str = "transformer") -> dict:
    """The folder's config of a transformer (an expert), refused if it is not the recipe's variant."""
    from diffusers import WanTransformer3DModel

    if expert not in source.variant.experts:
        raise ModelLoadError(f"variant {source.variant.name!r} has no {expert!r} (experts: {', '.join(source.variant.experts)})")
    config = WanTransformer3DModel.load_config(_component_dir(source, expert))
    problems = architecture_mismatches(source.variant, config) + pipeline_mismatches(source.variant, source.pipeline_config())
    if problems:
        raise ModelLoadError(
            f"{source.folder}/{expert} does not hold model.variant={source.variant.name!r}:\n  "
            + "\n  ".join(problems)
            + "\n  Fix model.variant or model.path."
        )
    return config


def _check_single_file(source: ModelSource, expert: str) -> None:
    from safetensors import safe_open

    file = source.single_file(expert)
    key = "model.transformer_2_file" if expert == "transformer_2" else "model.transformer_file"
    assert file is not None
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
            shapes = {k: f.get_slice(k).get_shape() for k in keys if k.endswith("patch_embedding.weight")
                      and "vace_" not in k and "pose_" not in k}
    except Exception as err:
        raise ModelLoadError(f"{key}: {file} is not a readable safetensors file ({err})") from None
    keys = [k.removeprefix("model.diffusion_model.") for k in keys]
    if not any(k.startswith("blocks.0.self_attn.") for k in keys):
        hint = " (it has diffusers keys: use model.path for a diffusers folder instead)" if any(".attn1." in k for k in keys) else ""
        raise ModelLoadError(f"{key}: {file} is not an original-key Wan transformer{hint}")
    layers = len({k.split(".")[1] for k in keys if k.startswith("blocks.")})
    vace_blocks = len({k.split(".")[1] for k in keys if k.startswith("vace_blocks.")})
    patch_shape = next(iter(shapes.values()), None)  # [inner_dim, in_channels, 1, 2, 2]
    want = source.variant.transformer
    got = {"num_layers": layers, "inner_dim": patch_shape[0] if patch_shape else None,
           "in_channels": patch_shape[1] if patch_shape else None, "vace_blocks": vace_blocks}
    expected = {"num_layers": want["num_layers"], "inner_dim": source.variant.inner_dim, "in_channels": want["in_channels"],
                "vace_blocks": source.variant.vace_blocks}
    if got != expected:
        raise ModelLoadError(
            f"{key}: {file} does not hold model.variant={source.variant.name!r}: "
            f"it has {got}, the variant needs {expected}"
        )


def load_transformer(source: ModelSource, dtype: torch.dtype = torch.float32, expert: str = "transformer"):
    """A `WanTransformer3DModel` (VACE: `WanVACETransformer3DModel`, Animate: `WanAnimateTransformer3DModel`) of a source (`expert`:
    `transformer_2` is Wan2.2 A14B's low-noise expert), checked against the variant."""
    cls = transformer_class(source.variant)
    check_transformer_config(source, expert)
    file = source.single_file(expert)
    if file is None:
        model = cls.from_pretrained(source.folder, subfolder=expert, torch_dtype=dtype)
    else:
        _check_single_file(source, expert)
        if source.variant.last_frame:
            model = _from_original_keys(source, file, dtype, expert)
        else:  # `config=` a local folder keeps diffusers from guessing the variant through the hub
            model = cls.from_single_file(str(file), config=str(source.folder), subfolder=expert, torch_dtype=dtype)
    return _own_memory(model)


def load_dtypes(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Each parameter's dtype after `from_pretrained(torch_dtype=dtype)`: fp32 for the model's
    `_keep_in_fp32_modules` (the rule of diffusers' load_model_dict_into_meta), `dtype` for the rest."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    return {n: torch.float32 if any(m in n.split(".") for m in keep) else dtype for n, _ in model.named_parameters()}


def _from_original_keys(source: ModelSource, file: Path, dtype: torch.dtype, expert: str):
    """An original-key file read with wan-tune's key map. For FLF2V: diffusers' single-file
    converter (0.42) has no name for the position embedding of the two images' tokens
    (`img_emb.emb_pos`) and leaves that weight unloaded. Dtypes as from_pretrained gives them."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    from .keymap import UnmappedKeyError, to_diffusers

    with init_empty_weights():
        model = transformer_class(source.variant).from_config(check_transformer_config(source, expert))
    try:
        weights = {to_diffusers(k.removeprefix("model.diffusion_model.")): v for k, v in load_file(str(file)).items()}
    except UnmappedKeyError as err:
        raise ModelLoadError(f"{file}: {err.args[0]}; is it a {source.variant.name} transformer?") from None
    missing = sorted(set(model.state_dict()) - set(weights))
    if missing:
        raise ModelLoadError(f"{file}: {len(missing)} weight(s) of the {source.variant.name} transformer are missing, "
                             f"e.g. {', '.join(missing[:3])}; the file is incomplete or of another model")
    dtypes = load_dtypes(model, dtype)
    model.load_state_dict({k: v.to(dtypes.get(k, dtype)) for k, v in weights.items()}, assign=True)
    return model.eval()


def _own_memory(model):
    """Copy every tensor into freshly allocated memory.

    Loaders may leave tensors as views into a memory-mapped file; matmuls on such tensors took
    other CPU kernel paths (outputs off by ~7e-7 on the tiny model with identical weights), and
    in-place optimizer updates would write into mapped pages. Owned tensors make every layout
    load to bit-identical outputs. One tensor at a time, so the peak is one tensor's size.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()
    return model


def load_vae(source: ModelSource, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(_component_dir(source, "vae"), torch_dtype=dtype)


def load_text_encoder(source: ModelSource, dtype: torch.dtype = torch.float32):
    """(tokenizer, umT5 encoder)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(_component_dir(source, "tokenizer"))
    encoder = UMT5EncoderModel.from_pretrained(_component_dir(source, "text_encoder"), torch_dtype=dtype)
    return tokenizer, encoder.eval().requires_grad_(False)


def load_image_encoder(source: ModelSource, dtype: torch.dtype = torch.float32):
    """(CLIP image processor, CLIP vision encoder), for I2V variants."""
    from transformers import AutoImageProcessor, CLIPVisionModel

    if not source.variant.is_i2v:
        raise ModelLoadError(f"variant {source.variant.name!r} is text-to-video and has no image encoder")
    processor = AutoImageProcessor.from_pretrained(_component_dir(source, "image_processor"))
    encoder = CLIPVisionModel.from_pretrained(_component_dir(source, "image_encoder"), torch_dtype=dtype)
    return processor, encoder.eval().requires_grad_(False)
