"""Environments for online RL, written on atroposlib's ``BaseEnv``.

``posttrain rl env NAME serve ...`` runs one of them with atroposlib's own command line. NAME is a built-in
name below or ``package.module:ClassName`` for an environment of your own (any ``BaseEnv`` subclass that
Python can import). Classes are imported only when asked for: atroposlib pulls in W&B, aiohttp and more.
"""

from __future__ import annotations

from posttrain.errors import ConfigError
from posttrain.import_paths import ImportPathError, import_object, is_import_path

BUILTIN_ENVIRONMENTS: dict[str, str] = {
    "gsm8k": "posttrain.rl.envs.math_env:MathEnv",
    "digits": "posttrain.rl.envs.synthetic:DigitsEnv",
}


def environment_class(name: str) -> type:
    """The ``BaseEnv`` subclass called ``name`` (built-in) or at ``module:Class``."""
    from atroposlib.envs.base import BaseEnv

    target = BUILTIN_ENVIRONMENTS.get(name, name)
    if not is_import_path(target):
        known = ", ".join(sorted(BUILTIN_ENVIRONMENTS))
        raise ConfigError(f"unknown environment {name!r}: use one of {known} or module:ClassName")
    try:
        cls = import_object(target)
    except ImportPathError as exc:
        raise ConfigError(f"environment {name!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, BaseEnv)):
        raise ConfigError(f"environment {name!r}: {target} is not an atroposlib BaseEnv subclass")
    return cls
