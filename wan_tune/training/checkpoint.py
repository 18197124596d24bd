"""Checkpoints: `<output_dir>/<run>/step-NNNNNN/`, written whole or not at all.

```
step-000250/
  trainable.safetensors   the trained weights at full shape (LoRA adapters, or the whole transformer),
                          gathered from the ranks' shards under ZeRO-3 / FSDP2
  trainable.transformer_2.safetensors, optimizer.transformer_2.*
                          Wan2.2 A14B: the low-noise expert's files (the high-noise one's are the above)
  optimizer.safetensors   optimizer state tensors; optimizer.json: param groups + scalars
                          (FSDP2: whole tensors keyed by parameter name, so any world size resumes)
  state.json              step, batches consumed, lr-scheduler state per expert, world size and
                          context-parallel degree (their quotient deals the data), sharding,
                          and the size + CRC-32 of every other file but recipe.yaml (checked before
                          the checkpoint is resumed from or exported); how it was trained (variant,
                          method, rank, alpha, targets, experts) and on what data (the index's hash,
                          the prep settings, clips, hours: training/facts.py); a format version and a
                          checksum of all of it, so an edited state.json is refused, never trusted
  recipe.yaml             the resolved recipe: export and resume need no flags
  deepspeed/              DeepSpeed runs only: the engine's own (partitioned) checkpoint
```

Everything is written into `.step-NNNNNN.tmp/` and renamed when complete, so a checkpoint
killed half-way is never chosen. Only rank 0 writes; the other ranks take part in the gathers.
Loads never unpickle, except DeepSpeed's partitioned optimizer state, which only DeepSpeed can
read (it uses torch.load).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from ..data.atomic import file_digest, save_tensors, write_json, write_text
from ..parallel.sharding import fsdp2_load, fsdp2_optimizer_state, full_shape, gather_trainable, sharding
from .errors import CheckpointError

STEP_DIR = re.compile(r"^step-(\d{6,})$")
STATE_FORMAT = 2  # 2: a checksum, the training and data facts (training/facts.py)
EXPERTS = ("transformer", "transformer_2")  # the pipeline components a checkpoint may hold weights of


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"step-{step:06d}"


def step_number(path: str | Path) -> int:
    """N of a `step-N` folder; -1 for any other name (a folder given to --resume may be named anything)."""
    m = STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else -1


def step_folders(run_dir: str | Path) -> list[Path]:
    """Every `step-N/` folder of a run, complete or not, oldest first (temporaries are never listed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (those with state.json), oldest first."""
    return [p for p in step_folders(run_dir) if (p / "state.json").is_file()]


BEST_FILE = "best.json"


def prune_checkpoints(run_dir: Path, keep_last: int, keep: Path | None = None) -> None:
    """Delete all but the newest `keep_last` checkpoints (0: keep all), and `keep`."""
    if keep_last:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            if keep is None or old.name != Path(keep).name:
                shutil.rmtree(old, ignore_errors=True)


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `<run>/best.json` names (the lowest held-out loss so far), if it still exists.
    A damaged best.json is a CheckpointError naming it (it is never guessed around)."""
    path = Path(run_dir) / BEST_FILE
    if not path.is_file():
        return None
    try:
        name = json.loads(path.read_text(encoding="utf-8")).get("checkpoint")
        if not (name is None or (isinstance(name, str) and STEP_DIR.match(name))):
            raise ValueError(f"'checkpoint' is {name!r}, not a step-NNNNNN folder of the run")
    except (ValueError, AttributeError) as err:
        raise CheckpointError(f"{path} is damaged ({str(err).splitlines()[0][:120]}); delete it: a run with "
                              "data.holdout > 0 writes it again at its next held-out score (export a step folder meanwhile)") from None
    return Path(run_dir) / name if name and (Path(run_dir) / name / "state.json").is_file() else None


def state_checksum(state: dict) -> str:
    """SHA-256 (16 hex digits) of state.json's content without its checksum, keys sorted: what
    makes an edited state.json (a file list emptied, a step changed) tell on itself."""
    body = json.loads(json.dumps({k: v for k, v in state.items() if k != "checksum"}))  # as read back (int keys -> str)
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def read_state(path: Path) -> tuple[dict | None, str | None]:
    """(state.json of a step folder, None) or (None, why it cannot be read or be trusted)."""
    try:
        state = json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "no state.json"
    except (OSError, ValueError) as err:
        return None, f"state.json is not readable JSON ({str(err).splitlines()[0][:120]})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return None, "state.json holds no step"
    why = _untrusted(Path(path), state)
    if why:
        return None, why
    experts = state.get("experts", ["transformer"])
    if not (isinstance(experts, list) and experts and set(experts) <= set(EXPERTS)):
        return None, f"state.json names unknown experts {experts!r}"
    files = state.get("files", {})
    inside = Path(path).resolve()
    if not isinstance(files, dict) or not all(isinstance(v, dict) and isinstance(v.get("bytes"), int)
                                              and isinstance(v.get("crc32"), str) for v in files.values()):
        return None, "state.json's file list is malformed"
    if any(not (Path(path) / n).resolve().is_relative_to(inside) for n in files):
        return None, "state.json lists files outside its folder"
    return state, None


def _untrusted(path: Path, state: dict) -> str | None:
    """Why state.json's content cannot be taken as written: a newer format, a checksum that does not
    match (it was edited), a step its folder's name contradicts, an emptied file list."""
    version = state.get("format_version", 1)  # 1: before the checksum (no key)
    if not isinstance(version, int) or version > STATE_FORMAT:
        return f"state.json is format {version!r}, written by a newer wan-tune: update wan-tune to use it"
    if version >= 2 and state.get("checksum") != state_checksum(state):
        return "state.json was changed after it was saved (its checksum does not match its content)"
    named = step_number(path)
    if named >= 0 and named != state["step"]:
        return f"state.json says step {state['step']} but its folder is {path.name}"
    if state.get("files") == {}:  # every wan-tune that records files records at least the weights
        return "state.json lists no files (its checksums were removed)"
    return None


def required_files(state: dict) -> list[str]:
    """The files a step folder must hold to be resumed from, besides state.json."""
    names = ["recipe.yaml"]
    for expert in state.get("experts", ["transformer"]):
        names.append(expert_file("trainable.safetensors", expert))
        if not state.get("deepspeed"):
            names += [expert_file("optimizer.safetensors", expert), expert_file("optimizer.json", expert)]
        if expert in state.get("ema", {}):
            names.append(expert_file("ema.safetensors", expert))
    return names


def checkpoint_damage(path: Path, deep: bool = False) -> str | None:
    """Why the step folder cannot be used, or None. Reads state.json, checks that every file it
    needs is there at its recorded size and that every safetensors header reads; `deep` also
    checks each recorded file's CRC-32 (one read of the checkpoint, before it is loaded)."""
    from safetensors import safe_open

    path = Path(path)
    state, why = read_state(path)
    if state is None:
        return why
    recorded = state.get("files", {})  # checkpoints of wan-tune before 0.x record none: checked by header
    missing = [name for name in [*required_files(state), *recorded] if not (path / name).is_file()]
    if missing:
        return f"{', '.join(sorted(set(missing))[:3])} missing"
    for name, want in sorted(recorded.items()):
        size = (path / name).stat().st_size
        if size != want["bytes"]:
            return f"{name} is {size:,} bytes, {want['bytes']:,} when saved (cut off or changed)"
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error types (header too large, not JSON, offsets)
            return f"{file.name} is damaged ({str(err).splitlines()[0][:160] if str(err) else type(err).__name__})"
    for file in sorted(path.glob("optimizer*.json")):
        try:
            meta = json.loads(file.read_text(encoding="utf-8"))
            if not (isinstance(meta, dict) and "param_groups" in meta and "scalars" in meta):
                raise ValueError("no param_groups / scalars")
        except ValueError as err:
            return f"{file.name} is damaged ({str(err).splitlines()[0][:120]})"
    return digest_mismatch(path, state, sorted(recorded)) if deep else None


def digest_mismatch(path: Path, state: dict, names: list[str]) -> str | None:
    """Which of `names` no longer matches the size and CRC-32 state.json recorded (None: all do, or none recorded)."""
    recorded = state.get("files", {})
    for name in names:
        if name in recorded:
            got = file_digest(Path(path) / name)
            if got != recorded[name]:
                return (f"{Path(path) / name} does not match its size and CRC-32 in state.json ({got['bytes']:,} bytes, {got['crc32']}; "
                        f"saved {recorded[name]['bytes']:,} bytes, {recorded[name]['crc32']}): damaged on disk")
    return None


def remove_partial(run_dir: str | Path) -> list[Path]:
    """Delete `.step-N.tmp/` folders a killed save left behind (never chosen, only clutter)."""
    partial = sorted(Path(run_dir).glob(".step-*.tmp")) if Path(run_dir).is_dir() else []
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


def optimizer_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors for safetensors, JSON for the rest)."""
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of `optimizer_to_tensors`. State is keyed by parameter index (torch's own
    state_dict) or by parameter name (FSDP2's whole-state dict, names hold dots)."""
    state: dict[int | str, dict] = {}

    def put(entry: str, value) -> None:
        idx, key = entry.rsplit(".", 1)
        state.setdefault(int(idx) if idx.isdigit() else idx, {})[key] = value

    for name, value in tensors.items():
        put(name.removeprefix("state."), value)
    for name, value in meta["scalars"].items():
        put(name, value)
    return {"state": state, "param_groups": meta["param_groups"]}


