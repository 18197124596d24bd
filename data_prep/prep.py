"""`wan-tune prep`: footage + captions -> latent shards, resumable, one share per rank.

Top to bottom: find the items, caption them if the review file is missing, plan the windows
(skipping bad inputs with a reason), encode what is not done yet, merge the index, report.
Under `accelerate launch` every rank plans and encodes its own items (round-robin by path) and
writes its own files; rank 0 merges the index and writes the report.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wan_tune.config import Recipe, to_yaml
from wan_tune.config.sources import DEFAULT_NAME, Source, data_sources
from wan_tune.data import shards
from wan_tune.data.atomic import writable_problem, write_json, write_text
from wan_tune.data.progress import progress_bar
from wan_tune.media.animate_inputs import check_animate_inputs
from wan_tune.media.footage import SkipClip, Window, pictures, probe, read_frames, unsupported_reason
from wan_tune.media.vace_inputs import check_inputs, mask_problem, window_frames
from wan_tune.media.vace_media import ConditioningError, reference_images
from wan_tune.models import get_variant
from wan_tune.models.loading import recipe_source
from wan_tune.models.precision import DTYPES
from wan_tune.parallel.process_group import process_state

from .animate_prep import animate_tensors
from .buckets import aspect_buckets, fit_problem, nearest_bucket, resize_crop
from .captions import caption_recipe, read_caption_lists
from .encode import Encoders, settings_hash
from .sources import SourceItem, discover_all
from .video import plan_windows

REPORT_FILE = "prep_report.csv"
PLAN_FILE = ".plan-rank{rank}.json"


class PrepError(RuntimeError):
    """Prep cannot start or produced nothing; the message says why."""


@dataclass
class Sample:
    id: str
    item: SourceItem
    window: Window
    bucket: tuple[int, int, int]  # (frames, height, width)
    caption: str
    source: Source
    alternates: tuple[str, ...] = ()
    """The clip's further captions: each stored as `text.<n>`, one drawn per step in training."""

    @property
    def captions(self) -> tuple[str, ...]:
        return (self.caption, *self.alternates)


