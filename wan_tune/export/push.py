"""`wan-tune push CHECKPOINT_OR_EXPORT REPO_ID` and `export --push-to-hub`: the export folder
(adapters, ComfyUI workflow, model card, samples, recipe) to a Hugging Face Hub model repository:
exactly the files its manifest lists, as they are (a card edited since goes up edited).

Checked before any work: not offline, a token (from `hf auth login`, HF_TOKEN or the token file),
a well-formed repository id. One `upload_folder` call is one commit: the hub has all of it or
none, and the local export is only read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .delivery import MANIFEST

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class PushError(RuntimeError):
    """The push cannot start or did not finish; the message says why and what to do."""


def repo_id_problem(repo_id: str) -> str | None:
    """What the Hub would refuse in `repo_id` (its own rules: letters, digits, `-_.`, no `--` or
    `..`, no leading or trailing `-`/`.`, not ending in `.git`, 96 characters a part), or None."""
    if not _REPO_ID.match(repo_id or ""):
        return "owner/name of letters, digits, '-', '_', '.'"
    for part in repo_id.split("/"):
        if "--" in part or ".." in part:
            return f"'--' and '..' are not allowed ({part})"
        if part[-1] in "-." or part.endswith(".git"):
            return f"a name may not end in '-', '.' or '.git' ({part})"
    return None


def preflight(repo_id: str) -> str:
    """The token to push with, or a one-line PushError saying what is missing."""
    from huggingface_hub import constants, get_token

    problem = repo_id_problem(repo_id)
    if problem:
        raise PushError(f"{repo_id!r} is not a Hub repository id ({problem}): give it as owner/name, e.g. "
                        "my-studio/my-brand-wan-lora (nothing was uploaded)")
    if constants.HF_HUB_OFFLINE:
        raise PushError("the Hugging Face Hub is switched off here (HF_HUB_OFFLINE=1): unset it on a machine with network "
                        "access and push again (nothing was uploaded)")
    token = get_token()
    if not token:
        raise PushError("no Hugging Face token: run `hf auth login` (or set HF_TOKEN) with a token that can write, then "
                        "push again (nothing was uploaded)")
    return token


def export_folder(path: str | os.PathLike, say=print) -> Path:
    """The export folder to upload: `path` itself when it is one, else the export of the checkpoint
    `path` as it exists (its recipe's export folder), written first only when there is none."""
    from .delivery import read_manifest

    path = Path(path)
    if read_manifest(path) is not None:
        return path
    if (path / "state.json").is_file() or path.name == "best":
        from ..config import load_recipe
        from .run import export, export_destination, resolve_checkpoint

        checkpoint = resolve_checkpoint(path)
        folder = export_destination(checkpoint, load_recipe(checkpoint / "recipe.yaml"))  # its export.out, no weights read
        if read_manifest(folder) is not None:
            say(f"uploading the export that exists in {folder}, as it is")
            return folder
        say(f"{checkpoint} has no export yet: exporting it first")
        checks = export(checkpoint, say=lambda *_: None)  # the recipe's formats, into its export folder
        if not checks or not all(c.ok for c in checks):
            raise PushError(f"the export of {path} failed its self-test: nothing was uploaded")
        return folder
    if (path / "README.md").is_file() and any(path.glob("*.safetensors")):
        raise PushError(f"{path} has no {MANIFEST} (an export by an older wan-tune, or files put together by hand): "
                        "push uploads only what an export wrote; export the checkpoint again into a new folder")
    raise PushError(f"{path} is neither a wan-tune export folder ({MANIFEST}) nor a checkpoint folder")


def upload_names(folder: Path) -> list[str]:
    """The files the export wrote, as `upload_folder` patterns that match each one alone; a file the
    manifest lists that is gone is refused (the upload would not be the export)."""
    import glob

    from .delivery import read_manifest

    listed = [MANIFEST, *sorted(read_manifest(folder)["files"])]
    missing = [n for n in listed if not (folder / n).is_file()]
    if missing:
        raise PushError(f"{folder / missing[0]} is listed in {MANIFEST} but missing: export the checkpoint again "
                        "(nothing was uploaded)")
    return [glob.escape(n) for n in listed]


def push(path: str | os.PathLike, repo_id: str, private: bool = False, revision: str | None = None, say=print, api=None) -> str:
    """Upload the export of `path` to `repo_id` (created if needed) in one commit; returns its URL."""
    token = preflight(repo_id)
    folder = export_folder(path, say)
    names = upload_names(folder)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        say(f"uploading {folder} to {repo_id}" + (f" ({revision})" if revision else ""))
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=names,
                                   revision=revision, commit_message=f"wan-tune: {folder.name}")
    except Exception as err:  # network, permissions, quota: one line, the local export as it was
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PushError(f"upload to {repo_id} failed ({type(err).__name__}: {first[:200]}); nothing was committed; "
                        f"the export in {folder} is kept as it is: push again") from None
    url = getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    say(f"pushed: {url}")
    return url
