"""Plot a run's curves (loss, eval loss, reward, DPO margins) from metrics.jsonl into a PNG."""

from __future__ import annotations

from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.job.directory import JobDir

# Metric keys worth a panel each, in display order, with their titles.
PANELS = {
    "loss": "training loss",
    "eval_loss": "validation loss",
    "reward": "mean reward (GRPO, PPO: reward-model score)",
    "reward_mean": "mean score of the batch's rollouts (online GRPO)",
    "kl": "KL to the reference (PPO; online GRPO with beta > 0)",
    "value_loss": "critic value loss (PPO)",
    "rewards/margins": "reward margin (DPO)",
    "rewards/accuracies": "preference accuracy (DPO)",
    "accuracy": "preference accuracy (reward model)",
}


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    job_dir = JobDir(run_dir)
    records = job_dir.read_metrics()
    if not records:
        raise PosttrainError(f"{job_dir.metrics_path} has no metrics to plot (is {run_dir} a run directory?)")
    series = {}
    for key in PANELS:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
        if points:
            series[key] = points
    if not series:
        raise PosttrainError(f"{job_dir.metrics_path} has none of {', '.join(PANELS)}")
    fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.6 * len(series)), squeeze=False)
    for axis, (key, points) in zip(axes[:, 0], series.items(), strict=True):
        steps, values = zip(*points, strict=True)
        axis.plot(steps, values, marker="." if len(points) < 50 else None)
        axis.set_title(PANELS[key])
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    fig.suptitle(job_dir.root.name)
    fig.tight_layout()
    output = Path(output) if output else job_dir.root / "curves.png"
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