class Stopped(KeyboardInterrupt):
    """A stop asked for by a signal (`signum`): the CLI exits 128 + signum (130 Ctrl-C, 143 SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class CtrlC:
    """Ctrl-C or SIGTERM (a scheduler's, `kill`) while encoding is noted by the handler and acted
    on between clips: what is encoded so far is written whole. Raised from the handler, the stop
    could land anywhere, e.g. in decord's VideoReader.__del__, where Python swallows it and prep
    ran on. A second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    @property
    def pressed(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, _frame):
        if self.pressed:
            raise Stopped(signum)
        self.signum = signum

    def stop(self):
        raise Stopped(self.signum)

    def __exit__(self, *_):
        for s, previous in self.previous.items():
            signal.signal(s, previous)
        return False


@dataclass
class Timer:
    seconds: Counter = field(default_factory=Counter)

    def add(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] += now - since
        return now


def content_hash(path: str) -> str:
    """Size + first and last 4 MiB: tells edited footage apart without reading whole files."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with p.open("rb") as f:
        h.update(f.read(4 << 20))
        if size > 8 << 20:
            f.seek(-(4 << 20), 2)
            h.update(f.read())
    return h.hexdigest()[:16]


def prep_settings(recipe: Recipe, i2v: bool) -> dict:
    """Everything besides the source file and caption that decides a sample's tensors: the
    shared settings, then each source's own (`data.sources`) or the one source's (`data.source`)."""
    d = recipe.data
    shared = {"max_text_tokens": d.max_text_tokens, "shard_dtype": d.shard_dtype, "i2v": i2v}
    if get_variant(recipe.model.variant).animate:  # its conditioning differs by task: both in every sample id
        shared["animate_mode"] = recipe.animate.mode
    sources = data_sources(recipe)
    if d.sources:
        return shared | {f"{s.name}.{k}": v for s in sources for k, v in s.settings().items()}
    own = sources[0].settings() if sources else {}
    if own.get("frame_extraction") == "slide":  # the default since before the key: unchanged settings read so
        del own["frame_extraction"]
    return own | shared


def source_identity(src: Source, settings: dict, encoders_identity: dict) -> str:
    """What a source's sample tensors depend on besides their file, window, bucket and caption (all
    in a sample's id too): edit one source's fps and only its samples get new ids. The frame
    buckets, clip cap and stride are not here: they decide which windows exist, and a window that
    still exists keeps its id and is not re-encoded."""
    keys = ("max_text_tokens", "shard_dtype", "i2v", "animate_mode")
    return settings_hash({"fps": src.fps} | {k: settings[k] for k in keys if k in settings} | encoders_identity)


def _plan_item(item: SourceItem, captions: list[str], src: Source, identity: str, vace: bool = False,
               animate: str | None = None) -> list[Sample]:
    """The samples of one item (`vace`: a VACE model's; `animate`: Wan2.2-Animate's mode), or SkipClip."""
    if item.problem:  # a manifest row that names no usable file or window
        raise SkipClip(item.problem)
    # The file's own defects first: a user should not caption a file that can never be used.
    if not item.supported:
        raise SkipClip(unsupported_reason(item.path))
    info = probe(item.path, item.is_image)
    if not captions:
        why = item.caption_problem or "no sidecar .txt or manifest caption"
        raise SkipClip(f"missing caption: {why}; add one in the captions file, or use caption.mode=template/vlm")
    windows = plan_windows(info, src.fps, list(src.frames), src.clip_stride, src.max_clips_per_video, item.start_s,
                           item.end_s, src.frame_extraction)
    if vace:
        check_inputs(item.vace, info)
    if animate:
        check_animate_inputs(item.vace, info, animate)
    # A conditioned clip's files decide its tensors too: edit one, and the clip is encoded again.
    digest = content_hash(item.path) + "".join(content_hash(f) for f in item.vace.files() if vace or animate)
    samples, problems = [], []
    for h, w in src.resolutions:
        bucket_hw = nearest_bucket(info.height, info.width, aspect_buckets(h, w))
        problem = fit_problem(info.height, info.width, bucket_hw)
        if problem:
            problems.append(problem)
            continue
        for win in windows:
            # One caption keeps the id it always had; several are all in it (edit one, and the clip is encoded again).
            caption = captions[0] if len(captions) == 1 else list(captions)
            key = {"content": digest, "key": item.key, "start": win.start_frame, "frames": win.frames,
                   "bucket": bucket_hw, "caption": caption, "settings": identity}
            sid = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
            samples.append(Sample(sid, item, win, (win.frames, *bucket_hw), captions[0], src, tuple(captions[1:])))
    if not samples:
        raise SkipClip(problems[0])
    return samples


def plan(items: list[tuple[Source, SourceItem]], captions: dict[str, list[str]], recipe: Recipe, identities: dict[str, str],
         progress: bool):
    """The samples of `items` ((source, item) pairs), and a report line for each item that gives none."""
    samples, skips = [], []
    variant = get_variant(recipe.model.variant)
    animate = recipe.animate.mode if variant.animate else None
    for src, item in progress_bar(items, desc="probe", unit="file", disable=not progress):
        try:
            samples += _plan_item(item, captions.get(item.key) or [], src, identities[src.name], variant.vace, animate)
        except SkipClip as err:
            skips.append(skip_line(src, item, err))
    return samples, skips


def _note_skip(skips: list, line: tuple[str, str]) -> None:
    """One report line per input and reason: a clip deleted while prep ran fails each of its windows alike."""
    if line not in skips:
        skips.append(line)


def skip_line(src: Source, item: SourceItem, err: SkipClip) -> tuple[str, str, str]:
    """(what, why, source name) for the report: a manifest row is named by its row number too."""
    return item.key, f"manifest row {item.row}: {err}" if item.row else str(err), src.name


def _announce_changes(root: Path, settings: dict, encoder_identity: dict, say) -> None:
    try:
        old = shards.read_meta(root)
    except shards.ShardFormatError:
        return
    before = {**old.get("settings", {}), **{f"encoder.{k}": v for k, v in old.get("encoders", {}).items()}}
    now = {**settings, **{f"encoder.{k}": v for k, v in encoder_identity.items()}}
    changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(now) if before.get(k) != now.get(k)]
    if changed:
        say("prep settings changed since the last run (" + "; ".join(changed) + "): affected samples get new ids and are re-encoded")


def run_prep(recipe: Recipe, strict: bool = False, progress: bool = True, say=print, verify: bool = False) -> dict:
    """Run prep for this process's share; returns the summary (complete on rank 0).

    Data files already written are checked first (their headers; with `verify`, every sample's
    checksum too): a damaged one is deleted with its index part, and its samples are encoded again."""
    state = process_state()
    main = state.is_main_process
    say = say if main else (lambda *_: None)
    progress = progress and main
    timer = Timer()
    t = time.perf_counter()

    root = Path(recipe.data.shards)
    for key, folder in (("data.shards", root), ("data.captions", Path(recipe.data.captions).parent)):
        problem = writable_problem(folder)
        if problem:
            raise PrepError(f"{key}: {problem}; set {key} to a writable place")
    variant = get_variant(recipe.model.variant)
    i2v = variant.is_i2v if recipe.data.task == "auto" else recipe.data.task == "i2v"
    found = discover_all(recipe)
    items = [item for _, item_list in found for item in item_list]
    _announce_unused_vace(items, variant, say)
    captions_path = Path(recipe.data.captions)
    if main:
        if not captions_path.is_file():
            say(f"no caption file at {captions_path}: captioning first (mode={recipe.caption.mode}); "
                "review it and rerun prep to change captions")
        # Adds rows for clips added since the last run (their sidecars, template or VLM text);
        # rows already in the file, reviewed or not, are kept as they are.
        caption_recipe(recipe, progress, found)
    state.wait_for_everyone()
    captions = read_caption_lists(captions_path)
    t = timer.add("caption", t)

    encoders = _load_encoders(recipe, variant, i2v, state.device, say)
    settings = prep_settings(recipe, i2v)
    identities = {src.name: source_identity(src, settings, encoders.identity()) for src, _ in found}
    t = timer.add("load encoders", t)

    pairs = [(src, item) for src, item_list in found for item in item_list]
    mine = pairs[state.process_index :: state.num_processes]
    samples, skips = plan(mine, captions, recipe, identities, progress)
    t = timer.add("probe", t)
    if strict and skips:
        raise PrepError(f"--strict: {len(skips)} input(s) unusable, nothing encoded; first: {skips[0][0]}: {skips[0][1]}")

    storage = shards.DTYPES[recipe.data.shard_dtype]
    if main:
        _announce_changes(root, settings, encoders.identity(), say)
        empty = shards.save_empty_prompt(root, encoders.text([""])[0], storage)
        shards.write_meta(root, {
            "variant": variant.name, "task": variant.shard_task("i2v" if i2v else "t2v"), "encoders": encoders.identity(),
            "vae": encoders.vae_meta(), "settings": settings, "settings_hash": settings_hash(identities),
            "text_dim": variant.transformer["text_dim"], "recipe": to_yaml(recipe), "empty_prompt_checksum": empty,
        })
        _check_existing(root, verify, say)
    state.wait_for_everyone()

    done = set(shards.read_parts(root)["id"])
    todo = [s for s in samples if s.id not in done]
    say(f"{len(samples)} clip(s) planned on this rank, {len(samples) - len(todo)} already encoded, {len(todo)} to encode")
    writer = shards.ShardWriter(root, state.process_index, recipe.data.samples_per_shard, storage)
    try:
        _encode(todo, encoders, writer, i2v, skips, timer, progress)
    except KeyboardInterrupt:  # Ctrl-C: the samples encoded so far are written, then the stop goes on up
        writer.close()
        raise
    t = time.perf_counter()
    writer.close()
    timer.add("write", t)

    write_json(root / PLAN_FILE.format(rank=state.process_index),
               {"planned": [s.id for s in samples], "skips": skips, "seconds": dict(timer.seconds)})
    state.wait_for_everyone()
    summary = _finish(root, state.num_processes) if main else {}
    state.wait_for_everyone()
    return summary


def _load_encoders(recipe: Recipe, variant, i2v: bool, device, say) -> Encoders:
    """umT5 and the VAE (and CLIP for Wan2.1 I2V) on this rank's device; fp32 on a CPU."""
    clip = i2v and variant.clip_image_tokens
    source = recipe_source(recipe, ("vae", "text_encoder", "tokenizer") + (("image_encoder", "image_processor") if clip else ()))
    dtype, vae_dtype = DTYPES[recipe.model.dtype], DTYPES[recipe.model.vae_dtype]
    if device.type == "cpu" and (dtype, vae_dtype) != (torch.float32, torch.float32):
        # Prep's latents and embeddings are stored, not trained through: fp32 here is only faster.
        say(f"encoding in fp32 on CPU (model.dtype={recipe.model.dtype}, model.vae_dtype={recipe.model.vae_dtype} "
            "are for GPUs; this CPU has no fast bf16)")
        dtype = vae_dtype = torch.float32
    return Encoders(source, i2v, dtype, str(device), recipe.data.max_text_tokens, vae_dtype, recipe.animate.mode)


def _encode(todo: list[Sample], encoders: Encoders, writer, i2v: bool, skips: list, timer: Timer, progress: bool) -> None:
    """Decode, resize and encode each sample, handing it to the shard writer; unreadable ones go to `skips`."""
    t = time.perf_counter()
    text_cache: dict[str, torch.Tensor] = {}
    with CtrlC() as ctrl_c:
        for sample in progress_bar(todo, desc="encode", unit="clip", disable=not progress):
            if ctrl_c.pressed:  # between clips: what is encoded so far is written whole
                ctrl_c.stop()
            t = _encode_one(sample, encoders, writer, i2v, skips, timer, text_cache, t)


def _encode_one(sample: Sample, encoders: Encoders, writer, i2v: bool, skips: list, timer: Timer, text_cache: dict,
                t: float) -> float:
    """One sample decoded, encoded and handed to the writer (or to `skips` with its reason); returns the timer's clock."""
    try:
        frames = read_frames(sample.item.path, sample.window, sample.item.is_image)
    except SkipClip as err:
        _note_skip(skips, skip_line(sample.source, sample.item, err))
        return timer.add("decode+resize", t)
    video = resize_crop(frames, sample.bucket[1:])
    t = timer.add("decode+resize", t)
    for text in sample.captions:  # each caption encoded once on this rank, whichever clips share it
        if text not in text_cache:
            text_cache[text] = encoders.text([text])[0]
    t = timer.add("text encode", t)
    tensors = {"latents": encoders.latents(video), "text": text_cache[sample.caption],
               **{f"text.{n}": text_cache[text] for n, text in enumerate(sample.alternates, start=1)}}
    if encoders.animate is not None:
        try:
            tensors.update(animate_tensors(encoders.animate, sample, video, encoders.animate_mode))
        except SkipClip as err:
            _note_skip(skips, skip_line(sample.source, sample.item, err))
            return timer.add("vae encode", t)
    elif i2v:
        first, last = _still(video, 0), (_still(video, -1) if encoders.source.variant.last_frame else None)
        tensors.update(encoders.image_condition(first, sample.bucket[0], last))
    if encoders.vace is not None:
        try:
            tensors.update(_vace_tensors(encoders, sample))
        except SkipClip as err:
            _note_skip(skips, skip_line(sample.source, sample.item, err))
            return timer.add("vae encode", t)
    t = timer.add("vae encode", t)
    w = sample.window
    writer.add({"id": sample.id, "source": sample.item.name, "dataset": sample.source.name, "caption": sample.caption,
                "frames": sample.bucket[0],
                "height": sample.bucket[1], "width": sample.bucket[2], "start_frame": w.start_frame,
                "start_s": w.start_s, "end_s": w.end_s,
                "vace": sample.item.vace.to_json() if encoders.vace or encoders.animate else ""}, tensors)
    return timer.add("write", t)


def _vace_tensors(encoders: Encoders, sample: Sample) -> dict[str, torch.Tensor]:
    """The clip's VACE context from its control / mask (cut to its window, resized and cropped as
    the clip is) and reference images (whole: the pipeline fits them on its canvas)."""
    inputs, (frames, h, w) = sample.item.vace, sample.bucket

    def cut(file):
        return pictures(resize_crop(window_frames(file, sample.window), (h, w))) if file else None

    control, mask = cut(inputs.control), cut(inputs.mask)
    problem = mask_problem(mask, Path(inputs.mask).name) if mask is not None else None
    if problem:
        raise SkipClip(problem)
    try:  # checked when planned; a file changed since is a reason, not a crash
        references = reference_images(list(inputs.references), h, w)
    except ConditioningError as err:
        raise SkipClip(str(err)) from None
    return encoders.vace_condition(frames, h, w, control, mask, references)


def _announce_unused_vace(items: list[SourceItem], variant, say) -> None:
    given = [it for it in items if it.vace and (it.vace.references or it.vace.control or it.vace.mask)]
    if given and not variant.vace:
        say(f"{len(given)} clip(s) come with VACE inputs (references / control / mask, e.g. {given[0].vace.files()[0]}), "
            f"but model.variant={variant.name} is not a VACE model: they are not used. For VACE training use "
            "wan2.1-vace-1.3b or wan2.1-vace-14b")
    animate = [it for it in items if it.vace.pose or it.vace.face or it.vace.background]
    if animate and not variant.animate:
        say(f"{len(animate)} clip(s) come with Wan2.2-Animate inputs (pose / face / background videos, e.g. "
            f"{(animate[0].vace.pose or animate[0].vace.face or animate[0].vace.background)}), but "
            f"model.variant={variant.name} is not an Animate model: they are not used (wan2.2-animate-14b uses them)")


def _still(video: torch.Tensor, index: int):
    """Frame `index` of a [3, T, H, W] clip in [-1, 1] as the PIL image the I2V pipeline takes."""
    return pictures(video[:, [index]])[0]


def _check_existing(root: Path, verify: bool, say) -> None:
    for rel, why in shards.drop_damaged_parts(root):
        say(f"damaged index part {rel} ({why}): deleted; its samples are encoded again")
    for rel, why, count in shards.drop_damaged(root, deep=verify):
        say(f"damaged shard file {rel} ({why}): deleted; its {count} sample(s) are encoded again")
    foreign = shards.foreign_files(root)
    if foreign:
        say(f"left alone in {root} (not written by prep, never read): {', '.join(foreign[:5])}"
            + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""))


