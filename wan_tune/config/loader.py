"""Recipe = YAML file + dotted overrides, checked against the schema, every error reported at once.

OmegaConf does the merging, typing and `${...}` interpolation; it stops at the first error,
so each key is first validated on its own against its section, and only the keys that pass
are merged. A recipe with five mistakes gets five lines in one run.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .checks import LORA_ONLY_KEYS, cross_field_errors, unused_settings
from .schema import ENTRIES, SECTIONS, AdapterConfig, Recipe


class ConfigError(ValueError):
    """One or more recipe problems; `problems` holds (key, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        n = len(problems)
        if n == 1:  # one problem, one line: `recipe.yaml: train.lr: must be ...`
            key, msg = problems[0]
            super().__init__(f"{source}: {key}: {msg}" if key else f"{source}: {msg}")
            return
        lines = [f"{source}: {n} problems"]
        lines += [f"  {key}: {msg}" if key else f"  {msg}" for key, msg in problems]
        super().__init__("\n".join(lines))


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _type_name(tp: Any) -> str:
    name = getattr(tp, "__name__", None) or str(tp)
    return str(tp).replace("typing.", "") if "[" in str(tp) else name


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _check_section(name: str, cls: type, raw: Any, errors: list[tuple[str, str]]) -> dict:
    """The keys of one section that are valid on their own; problems appended to `errors`."""
    if not isinstance(raw, DictConfig):
        errors.append((name, f"must be a mapping of {cls.__name__} keys, got {raw!r}"))
        return {}
    fields = _fields(cls)
    good: dict[str, Any] = {}
    for key in raw.keys():
        key = str(key)
        full = f"{name}.{key}"
        if key not in fields:
            errors.append((full, f"unknown key in section '{name}'{_did_you_mean(key, fields)}"))
            continue
        value = raw._get_node(key)._value()  # keep `${...}` unresolved: it may point anywhere
        if value is None and name == "adapter" and key in LORA_ONLY_KEYS:
            continue  # `adapter.rank=null`: not set (e.g. switching a LoRA recipe to method=full)
        if isinstance(value, str) and fields[key].type == "list[str]" and not OmegaConf.is_interpolation(raw, key):
            value = [value]  # `adapter.init_from=a.safetensors`: one value for a list key is a one-item list
        entry = ENTRIES.get(f"{name}.{key}")
        if entry is not None and isinstance(value, (list, ListConfig)):  # data.sources: each entry checked as a section
            value = [_check_section(f"{full}[{i}]", entry, item, errors) for i, item in enumerate(value)]
        if isinstance(value, bool) and fields[key].type == "str":
            errors.append((full, f"expected a string, got the boolean {value} (YAML reads bare no/yes/off/on as booleans: quote it, e.g. \"no\")"))
            continue
        try:
            typed = OmegaConf.merge(OmegaConf.structured(cls), {key: value})
        except OmegaConfBaseException as err:
            got = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
            errors.append((full, f"expected {_type_name(fields[key].type)}, got {got!r} ({str(err).splitlines()[0]})"))
            continue
        meta = fields[key].metadata
        if not OmegaConf.is_interpolation(typed, key):
            plain = OmegaConf.to_container(typed[key]) if isinstance(typed[key], (DictConfig, ListConfig)) else typed[key]
            if meta.get("choices") and plain not in meta["choices"] and not (plain is None and fields[key].default is None):
                errors.append((full, f"must be one of {', '.join(meta['choices'])}; got {plain!r}{_did_you_mean(str(plain), meta['choices'])}"))
                continue
            problem = meta["check"](plain) if meta.get("check") and plain is not None else None
            if problem:
                errors.append((full, problem))
                continue
        good[key] = value
    return good


def _section_hint(name: str) -> str:
    """'; did you mean ...?' for a top-level name: a misspelt section, or a key put outside its section."""
    in_section = [f"{s}.{name}" for s, cls in SECTIONS.items() if name in _fields(cls)]
    return f"; did you mean {in_section[0]!r}?" if in_section else _did_you_mean(name, SECTIONS)


def _explicit_keys(raw: DictConfig) -> set[str]:
    return {f"{s}.{k}" for s in raw.keys() if isinstance(raw.get(s), DictConfig) for k in raw[s].keys()}


def _parse_overrides(overrides: Iterable[str], errors: list[tuple[str, str]]) -> DictConfig:
    merged = OmegaConf.create({})
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item or not key:
            errors.append((item, "overrides look like section.key=value, e.g. train.lr=5e-5"))
        elif "." not in key:
            errors.append((key, f"overrides name section.key, e.g. train.lr=5e-5{_section_hint(key)}"))
        else:
            text = item.split("=", 1)[1]
            if text.strip().lower() in ("no", "yes", "on", "off"):
                # YAML 1.1 would make these booleans; on a command line they are words
                # (train.mixed_precision=no). true/false stay booleans.
                item = f"{key}='{text.strip()}'"
            try:  # values are YAML: `[33,81]` is a list, `{a}` would be a mapping
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
            except Exception as err:
                errors.append((key, f"cannot parse the value ({str(err).splitlines()[0]}); quote it: {key}='\"...\"'"))
    return merged


def _warn_once(message: str) -> None:
    """A warning on stderr, from one process only under a multi-process launch."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr)


def _ignore_file_lora_keys(recipe: Recipe, file_keys: set[str], cli_keys: set[str], source: str, warn) -> None:
    """A full fine-tune ignores the LoRA settings a recipe file carries (so `adapter.method=full`
    on the command line turns a LoRA recipe into a full fine-tune), with one warning line. They
    are reset to their defaults, so the checkpoint's saved recipe does not claim a rank.
    LoRA keys typed on the command line stay errors (checks.py): that is a contradiction."""
    if recipe.adapter.method != "full":
        return
    defaults = AdapterConfig()
    ignored = [k for k in LORA_ONLY_KEYS if f"adapter.{k}" in file_keys - cli_keys
               and getattr(recipe.adapter, k) != getattr(defaults, k)]
    for key in ignored:
        setattr(recipe.adapter, key, getattr(defaults, key))
    if ignored:
        warn(f"{source}: adapter.method=full ignores the LoRA setting(s) {', '.join('adapter.' + k for k in ignored)}")


def load_recipe(path: str | os.PathLike | None, overrides: Iterable[str] = (), warn=_warn_once) -> Recipe:
    """The checked recipe from a YAML file (None: defaults only) plus `section.key=value` overrides.
    `warn` receives notes that do not stop the run (LoRA settings a full fine-tune ignores)."""
    source = str(path) if path is not None else "<defaults>"
    overrides = list(overrides)
    errors: list[tuple[str, str]] = []
    raw: Any = OmegaConf.create({})
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(source, [("", "recipe file not found; shipped recipes are in recipes/")])
        try:
            raw = OmegaConf.load(file)
        except Exception as err:  # YAML syntax: name the line, not a stack trace
            raise ConfigError(source, [("", f"not valid YAML: {err}")]) from None
        if raw is None:
            raw = OmegaConf.create({})
        if isinstance(raw, DictConfig) and not raw and not overrides:
            # Every default at once would train the 1.3B on data/shards/wan-lora: never what was meant.
            raise ConfigError(source, [("", "the recipe is empty: copy one of recipes/*.yaml and edit it "
                                            "(e.g. cp recipes/wan2.1-t2v-1.3b-lora.yaml recipes/my_brand.yaml)")])
        if not isinstance(raw, DictConfig):
            raise ConfigError(source, [("", "a recipe is a mapping of sections (run:, model:, data:, ...)")])
    cli = _parse_overrides(overrides, errors)
    file_keys, cli_keys = _explicit_keys(raw), _explicit_keys(cli)
    raw = OmegaConf.merge(raw, cli)

    valid: dict[str, dict] = {}
    for section in raw.keys():
        section = str(section)
        if section in SECTIONS:
            valid[section] = _check_section(section, SECTIONS[section], raw._get_node(section), errors)
            continue
        errors.append((section, f"unknown section{_section_hint(section)} (sections: {', '.join(SECTIONS)})"))

    cfg = OmegaConf.merge(OmegaConf.structured(Recipe), valid)
    kept = _env_interpolations(cfg)
    recipe = _resolve(cfg, errors)
    if kept:
        recipe._env_interpolations = kept  # not a field: to_yaml writes these as written, never their values
    _ignore_file_lora_keys(recipe, file_keys, cli_keys, source, warn)
    for note in unused_settings(recipe, cli_keys):
        warn(f"{source}: {note}")
    # Cross-field rules run even when single keys failed (those fell back to defaults), but a
    # key already reported is not reported twice.
    bad_keys = {k for k, _ in errors}
    errors += [(k, m) for k, m in cross_field_errors(recipe, file_keys | cli_keys, bad_keys) if k not in bad_keys]
    if errors:
        raise ConfigError(source, errors)
    return recipe


def _resolve(cfg: DictConfig, errors: list[tuple[str, str]]) -> Recipe:
    """Resolve `${...}` into plain dataclasses; a broken interpolation is reported by key and
    replaced by the default so the remaining checks still run."""
    defaults = OmegaConf.structured(Recipe)
    for section, cls in SECTIONS.items():
        for key in _fields(cls):
            try:
                OmegaConf.select(cfg, f"{section}.{key}", throw_on_missing=True)
            except OmegaConfBaseException as err:
                errors.append((f"{section}.{key}", f"cannot resolve {cfg[section]._get_node(key)._value()!r}: {str(err).splitlines()[0]}"))
                cfg[section][key] = defaults[section]._get_node(key)._value()
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def _env_interpolations(cfg: DictConfig) -> dict[str, str]:
    """`section.key: "${oc.env:...}"` of every value read from the environment (directly or through
    another such key): tokens and private paths that a saved recipe must not hold in clear."""
    raw = {f"{s}.{k}": str(cfg[s]._get_node(k)._value()) for s, cls in SECTIONS.items() for k in _fields(cls)
           if OmegaConf.is_interpolation(cfg[s], k)}
    kept: dict[str, str] = {}
    grew = True
    while grew:
        grew = False
        for key, text in raw.items():
            if key not in kept and ("oc.env" in text or any(f"${{{k}}}" in text for k in kept)):
                kept[key], grew = text, True
    return kept


def recipe_container(recipe: Recipe) -> dict:
    """The resolved recipe as plain dicts, except values read from the environment, which stay
    `${oc.env:...}` (what checkpoints, shard metadata and trackers record)."""
    data = OmegaConf.to_container(OmegaConf.structured(recipe))
    for dotted, text in getattr(recipe, "_env_interpolations", {}).items():
        section, key = dotted.split(".", 1)
        data[section][key] = text
    return data


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML: what `check` prints and every checkpoint saves. Values read
    from the environment (`${oc.env:VAR}`) are written as that interpolation, not as the secret."""
    if not getattr(recipe, "_env_interpolations", None):
        return OmegaConf.to_yaml(OmegaConf.structured(recipe))
    return OmegaConf.to_yaml(OmegaConf.create(recipe_container(recipe)))


def recipe_hash(recipe: Recipe) -> str:
    """Short content hash of the resolved recipe (goes into exported file headers)."""
    return hashlib.sha256(to_yaml(recipe).encode()).hexdigest()[:12]