def expert_file(stem: str, expert: str) -> str:
    """`trainable.safetensors` for the (high-noise) transformer, `trainable.transformer_2.safetensors`
    for A14B's low-noise expert; likewise optimizer.*."""
    return stem if expert == "transformer" else stem.replace(".", f".{expert}.", 1)


def save_checkpoint(accelerator, run_dir: Path, step: int, trainees: list, consumed: int, recipe_yaml: str, keep_last: int,
                    keep: Path | None = None, cp: int = 1, facts: dict | None = None) -> Path:
    """Write step-N for every trainee (collective: every rank calls it). Returns the final path.
    `keep_last` rotates old checkpoints out, except `keep` (the best one by the held-out loss).
    `consumed` counts one rank's batches; `cp` (train.context_parallel) says how many ranks read each;
    `facts` (training/facts.py): how it was trained and on what data, recorded under state.json's checksum.

    Weights are gathered to full shape one module at a time (only rank 0 keeps the copies), and
    every tensor is checked against its parameter's whole shape before anything is written: a
    weight that is still a shard stops the save with a CheckpointError, the previous checkpoint
    stays the newest."""
    final = step_dir(run_dir, step)
    tmp = Path(run_dir) / f".{final.name}.tmp"
    kind = sharding(accelerator)
    # Collectives, every rank: whole weights (shapes checked), FSDP2's whole optimizer state.
    trainable = {tr.name: gather_trainable(accelerator, tr.model) for tr in trainees}
    optim_state = {tr.name: fsdp2_optimizer_state(tr.model, tr.optimizer) for tr in trainees} if kind == "fsdp2" else {}
    if accelerator.is_main_process:
        if not all(trainable.values()):
            raise CheckpointError("no trainable parameters found on the unwrapped model")
        shutil.rmtree(tmp, ignore_errors=True)
        with _save_failure(run_dir, final, tmp):
            tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
    if deepspeed:
        accelerator.save_state(str(tmp / "deepspeed"))  # collective: each rank writes its partition
    if accelerator.is_main_process:
        with _save_failure(run_dir, final, tmp):
            _write_main(tmp, final, step, trainees, trainable, optim_state, consumed, recipe_yaml, deepspeed, kind,
                        accelerator.num_processes, cp, facts or {})
        prune_checkpoints(run_dir, keep_last, keep)
    accelerator.wait_for_everyone()
    return final


