"""Which code runs each method: ``method.name`` -> ``run(context) -> JobResult``.

TRL recipes (sft, dpo, reward, grpo) share one runner; online GRPO and PPO run posttrain's own loops.
Each entry imports its code only when its method runs, so an SFT job never imports the RL stack.
"""

from __future__ import annotations

from collections.abc import Callable

from posttrain.job.context import RunContext
from posttrain.job.result import JobResult

Runner = Callable[[RunContext], JobResult]


def _trl(context: RunContext) -> JobResult:
    from posttrain.recipes.runner import run

    return run(context)


def _online_grpo(context: RunContext) -> JobResult:
    from posttrain.rl.grpo.trainer import run

    return run(context)


def _ppo(context: RunContext) -> JobResult:
    from posttrain.rl.ppo.trainer import run

    return run(context)


RUNNERS: dict[str, Runner] = {
    "sft": _trl,
    "dpo": _trl,
    "reward": _trl,
    "grpo": _trl,
    "online_grpo": _online_grpo,
    "ppo": _ppo,
}


def runner_for(method: str) -> Runner:
    # The spec's method union already refuses unknown names; this is the registry's own promise.
    try:
        return RUNNERS[method]
    except KeyError:
        raise KeyError(f"no runner is registered for method {method!r} (known: {', '.join(RUNNERS)})") from None
