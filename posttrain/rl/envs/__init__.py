"""Environments for online RL, written on atroposlib's ``BaseEnv``.

``posttrain rl env NAME serve ...`` runs one of them with atroposlib's own command line. NAME is a built-in
name below or ``package.module:ClassName`` for an environment of your own (any ``BaseEnv`` subclass that
Python can import). Classes are imported only when asked for: atroposlib pulls in W&B, aiohttp and more.
"""

from __future__ import annotations

import importlib
import re

from posttrain.errors import ConfigError

BUILTIN_ENVIRONMENTS: dict[str, str] = {
    "gsm8k": "posttrain.rl.envs.math_env:MathEnv",
    "digits": "posttrain.rl.envs.synthetic:DigitsEnv",
}
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def environment_class(name: str) -> type:
    """The ``BaseEnv`` subclass called ``name`` (built-in) or at ``module:Class``."""
    from atroposlib.envs.base import BaseEnv

    target = BUILTIN_ENVIRONMENTS.get(name, name)
    if not _IMPORT_PATH.match(target):
        known = ", ".join(sorted(BUILTIN_ENVIRONMENTS))
        raise ConfigError(f"unknown environment {name!r}: use one of {known} or module:ClassName")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"environment {name!r}: cannot import {module_name}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseEnv)):
        raise ConfigError(f"environment {name!r}: {target} is not an atroposlib BaseEnv subclass")
    return cls
