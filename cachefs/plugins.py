"""Optional modules (file-list control, tracing) loaded by name when present."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType


def optional_modules(*names: str) -> Iterator[ModuleType]:
    for name in names:
        try:
            yield importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
