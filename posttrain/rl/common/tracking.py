"""Where the online trainer's metrics go: metrics.jsonl always, TensorBoard and W&B when the spec's
tracking.report_to names them (``posttrain rl train --use-wandb`` adds wandb)."""

from __future__ import annotations

import logging
import math
from typing import Any

from posttrain.job.directory import JobDir
from posttrain.spec import JobSpec, spec_to_json

log = logging.getLogger(__name__)


class MetricsSinks:
    def __init__(self, spec: JobSpec, jd: JobDir) -> None:
        self.jd = jd
        self.tensorboard = None
        self.wandb = None
        report_to = spec.tracking.report_to
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(jd.tensorboard_dir))
        if "wandb" in report_to:
            import json

            import wandb

            self.wandb = wandb.init(project=spec.tracking.project, name=spec.tracking.run_name or spec.name,
                                    dir=str(jd.root), config=json.loads(spec_to_json(spec)), resume="allow")
        if "mlflow" in report_to:
            log.warning("tracking.report_to=mlflow is not supported by online_grpo; metrics.jsonl has every value")

    def write(self, record: dict[str, Any]) -> None:
        clean = {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
                 for key, value in record.items()}
        self.jd.append_metrics(clean)
        numbers = {key: value for key, value in clean.items()
                   if isinstance(value, int | float) and key not in ("step", "time")}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(f"train/{key}", value, record["step"])
        if self.wandb is not None:
            self.wandb.log({f"train/{key}": value for key, value in numbers.items()}, step=record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
