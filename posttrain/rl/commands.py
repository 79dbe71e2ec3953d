"""`posttrain rl ...`: the online RL commands. Each group of commands lives with the code it drives."""

from __future__ import annotations

import typer

from posttrain.rl import run_commands, serve_commands, train_commands

rl_app = typer.Typer(
    help="Online RL: Atropos trajectory API, environments, inference server, trainer and weight sync.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
    rich_markup_mode="markdown",
)

serve_commands.register(rl_app)
train_commands.register(rl_app)
run_commands.register(rl_app)
