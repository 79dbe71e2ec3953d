"""``posttrain rl run``: the whole online RL loop from one config, as supervised child processes.

Start order and what "ready" means for each part:

1. ``api``: atroposlib's ``run-api``; ready when ``GET /status`` answers.
2. ``inference``: ``posttrain rl serve-inference``; ready when ``GET /health`` answers. Not started in weight
   bridge mode ``none``, where the trainer starts (and restarts) its own server, as in the Atropos trainer.
3. ``trainer``: the worker entrypoint on the trainer's JobSpec; ready once it has registered with the API
   (``GET /info`` reports its batch size) and, in mode ``none``, once its server answers.
4. ``env-<name>``: ``posttrain rl env NAME serve``; ready once registered with the API (environment ids are
   handed out in registration order, and environments start one at a time). The first starts while the
   trainer is still loading: run-api makes it wait until the trainer has registered.

The run is complete when the trainer exits 0; any other exit of any part fails it. Every part's output goes
to ``<run dir>/logs/<part>.log``; the terminal shows one combined progress line.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from posttrain.inference.process import API_KEY_VARIABLE
from posttrain.job.directory import JobDir
from posttrain.job_paths import bind_job_dir
from posttrain.modeling import resolve_model_path
from posttrain.rl.loop.config import EnvironmentSection, RunConfig
from posttrain.rl.loop.supervisor import ChildSpec, Outcome, Report, Supervisor
from posttrain.spec import JobSpec, spec_to_json

PROGRESS_METRICS = ("reward_mean", "mean_ratio", "clipped_fraction", "sync_seconds", "tokens_per_second")


def posttrain_command(*args: str) -> list[str]:
    """``posttrain ARGS`` under this Python (the console script may not be on the PATH)."""
    return [sys.executable, "-m", "posttrain.cli", *args]


def get_json(url: str, timeout: float = 2.0, **kwargs) -> dict:
    response = httpx.request("GET", url, timeout=timeout, **kwargs)
    response.raise_for_status()
    return response.json()


def answers(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=2.0).status_code == 200


def trainer_registered(api_url: str) -> bool:
    return get_json(f"{api_url}/info").get("batch_size", -1) != -1


def env_registered(api_url: str, env_id: int) -> bool:
    # run-api answers /status-env only for environments it knows (a 500 before that).
    return httpx.request("GET", f"{api_url}/status-env", json={"env_id": env_id}, timeout=2.0).status_code == 200


def flag_value(value: object) -> str:
    return "None" if value is None else str(value)


def env_command(config: RunConfig, section: EnvironmentSection, tokenizer: str, total_steps: int,
                api_key: str = "x") -> list[str]:
    """``posttrain rl env NAME serve`` with the run's addresses and model; the section's settings win."""
    env = {
        "tokenizer_name": tokenizer,
        "rollout_server_url": config.api_url,
        "use_wandb": False,
        "total_steps": total_steps,
        **section.env,
    }
    openai = {
        "base_url": f"{config.inference_url}/v1",
        "model_name": config.served_model_name,
        "tokenizer_name": tokenizer,
        "server_type": "vllm",
        "api_key": api_key,
        **section.openai,
    }
    flags = [f"--env.{key}={flag_value(value)}" for key, value in env.items()]
    flags += [f"--openai.{key}={flag_value(value)}" for key, value in openai.items()]
    return posttrain_command("rl", "env", section.name, "serve", *flags)


def inference_command(config: RunConfig, spec: JobSpec, model_path: str) -> list[str]:
    """``posttrain rl serve-inference`` for the run's model, with what the weight bridge needs of it."""
    command = ["rl", "serve-inference", "--model", model_path, "--host", config.inference.host,
               "--port", str(config.inference.port)]
    if config.inference.served_model_name:
        command += ["--served-model-name", config.inference.served_model_name]
    mode = spec.method.weight_bridge_mode
    if mode == "shared_vllm" and "--shared-weights" not in config.inference.args:
        command += ["--shared-weights"]  # the trainer maps the server's weights: one copy
    if mode == "lora_only" and "--enable-lora" not in config.inference.args:
        command += ["--enable-lora", "--max-lora-rank", str(spec.peft.r)]
    return posttrain_command(*command, *config.inference.args)


def shared_weights_dir(args: list[str]) -> str:
    """The server's --shared-weights-dir among its extra flags (either spelling), else the default."""
    from posttrain.inference.shared_weights import (
        DEFAULT_DIRECTORY,  # torch: not imported before it is needed
    )

    for index, arg in enumerate(args):
        if arg.startswith("--shared-weights-dir="):
            return arg.partition("=")[2]
        if arg == "--shared-weights-dir" and index + 1 < len(args):
            return args[index + 1]
    return DEFAULT_DIRECTORY


