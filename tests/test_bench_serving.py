"""The serving benchmark runs end to end (``--quick``: posttrain:tiny, a few requests per load) and writes its
report where it is told, leaving the repository's README tables alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"hf_loop_fp32", "hf_loop_bf16", "peft_loop", "posttrain_1", "posttrain_8", "posttrain_32",
            "posttrain_8_mixed", "posttrain_32_mixed"}
ROW_KEYS = {"tokens", "seconds", "tokens_per_s", "ttft_p50_s", "ttft_p99_s", "requests", "peak_rss_mb"}
TARGETS = {"mixed_32_over_baseline", "mixed_over_one_model", "ttft_p50_8_streams_s", "single_stream_of_bound"}


def test_quick_benchmark_reports_every_load_and_target(tmp_path):
    output = tmp_path / "serving.json"
    readmes = {path: path.read_text() for path in (REPO_ROOT / "README.md", REPO_ROOT / "bench" / "README.md")}

    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "serving.py"), "--quick", "--output", str(output)],
                          check=True, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)

    report = json.loads(output.read_text())
    assert set(report["results"]) == VARIANTS
    settings = report["settings"]
    for name, row in report["results"].items():
        assert set(row) >= ROW_KEYS, name
        assert row["tokens_per_s"] > 0 and row["peak_rss_mb"] > 0, name
        assert row["tokens"] == row["requests"] * settings["new_tokens"], name  # ignore_eos: exact lengths
        assert 0 <= row["ttft_p50_s"] <= row["ttft_p99_s"] <= row["seconds"], name
    mixed = report["results"]["posttrain_32_mixed"]
    assert mixed["adapters"] == 4 and mixed["adapters_together"] > 1  # rows of different adapters shared steps
    assert report["results"]["peft_loop"]["adapter_first_load_s"] > 0
    single, host = report["single_stream"], report["machine"]
    assert single["weight_bytes_per_token"] > 0 and single["decode_tokens_per_s"] > 0
    assert host["copy_bandwidth_gb_s"] > 0 and "load_average_start" in host and "load_average_end" in host
    verdict = report["verdict"]
    assert set(verdict["figures"]) == set(verdict["met"]) == TARGETS
    assert verdict["baseline"] in {"hf_loop_fp32", "hf_loop_bf16"}
    assert "| target | measured |" in done.stdout  # the table printed for the README
    assert {path: path.read_text() for path in readmes} == readmes  # --quick never rewrites them
