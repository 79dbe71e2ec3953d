"""`posttrain rl train`: the online GRPO trainer with the Atropos example trainer's flags.

The flags build a JobSpec (``method.name: online_grpo``) that runs through the one worker entrypoint like
``posttrain train``, into an ordinary job directory (``--save-path``). ``--print-spec`` prints that spec
as YAML instead, for ``posttrain jobs submit`` (the job service) or a config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from posttrain.commands.common import fail, print_summary
from posttrain.errors import PosttrainError
from posttrain.spec import JobSpec, WeightBridgeMode, spec_from_dict


def online_spec(*, model_name: str, weight_bridge_mode: str, training_steps: int, batch_size: int,
                gradient_accumulation_steps: int, lr: float, save_path: Path, vllm_port: int,
                vllm_restart_interval: int, lora_r: int, lora_alpha: int, use_wandb: bool, benchmark: bool,
                api_url: str, checkpoint_interval: int, max_token_len: int, loss_type: str, kl_coef: float,
                no_sync: bool, overrides: list[str]) -> JobSpec:
    """The JobSpec the flags describe; dotted ``overrides`` (``method.clip_epsilon=0.28``) go last."""
    lora = weight_bridge_mode == "lora_only"
    data: dict[str, Any] = {
        "name": save_path.name or "rl",
        "model": {"name_or_path": model_name},
        "method": {"name": "online_grpo", "api_url": api_url, "weight_bridge_mode": weight_bridge_mode,
                   "sync_weights": not no_sync, "inference_port": vllm_port,
                   "restart_interval": vllm_restart_interval, "loss_type": loss_type, "beta": kl_coef,
                   "benchmark": benchmark},
        "peft": {"type": "lora", "r": lora_r, "alpha": lora_alpha} if lora else {"type": "none"},
        "training": {"max_steps": training_steps, "learning_rate": lr, "per_device_train_batch_size": batch_size,
                     "gradient_accumulation_steps": gradient_accumulation_steps,
                     "save_steps": checkpoint_interval or None, "max_seq_length": max_token_len,
                     "lr_scheduler_type": "constant"},
        "tracking": {"report_to": ["tensorboard", "wandb"] if use_wandb else ["tensorboard"]},
        "output": {"dir": str(save_path)},
    }
    return spec_from_dict(data, overrides)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `posttrain rl` app."""

    @app.command("train")
    def train(
        model_name: Annotated[str, typer.Option("--model-name", help="Model to train: hub id, folder, "
                                                "posttrain:tiny or posttrain:smollm2.")],
        overrides: Annotated[list[str] | None, typer.Argument(
            help="Dotted JobSpec overrides, e.g. method.clip_epsilon=0.28 training.max_grad_norm=0.5.",
            show_default=False)] = None,
        weight_bridge_mode: Annotated[WeightBridgeMode, typer.Option(
            "--weight-bridge-mode", help="none: save + restart its own inference server; lora_only: train and "
            "hot-load a LoRA adapter; shared_vllm: one shared copy of the weights; broadcast: "
            "torch.distributed to a remote server.")] = "none",
        training_steps: Annotated[int, typer.Option("--training-steps", help="Batches to train on.")] = 10,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per micro-batch.")] = 2,
        gradient_accumulation_steps: Annotated[int, typer.Option(
            "--gradient-accumulation-steps", help="Micro-batches per step: the API batch is batch-size x this.")] = 1,
        lr: Annotated[float, typer.Option("--lr", help="Learning rate (constant).")] = 1e-5,
        save_path: Annotated[Path, typer.Option("--save-path", help="Job directory: checkpoints/, final/, "
                                                "metrics.jsonl.")] = Path("runs/rl"),
        vllm_port: Annotated[int, typer.Option("--vllm-port", help="Port of the inference server.")] = 9001,
        vllm_restart_interval: Annotated[int, typer.Option(
            "--vllm-restart-interval", help="none mode: restart the inference server every N steps.")] = 1,
        lora_r: Annotated[int, typer.Option("--lora-r", help="LoRA rank (lora_only).")] = 16,
        lora_alpha: Annotated[int, typer.Option("--lora-alpha", help="LoRA alpha (lora_only).")] = 32,
        use_wandb: Annotated[bool, typer.Option("--use-wandb", help="Also log to Weights & Biases.")] = False,
        benchmark: Annotated[bool, typer.Option("--benchmark", help="Log step and wait times per step.")] = False,
        api_url: Annotated[str, typer.Option("--api-url", help="Atropos trajectory API (run-api).")] =
            "http://localhost:8000",
        checkpoint_interval: Annotated[int, typer.Option(
            "--checkpoint-interval", help="Save a resumable checkpoint every N steps (0: only final/).")] = 3,
        max_token_len: Annotated[int, typer.Option("--max-token-len", help="Longest sequence trained on.")] = 2048,
        loss_type: Annotated[str, typer.Option("--loss-type", help="grpo, dr_grpo or dapo.")] = "grpo",
        kl_coef: Annotated[float, typer.Option("--kl-coef", help="KL coefficient towards the reference.")] = 0.0,
        no_sync: Annotated[bool, typer.Option("--no-sync", help="Train without any inference server.")] = False,
        resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint "
                                             "in --save-path.")] = False,
        print_spec: Annotated[bool, typer.Option("--print-spec", help="Print the JobSpec as YAML and exit "
                                                 "(for posttrain jobs submit).")] = False,
    ) -> None:
        """Train a policy online on scored rollouts from an Atropos trajectory API (GRPO).

        Example: posttrain rl train --model-name posttrain:smollm2 --weight-bridge-mode lora_only
        --training-steps 50 --batch-size 8 --lr 1e-5 --save-path runs/rl --lora-r 16 --lora-alpha 32
        """
        from posttrain.worker import run_worker

        try:
            spec = online_spec(
                model_name=model_name, weight_bridge_mode=weight_bridge_mode, training_steps=training_steps,
                batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps, lr=lr,
                save_path=save_path, vllm_port=vllm_port, vllm_restart_interval=vllm_restart_interval,
                lora_r=lora_r, lora_alpha=lora_alpha, use_wandb=use_wandb, benchmark=benchmark, api_url=api_url,
                checkpoint_interval=checkpoint_interval, max_token_len=max_token_len, loss_type=loss_type,
                kl_coef=kl_coef, no_sync=no_sync, overrides=list(overrides or []))
            if print_spec:
                # The job service places each job in a directory of its own: no output.dir in what it is sent.
                dumped = spec.model_dump(mode="json", exclude_unset=True, exclude={"output": {"dir"}})
                dumped = {key: value for key, value in dumped.items() if value != {}}
                typer.echo(yaml.safe_dump(dumped, sort_keys=False))
                return
            result = run_worker(spec, save_path, resume=resume)
        except PosttrainError as exc:
            fail(exc.message)
        print_summary(result, spec)
        raise typer.Exit(result.exit_code)
