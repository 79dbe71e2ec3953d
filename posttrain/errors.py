"""Errors a user can cause. Each names what is wrong and where; the CLI prints them without a
traceback and the service turns them into a 4xx JSON body."""

from __future__ import annotations


class PosttrainError(Exception):
    """Base class of every error caused by user input (config, data, model path, request)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(PosttrainError):
    """A JobSpec that does not validate: unknown key, wrong type, bad override."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class DatasetError(PosttrainError):
    """A dataset that cannot be read or a row that does not fit its format."""

    def __init__(self, message: str, source: str | None = None, row: int | None = None) -> None:
        where = source or ""
        if row is not None:
            where = f"{where} row {row}" if where else f"row {row}"
        super().__init__(f"{where}: {message}" if where else message)
        self.source = source
        self.row = row


class ModelError(PosttrainError):
    """A model or tokenizer that cannot be found or loaded."""


class UnsupportedError(PosttrainError):
    """A combination of options that this machine or library cannot run (e.g. fp16 on CPU)."""
