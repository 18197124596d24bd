"""`opt`: a recipe field with its one-line doc, its choices and its check (the reference is built from them)."""

from __future__ import annotations

import copy
from dataclasses import field
from typing import Any, Callable, Optional

Check = Callable[[Any], Optional[str]]


def opt(default: Any, doc: str, *, choices: tuple[str, ...] | None = None, check: Check | None = None) -> Any:
    meta = {"doc": doc, "choices": choices, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)