def build_children(config: RunConfig, spec: JobSpec, run_dir: Path, resume: bool = False) -> list[ChildSpec]:
    logs = run_dir / "logs"
    api, inference = config.api, config.inference
    model_path = resolve_model_path(config.model)
    job_dir = run_dir / "trainer"
    job_dir.mkdir(parents=True, exist_ok=True)
    JobDir(job_dir).write_spec(spec_to_json(bind_job_dir(spec, job_dir)))
    trainer_starts_server = spec.method.weight_bridge_mode == "none"
    # One key per run for the inference server: the server requires it, the trainer (and the server it starts
    # in mode none) and the environments send it; the user's own key wins.
    api_key = os.environ.get(API_KEY_VARIABLE) or secrets.token_urlsafe(24)
    keyed = {API_KEY_VARIABLE: api_key}

    children = [ChildSpec(
        "api", [sys.executable, "-m", "atroposlib.cli.run_api", "--host", api.host, "--port", str(api.port)],
        logs / "api.log", health=answers(f"{config.api_url}/status"), ports=((api.host, api.port),),
        start_timeout=api.start_timeout,
    )]
    if not trainer_starts_server:
        children.append(ChildSpec(
            "inference", inference_command(config, spec, model_path), logs / "inference.log",
            health=answers(f"{config.inference_url}/health"), ports=((inference.host, inference.port),),
            start_timeout=inference.start_timeout, env=keyed,
        ))

    def trainer_ready() -> bool:
        return trainer_registered(config.api_url) and (
            not trainer_starts_server or answers(f"{config.inference_url}/health")())

    children.append(ChildSpec(
        "trainer",
        [sys.executable, "-m", "posttrain.worker", "--spec", str(JobDir(job_dir).spec_path), "--job-dir",
         str(job_dir), *(["--resume"] if resume else [])],
        logs / "trainer.log", health=trainer_ready, exit_zero="ends_run",
        ready_before_next=False,  # environments load while the trainer does; they wait for it to register
        # In mode none the trainer's own server listens on the inference port.
        ports=((inference.host, inference.port),) if trainer_starts_server else (),
        start_timeout=inference.start_timeout, env=keyed,
    ))
    for env_id, section in enumerate(config.environments):
        name = f"env-{section.name.rpartition(':')[2] or section.name}"
        if any(child.name == name for child in children):
            name = f"{name}-{env_id}"
        children.append(ChildSpec(
            name, env_command(config, section, model_path, spec.training.max_steps, api_key), logs / f"{name}.log",
            health=lambda env_id=env_id: env_registered(config.api_url, env_id), exit_zero="allowed",
            start_timeout=section.start_timeout,
        ))
    return children


class ProgressView:
    """One line on the loop: the trainer's step and latest metrics (job dir), the API's queue, elapsed time."""

    def __init__(self, config: RunConfig, job_dir: Path) -> None:
        self.config = config
        self.job = JobDir(job_dir)
        self.started = time.monotonic()

    def __call__(self) -> str:
        parts = [f"{time.monotonic() - self.started:5.0f} s"]
        status = self.job.read_status()
        metrics = self.job.read_metrics()
        last = metrics[-1] if metrics else {}
        step = last.get("step", status.step if status else 0)
        total = status.total_steps if status and status.total_steps else None
        parts.append(f"step {step}" + (f"/{total}" if total else ""))
        parts += [f"{key} {last[key]:.3g}" for key in PROGRESS_METRICS if isinstance(last.get(key), int | float)]
        try:
            queue = get_json(f"{self.config.api_url}/status", timeout=1.0).get("queue_size")
            parts.append(f"queued groups {queue}")
        except (httpx.HTTPError, ValueError):
            parts.append("api not answering")
        return " | ".join(parts)


def reward_summary(job_dir: Path) -> str | None:
    """First and last logged ``reward_mean`` of the trainer, e.g. ``reward_mean 0.12 -> 0.47 over 20 steps``."""
    rewards = [(r.get("step"), r["reward_mean"]) for r in JobDir(job_dir).read_metrics()
               if isinstance(r.get("reward_mean"), int | float)]
    if not rewards:
        return None
    (first_step, first), (last_step, last) = rewards[0], rewards[-1]
    return f"reward_mean {first:.3f} (step {first_step}) -> {last:.3f} (step {last_step})"


def run_loop(config: RunConfig, report: Report = print, resume: bool = False) -> Outcome:
    """Run every part of the loop until the trainer finishes, a part fails, or a signal stops it all.
    ``resume``: the trainer continues from its newest complete checkpoint in the run dir."""
    spec = config.trainer_spec()
    run_dir = config.directory()
    children = build_children(config, spec, run_dir, resume=resume)
    report(f"rl run {config.name or ''}: {', '.join(c.name for c in children)}; logs in {run_dir / 'logs'}")
    supervisor = Supervisor(children, report=report, progress=ProgressView(config, run_dir / "trainer"),
                            progress_interval=config.progress_interval, stop_grace=config.stop_grace)
    outcome = supervisor.run()
    # Every child has exited: a server that was killed (not shut down) left its shared weights file.
    from posttrain.inference.shared_weights import sweep_stale_weights

    sweep_stale_weights(shared_weights_dir(config.inference.args))
    summary = reward_summary(run_dir / "trainer")
    if summary:
        report(summary)
    return outcome