@contextmanager
def _save_failure(run_dir: Path, final: Path, tmp: Path):
    """A save that cannot be written (full disk, quota, a folder gone read-only) leaves no partial
    folder and stops the run with the reason; the checkpoints already written are untouched."""
    try:
        yield
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        whole = step_folders(run_dir)
        kept = f"the newest whole checkpoint is still {whole[-1].name}" if whole else "no earlier checkpoint exists"
        raise CheckpointError(f"could not save {final.name} in {run_dir} ({err.strerror or err}): nothing of it was "
                              f"kept and {kept}; free space (or fix the folder) and rerun to resume") from None


def _write_main(tmp: Path, final: Path, step: int, trainees: list, trainable: dict, optim_state: dict, consumed: int,
                recipe_yaml: str, deepspeed: bool, kind: str, world: int, cp: int, facts: dict) -> None:
    """The main process's files of step-N, into `tmp`, then renamed to `final`."""
    for tr in trainees:
        save_tensors(tmp / expert_file("trainable.safetensors", tr.name), trainable[tr.name], {"step": str(step)})
        if tr.ema is not None:  # train.ema_decay: the average, under the same names
            save_tensors(tmp / expert_file("ema.safetensors", tr.name), tr.ema.tensors(), {"step": str(step)})
        if not deepspeed:
            tensors, meta = optimizer_to_tensors(optim_state.get(tr.name) or tr.optimizer.state_dict())
            save_tensors(tmp / expert_file("optimizer.safetensors", tr.name), tensors)
            write_json(tmp / expert_file("optimizer.json", tr.name), meta)
    write_text(tmp / "recipe.yaml", recipe_yaml)
    # Every machine-written file, DeepSpeed's own too; not recipe.yaml, which people read and may edit.
    files = sorted(f for f in tmp.rglob("*") if f.is_file() and f.name != "recipe.yaml")
    state = {
        "format_version": STATE_FORMAT, "step": step, "batches_consumed": consumed, "experts": [tr.name for tr in trainees],
        "schedulers": {tr.name: tr.scheduler.state_dict() for tr in trainees},
        "world_size": world, "context_parallel": cp, "deepspeed": deepspeed, "sharding": kind,
        **({"ema": {tr.name: {"updates": tr.ema.updates, "decay": tr.ema.average.decay} for tr in trainees}}
           if any(tr.ema is not None for tr in trainees) else {}),
        "files": {f.relative_to(tmp).as_posix(): file_digest(f) for f in files}, **facts,
    }
    write_json(tmp / "state.json", {**state, "checksum": state_checksum(state)})
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def load_checkpoint(accelerator, path: Path, trainees: list) -> dict:
    """Restore every trainee's weights, optimizer and scheduler from step-N; returns its state.json."""
    from safetensors.torch import load_file

    path = Path(path)
    state, why = read_state(path)
    if state is None:
        raise CheckpointError(f"{path} is not a checkpoint to resume from ({why})")
    if state["deepspeed"] != (accelerator.distributed_type.name == "DEEPSPEED"):
        raise CheckpointError(f"{path} was written {'with' if state['deepspeed'] else 'without'} DeepSpeed; resume it the same way")
    kind = sharding(accelerator)
    if (state.get("sharding") == "fsdp2") != (kind == "fsdp2"):
        raise CheckpointError(f"{path} was written {'with' if kind != 'fsdp2' else 'without'} FSDP2; resume it the same way")
    saved = state.get("experts", ["transformer"])
    if saved != [tr.name for tr in trainees]:
        raise CheckpointError(f"{path} holds the experts {saved}, this run trains {[tr.name for tr in trainees]}: "
                              "resume with the same model.experts")
    schedulers = state.get("schedulers") or {"transformer": state["scheduler"]}  # one-scheduler checkpoints
    if state["deepspeed"]:
        accelerator.load_state(str(path / "deepspeed"))
    for tr in trainees:
        unwrapped = accelerator.unwrap_model(tr.model)
        optim_file, optim_meta = path / expert_file("optimizer.safetensors", tr.name), path / expert_file("optimizer.json", tr.name)
        if state["deepspeed"]:
            pass  # weights and optimizer came back with DeepSpeed's own checkpoint
        elif kind == "fsdp2":  # whole tensors, read on rank 0 and scattered to every rank's shards
            weights, optim = {}, {}
            if accelerator.is_main_process:
                weights = _read_weights(path, unwrapped, tr.name)
                optim = optimizer_from_tensors(load_file(str(optim_file)), json.loads(optim_meta.read_text()))
            fsdp2_load(unwrapped, tr.optimizer, weights, optim)
        else:
            params = dict(unwrapped.named_parameters())
            with torch.no_grad():
                for name, value in _read_weights(path, unwrapped, tr.name).items():
                    params[name].copy_(value)
            tr.optimizer.load_state_dict(optimizer_from_tensors(load_file(str(optim_file)), json.loads(optim_meta.read_text())))
        tr.scheduler.load_state_dict(schedulers[tr.name])
        saved_ema = state.get("ema", {}).get(tr.name)
        if tr.ema is not None and saved_ema is not None:
            ema_file = path / expert_file("ema.safetensors", tr.name)
            try:
                tr.ema.load(load_file(str(ema_file)), saved_ema["updates"], str(ema_file))
            except ValueError as err:
                raise CheckpointError(f"{err}: another recipe?") from None
        elif tr.ema is not None:  # EMA turned on at this resume: it starts from the weights just loaded
            tr.ema.restart(tr.params)
    return state


def _read_weights(path: Path, model, expert: str = "transformer") -> dict[str, torch.Tensor]:
    """An expert's trainable weights, refused unless every tensor names a parameter of this model at its whole shape."""
    from safetensors.torch import load_file

    weights = load_file(str(path / expert_file("trainable.safetensors", expert)))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise CheckpointError(f"{path}: weights for modules this model lacks ({missing[:3]}...): another recipe?")
    wrong = [f"{n} {tuple(v.shape)} vs {tuple(full_shape(params[n]))}" for n, v in weights.items() if v.shape != full_shape(params[n])]
    if wrong:
        raise CheckpointError(f"{path / expert_file('trainable.safetensors', expert)}: tensors of the wrong shape ({wrong[:3]}): another recipe?")
    return weights
