"""`posttrain rl ...`: the online RL commands. Each group of commands lives with the code it drives."""

from __future__ import annotations

import typer

from posttrain.commands import rl_run, rl_serve, rl_train

rl_app = typer.Typer(
    help="Online RL: Atropos trajectory API, environments, inference server, trainer and weight sync.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
    rich_markup_mode="markdown",
)

rl_serve.register(rl_app)
rl_train.register(rl_app)
rl_run.register(rl_app)
