"""`posttrain rl serve-inference` and `posttrain rl bench-sync` (see posttrain/rl/commands.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from posttrain.commands.common import console, fail
from posttrain.errors import PosttrainError
from posttrain.inference.process import API_KEY_VARIABLE
from posttrain.spec import SMOLLM2_MODEL_NAME


def serve_inference(
    model: Annotated[str, typer.Option(help="Model folder, hub id, or posttrain:tiny / posttrain:smollm2.")],
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 9001,
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0 for other machines: needs --api-key).")] = "127.0.0.1",
    served_model_name: Annotated[str | None, typer.Option(help="Model name in the API (default: --model).")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer to use (default: the model's).")] = None,
    enable_lora: Annotated[bool, typer.Option("--enable-lora", help="Allow LoRA adapters to be loaded.")] = False,
    max_lora_rank: Annotated[int, typer.Option(help="Largest adapter rank accepted.")] = 16,
    dtype: Annotated[str, typer.Option(help="auto | bfloat16 | float16 | float32 (auto: fp32 on CPU).")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps.")] = "auto",
    backend: Annotated[str, typer.Option(help="transformers (this server) | vllm (runs `vllm serve`).")] = "transformers",
    shared_weights: Annotated[bool, typer.Option(
        "--shared-weights", help="Keep the weights in one shared buffer a trainer can map (shared_vllm).")] = False,
    shared_weights_dir: Annotated[str, typer.Option(help="Where the shared weights file lives (CPU).")] = "/dev/shm",
    max_batch_size: Annotated[int, typer.Option(help="Most requests generated in one batch.")] = 64,
    max_model_len: Annotated[int | None, typer.Option(help="Context length (default: the model's).")] = None,
    num_threads: Annotated[int | None, typer.Option(help="torch CPU threads (default 1 on CPU).")] = None,
    api_key: Annotated[str | None, typer.Option(
        envvar=API_KEY_VARIABLE, show_default=False,
        help="Require Authorization: Bearer KEY on every route but /health.")] = None,
    allow_unauthenticated: Annotated[bool, typer.Option(
        "--allow-unauthenticated", help="Serve a non-loopback --host without --api-key.")] = False,
    lora_root: Annotated[str | None, typer.Option(
        help="Adapters load only from local folders inside this one (required with --enable-lora "
             "off loopback).")] = None,
) -> None:
    """Serve a model for online RL: OpenAI completions/chat with logprobs, vLLM's /generate and LoRA routes,
    and the server side of weight sync. Example: posttrain rl serve-inference --model posttrain:tiny"""
    from posttrain.inference.launch import Backend, ServeDtype, ServeOptions, run_server

    choices = {"dtype": (dtype, ServeDtype), "backend": (backend, Backend)}
    for flag, (value, kind) in choices.items():
        if value not in kind.__args__:
            fail(f"--{flag} {value!r}: choose one of {', '.join(kind.__args__)}")
    options = ServeOptions(model=model, port=port, host=host, served_model_name=served_model_name,
                           tokenizer=tokenizer, enable_lora=enable_lora, max_lora_rank=max_lora_rank,
                           dtype=dtype, device=device, backend=backend,  # type: ignore[arg-type]
                           shared_weights=shared_weights, shared_weights_dir=shared_weights_dir,
                           max_batch_size=max_batch_size, max_model_len=max_model_len, num_threads=num_threads,
                           api_key=api_key, allow_unauthenticated=allow_unauthenticated, lora_root=lora_root)
    try:
        run_server(options)
    except PosttrainError as exc:
        fail(exc)


def bench_sync(
    model: Annotated[str, typer.Option(help="Model to measure (folder, hub id or posttrain:smollm2).")] = SMOLLM2_MODEL_NAME,
    steps: Annotated[int, typer.Option(help="Optimizer steps (= syncs) per mode.")] = 3,
    modes: Annotated[str, typer.Option(help="Comma-separated: shared_vllm, broadcast, lora_only, lora_inplace, "
                                            "none.")] = "shared_vllm,broadcast,lora_only,lora_inplace,none",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Also write the report as JSON here.")] = None,
) -> None:
    """Measure every weight-sync mode on one model side by side, plus generation tokens/s."""
    from posttrain.weight_sync.bench import run_benchmark

    chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    known = {"shared_vllm", "broadcast", "lora_only", "lora_inplace", "none"}
    if not chosen or set(chosen) - known:
        fail(f"--modes {modes!r}: choose from {', '.join(sorted(known))}")
    try:
        report = run_benchmark(model, steps=steps, modes=chosen, progress=lambda m: console.print(f"measuring {m}"))
    except PosttrainError as exc:
        fail(exc)
    table = Table(title=f"weight sync on {model} ({steps} syncs per mode)")
    for column in ("mode", "median", "min", "max", "served = trainer", "Atropos README"):
        table.add_column(column)
    for mode, row in report["modes"].items():
        table.add_row(mode, f"{row['median_s'] * 1000:.1f} ms", f"{row['min_s'] * 1000:.1f} ms",
                      f"{row['max_s'] * 1000:.1f} ms", str(row["served_matches_trainer"]), row["seed_readme"])
    Console().print(table)
    generation = report["generation"]
    Console().print("generation: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in generation.items()))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"report written to {output}")
    if not all(row["served_matches_trainer"] for row in report["modes"].values()):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `posttrain rl` app."""
    app.command("serve-inference")(serve_inference)
    app.command("bench-sync")(bench_sync)
