"""bench/online_grpo_step.py runs end to end and reports every variant."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_quick_online_grpo_step_benchmark_writes_every_variant(tmp_path: Path):
    output = tmp_path / "online_grpo_step.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "online_grpo_step.py"), "--quick", "--output",
                    str(output)], check=True, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    report = json.loads(output.read_text())
    assert set(report["results"]) == {"full", "lora", "lora_kl"}
    for row in report["results"].values():
        assert row["tokens_per_second"] > 0 and row["seconds_per_step"] > 0
    # LoRA trains a fraction of the parameters; the KL variant trains the same adapter.
    assert report["results"]["lora"]["trainable_parameters"] < report["results"]["full"]["trainable_parameters"]
    assert report["results"]["lora_kl"]["trainable_parameters"] == report["results"]["lora"]["trainable_parameters"]
