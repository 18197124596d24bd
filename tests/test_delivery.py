"""Export folders on shared drives (#33): nothing overwritten that the export did not write,
nothing delivered before the self-test passed, push and W&B take only the export's files, a
damaged run log does not stop an export, and files take the umask's mode."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def runs(tiny_folders, tiny_shards, tmp_path_factory) -> dict[str, Path]:
    """Two tiny LoRA runs, 2 steps each: {name: its last checkpoint}."""
    from launching import PLAIN

    from wan_tune.config import load_recipe
    from wan_tune.training.loop import train

    tmp = tmp_path_factory.mktemp("delivery")
    found = {}
    for name, seed in (("brand-a", 0), ("brand-b", 1)):
        recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
            *PLAIN, f"model.path={tiny_folders['tiny']}", f"data.shards={tiny_shards['tiny']}",
            f"run.output_dir={tmp / 'runs'}", f"run.name={name}", f"run.seed={seed}", "train.steps=2",
            "data.num_workers=0"])
        found[name] = Path(train(recipe, progress=False, say=lambda *_: None)["checkpoint"])
    return found


def _export(checkpoint, out, **kw):
    from wan_tune.export.run import export

    return export(checkpoint, ["comfyui"], out, say=lambda *_: None, **kw)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_export_never_overwrites_a_file_it_did_not_write(runs, tmp_path):
    """--out . in a project folder: its README.md is in the way, refused in one line, nothing
    written; a second run's export into a folder holding the first's is refused too."""
    from wan_tune.export.adapters import ExportError

    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# our project\n")
    with pytest.raises(ExportError, match=r"README\.md is in the way: export writes that name and never replaces a file "
                                          r"it did not write.*nothing was written"):
        _export(runs["brand-a"], project)
    assert _tree(project) == {"README.md": b"# our project\n"}  # no adapter, no staging folder left

    shared = tmp_path / "delivery"
    assert all(c.ok for c in _export(runs["brand-a"], shared))
    first = _tree(shared)
    with pytest.raises(ExportError, match=r"holds another export \(run brand-a, step 2, .*give each export its own --out"):
        _export(runs["brand-b"], shared)
    assert _tree(shared) == first


def test_a_reexport_replaces_its_own_files_but_not_an_edited_card(runs, tmp_path):
    from wan_tune.export.adapters import ExportError
    from wan_tune.export.delivery import MANIFEST, read_manifest

    out = tmp_path / "out"
    _export(runs["brand-a"], out)
    manifest = read_manifest(out)
    assert manifest["run"] == "brand-a" and manifest["step"] == 2 and "README.md" in manifest["files"]
    assert set(manifest["files"]) | {MANIFEST} == set(_tree(out))
    _export(runs["brand-a"], out)  # the same checkpoint again: its own files, unchanged since, are replaced
    assert read_manifest(out)["files"].keys() == manifest["files"].keys()  # (safetensors orders its header anew each time)
    (out / "README.md").write_text("# the card, edited for the client\n")
    with pytest.raises(ExportError, match=r"README\.md is in the way.*\(or one edited since\)"):
        _export(runs["brand-a"], out)
    assert (out / "README.md").read_text() == "# the card, edited for the client\n"


def test_nothing_takes_a_final_name_before_the_self_test_passes(runs, tmp_path, monkeypatch):
    """The self-test reads the adapter in a hidden staging folder; an export interrupted after it
    (here: Ctrl-C while the card is written) leaves nothing under a shippable name, nor the stage."""
    import wan_tune.export.run as export_run

    seen = []
    real = export_run.check_adapter_file

    def spy(path, *a, **kw):
        seen.append(Path(path).parent.name)
        return real(path, *a, **kw)

    def interrupted(*_a, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_run, "check_adapter_file", spy)
    monkeypatch.setattr(export_run, "write_share_files", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _export(runs["brand-a"], out)
    assert seen and all(name.startswith(".wan-tune-partial-") for name in seen)
    assert list(out.iterdir()) == []
    # A SIGKILL leaves its staging folder: the next export here removes it (its process is gone).
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])  # a pid that has ended
    dead.wait()
    killed = out / f".wan-tune-partial-{socket.gethostname()}-{dead.pid}"
    (killed / "samples").mkdir(parents=True)
    (killed / "x-comfyui.safetensors").write_bytes(b"untested")
    monkeypatch.undo()
    assert all(c.ok for c in _export(runs["brand-a"], out))
    assert not killed.exists() and not [p for p in out.iterdir() if p.name.startswith(".")]


def test_push_uploads_the_export_that_exists_as_it_is(runs, tmp_path, monkeypatch):
    """`push CHECKPOINT` with an export already there: no new export over it (the edited card
    survives and goes up as edited); every line it prints is true."""
    from wan_tune.export.push import push

    checkpoint = runs["brand-b"]
    out = checkpoint / "export"
    _export(checkpoint, None)
    (out / "README.md").write_text("# edited card\n")
    before = _tree(out)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test")

    class Hub:
        def create_repo(self, *a, **kw):
            pass

        def upload_folder(self, **kw):
            self.kw = kw

    hub, said = Hub(), []
    push(checkpoint, "my-studio/brand-b", say=said.append, api=hub)
    assert _tree(out) == before and hub.kw["folder_path"] == str(out)
    assert said[0] == f"uploading the export that exists in {out}, as it is"


@pytest.mark.parametrize("damage", ["torn", "not-an-object", "best"])
def test_a_damaged_run_log_does_not_stop_an_export(runs, tmp_path, damage):
    """What a full disk or an edit leaves in metrics.jsonl / best.json: the export reads the log as
    training does (damaged lines passed over) and its card leaves out what it cannot read."""
    checkpoint = runs["brand-a"]
    run = checkpoint.parent
    saved = {f: (run / f).read_bytes() for f in ("metrics.jsonl",) if (run / f).is_file()}
    try:
        if damage == "torn":
            with open(run / "metrics.jsonl", "a") as f:
                f.write('{"step": 2, "loss": 0.5')
        elif damage == "not-an-object":
            with open(run / "metrics.jsonl", "a") as f:
                f.write("[1, 2]\n")
        else:
            (run / "best.json").write_text('{"checkpoint": "step-000002", "heldout_loss": ')
        checks = _export(checkpoint, tmp_path / "out")
        assert checks and all(c.ok for c in checks)
        card = (tmp_path / "out" / "README.md").read_text()
        assert "Best held-out loss" not in card
        loss = [json.loads(line) for line in saved["metrics.jsonl"].decode().splitlines() if '"loss"' in line][-1]["loss"]
        assert f"Training loss at step 2: {loss:.4f}" in card
    finally:
        for f, data in saved.items():
            (run / f).write_bytes(data)
        (run / "best.json").unlink(missing_ok=True)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_take_the_mode_the_umask_gives(runs, tmp_path, umask):
    """Under umask 022 teammates read every exported file (mkstemp alone made each 0600)."""
    from wan_tune.data.atomic import write_text

    old = os.umask(umask)
    try:
        assert stat.S_IMODE(write_text(tmp_path / "a.txt", "x").stat().st_mode) == 0o666 & ~umask
        _export(runs["brand-a"], tmp_path / "out")
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path / "out")): stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").rglob("*")
             if p.is_file()}
    assert modes and set(modes.values()) == {0o666 & ~umask}, modes
