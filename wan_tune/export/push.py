"""`wan-tune push CHECKPOINT_OR_EXPORT REPO_ID` and `export --push-to-hub`: the export folder
(adapters, ComfyUI workflow, model card, samples, recipe) to a Hugging Face Hub model repository.

Checked before any work: not offline, a token (from `hf auth login`, HF_TOKEN or the token file),
a well-formed repository id. One `upload_folder` call is one commit: the hub has all of it or
none, and the local export is only read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# What goes up: never the `.failed` files an export set aside.
UPLOAD_PATTERNS = ["*.safetensors", "*-comfyui-workflow.json", "README.md", "recipe.yaml", "samples/*"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class PushError(RuntimeError):
    """The push cannot start or did not finish; the message says why and what to do."""


def preflight(repo_id: str) -> str:
    """The token to push with, or a one-line PushError saying what is missing."""
    from huggingface_hub import constants, get_token

    if not _REPO_ID.match(repo_id or ""):
        raise PushError(f"{repo_id!r} is not a Hub repository id: give it as owner/name, e.g. my-studio/my-brand-wan-lora")
    if constants.HF_HUB_OFFLINE:
        raise PushError("the Hugging Face Hub is switched off here (HF_HUB_OFFLINE=1): unset it on a machine with network "
                        "access and push again (nothing was uploaded)")
    token = get_token()
    if not token:
        raise PushError("no Hugging Face token: run `hf auth login` (or set HF_TOKEN) with a token that can write, then "
                        "push again (nothing was uploaded)")
    return token


def export_folder(path: str | os.PathLike) -> Path:
    """The export folder to upload: `path` itself, or a checkpoint's `export/` (written first if missing)."""
    path = Path(path)
    if (path / "README.md").is_file() and any(path.glob("*.safetensors")):
        return path
    if (path / "state.json").is_file() or path.name == "best":
        from .run import export

        checks = export(path, say=lambda *_: None)  # the recipe's formats, into its export folder
        if not checks or not all(c.ok for c in checks):
            raise PushError(f"the export of {path} failed its self-test: nothing was uploaded")
        return Path(checks[0].file).parent
    raise PushError(f"{path} is neither a wan-tune export folder (adapters + README.md) nor a checkpoint folder")


def push(path: str | os.PathLike, repo_id: str, private: bool = False, revision: str | None = None, say=print, api=None) -> str:
    """Upload the export of `path` to `repo_id` (created if needed) in one commit; returns its URL."""
    token = preflight(repo_id)
    folder = export_folder(path)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        say(f"uploading {folder} to {repo_id}" + (f" ({revision})" if revision else ""))
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=UPLOAD_PATTERNS,
                                   revision=revision, commit_message=f"wan-tune: {folder.name}")
    except Exception as err:  # network, permissions, quota: one line, the local export as it was
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PushError(f"upload to {repo_id} failed ({type(err).__name__}: {first[:200]}); nothing was committed and "
                        f"{folder} is unchanged: push again") from None
    url = getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    say(f"pushed: {url}")
    return url
