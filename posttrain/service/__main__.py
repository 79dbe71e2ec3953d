"""``python -m posttrain.service`` = ``posttrain serve`` (used by tests and process supervisors)."""

import typer

from posttrain.service.commands import serve

if __name__ == "__main__":
    typer.run(serve)
