"""`posttrain rl ...`: the online RL commands (rl_train, rl_serve, rl_run)."""

from __future__ import annotations

from posttrain.commands import rl_run, rl_serve, rl_train
from posttrain.commands.common import typer_group

rl_app = typer_group("Online RL: Atropos trajectory API, environments, inference server, trainer and weight sync.")

rl_serve.register(rl_app)
rl_train.register(rl_app)
rl_run.register(rl_app)
