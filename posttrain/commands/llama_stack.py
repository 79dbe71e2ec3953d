"""``posttrain llama-stack config``: print a run.yaml that serves a posttrain provider."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from posttrain.commands.common import typer_group
from posttrain.llama_stack.config import DEFAULT_SERVICE_URL
from posttrain.llama_stack.run_config import LLAMA_STACK_PORT, run_yaml

llama_stack_app = typer_group("Llama Stack post_training providers: print a run.yaml.")


@llama_stack_app.command("config")
def config(
    provider: Annotated[str, typer.Option(help="inline: jobs run on this machine; remote: on a posttrain service.")],
    data_dir: Annotated[Path, typer.Option(help="Llama Stack's stores and (inline) posttrain's jobs.")] = Path(
        "~/.llama/posttrain"),
    port: Annotated[int, typer.Option(help="server.port (llama stack run still needs --port).")] = LLAMA_STACK_PORT,
    worker_python: Annotated[str | None, typer.Option(
        help="inline: interpreter with posttrain and torch that runs the workers (default: this one).")] = None,
    url: Annotated[str, typer.Option(help="remote: the posttrain service.")] = DEFAULT_SERVICE_URL,
    providers_d: Annotated[bool, typer.Option(
        "--providers-d", help="Load the provider from posttrain's providers.d folder instead of `module:`.")] = False,
) -> None:
    """Print a ready Llama Stack 0.6.1 run.yaml (loopback host, storage under --data-dir)."""
    if provider not in ("inline", "remote"):
        raise typer.BadParameter(f"{provider!r}: use inline or remote", param_hint="--provider")
    typer.echo(run_yaml(provider, data_dir, port=port, worker_python=worker_python, url=url,  # type: ignore[arg-type]
                        providers_d=providers_d), nl=False)
