"""``package.module:name``: how a spec names code of its own (reward functions, environments).

Checking the form imports nothing (the service's API process never imports user code); only the worker
(or the command that runs an environment) resolves one with :func:`import_object`.
"""

from __future__ import annotations

import importlib
import re

IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def is_import_path(text: str) -> bool:
    return bool(IMPORT_PATH.match(text))


class ImportPathError(ImportError):
    """An import path whose module cannot be imported or lacks the name; the message says which."""


def import_object(path: str) -> object:
    """The object ``path`` (``package.module:name``) names, importing its module."""
    if not is_import_path(path):
        raise ImportPathError(f"{path!r} is not of the form 'package.module:name'")
    module_name, _, name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportPathError(f"cannot import {module_name}: {exc}") from None
    if not hasattr(module, name):
        raise ImportPathError(f"{module_name!r} has no attribute {name!r}")
    return getattr(module, name)
