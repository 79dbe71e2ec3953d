"""`posttrain rl` commands of this part (see posttrain/rl/commands.py)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `posttrain rl` app."""