def per_source(index, skips: list) -> dict[str, dict[str, int]]:
    """{source name: {"samples": n, "clips": files, "skipped": inputs}} for the summary."""
    out: dict[str, dict[str, int]] = {}
    datasets = index["dataset"].fillna(DEFAULT_NAME) if "dataset" in index else [DEFAULT_NAME] * len(index)
    for name, source in zip(datasets, index["source"]):
        row = out.setdefault(name, {"samples": 0, "clips": set(), "skipped": 0})
        row["samples"] += 1
        row["clips"].add(source)
    for *_, name in skips:
        out.setdefault(name, {"samples": 0, "clips": set(), "skipped": 0})["skipped"] += 1
    return {name: {**row, "clips": len(row["clips"])} for name, row in sorted(out.items())}


def _finish(root: Path, world: int) -> dict:
    planned, skips, seconds = [], [], Counter()
    for rank in range(world):
        part = json.loads((root / PLAN_FILE.format(rank=rank)).read_text())
        planned += part["planned"]
        skips += [tuple(s) for s in part["skips"]]
        seconds.update(part["seconds"])
    index, stale = shards.merge_index(root, keep=planned)
    report = io.StringIO()
    csv.writer(report).writerows([("path", "reason", "dataset"), *skips])
    write_text(root / REPORT_FILE, report.getvalue())
    files = sorted((root / shards.DATA_DIR).glob("*.safetensors"))
    return {
        "root": str(root),
        "samples": len(index),
        "buckets": Counter(f"{r.frames}x{r.height}x{r.width}" for r in index.itertuples()),
        "by_source": per_source(index, skips),
        "skips": [(what, why) for what, why, _ in skips],  # prep_report.csv names each one's source too
        "stale": stale,
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "seconds": dict(seconds),
    }
