"""What the job service adds on top of running the worker yourself, measured in one run.

1. Start latency: submit -> worker running (status.json says running), through the service, against the
   baseline of starting ``python -m posttrain.worker`` directly on the same spec. Both include the
   worker's own start (importing torch/transformers/trl), so the difference is the service's overhead
   (HTTP, validation and preflight, the store, the scheduler tick, the launcher).
2. Status calls: p50/p99 latency of ``GET /v1/jobs/{id}`` from 32 concurrent clients, against the
   baseline of ``GET /healthz`` (same server and clients, no database or job-directory reads).

    .venv/bin/python bench/service_overhead.py [--runs 3] [--clients 32] [--calls 50]

Writes bench/results/service_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from posttrain.client import Client  # noqa: E402
from posttrain.jobdir import JobDir  # noqa: E402

SPEC = {
    "training": {"max_steps": 2, "per_device_train_batch_size": 2, "num_threads": 1, "save_steps": 100},
    "data": {"max_samples": 8},
    "output": {"save_final": False},
    "tracking": {"report_to": []},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float = 300, poll: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError("timed out")


def worker_running(job_dir: JobDir) -> bool:
    status = job_dir.read_status()
    return status is not None and status.state in ("running", "succeeded")


def direct_start_latency(work: Path, run: int) -> float:
    """Baseline: launch the worker by hand and wait until it reports running."""
    job_dir = JobDir(work / f"direct-{run}").create()
    spec = {**SPEC, "output": {**SPEC["output"], "dir": str(job_dir.root)}}
    job_dir.spec_path.write_text(json.dumps(spec))
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "posttrain.worker", "--spec", str(job_dir.spec_path),
                                "--job-dir", str(job_dir.root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: worker_running(job_dir))
    latency = time.perf_counter() - started
    process.wait(300)
    return latency


def service_start_latency(client: Client, data_dir: Path) -> tuple[float, float, str]:
    """(submit -> worker running, submit -> service launched the process) in seconds."""
    started = time.perf_counter()
    job = client.submit(SPEC)
    job_dir = JobDir(data_dir / "jobs" / job.id)
    wait_until(lambda: worker_running(job_dir))
    latency = time.perf_counter() - started
    job = client.wait(job.id, timeout=300, poll=0.1)
    assert job.state == "succeeded", job.error
    return latency, (job.launched_at or 0) - job.created_at, job.id


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def load(url: str, path: str, clients: int, calls: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def one_client() -> None:
        mine = []
        with httpx.Client(base_url=url, timeout=30) as http:
            http.get(path).raise_for_status()  # connect before the clock starts
            barrier.wait()
            for _ in range(calls):
                t0 = time.perf_counter()
                http.get(path).raise_for_status()
                mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=one_client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {"path": path, "calls": len(latencies), "p50_ms": round(percentile(latencies, 50) * 1e3, 2),
            "p99_ms": round(percentile(latencies, 99) * 1e3, 2), "mean_ms": round(statistics.mean(latencies) * 1e3, 2),
            "requests_per_s": round(len(latencies) / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="jobs started each way")
    parser.add_argument("--clients", type=int, default=32, help="concurrent status clients")
    parser.add_argument("--calls", type=int, default=50, help="status calls per client")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "service_overhead.json")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    with tempfile.TemporaryDirectory(prefix="posttrain-bench-") as tmp:
        work, data_dir, port = Path(tmp), Path(tmp) / "data", free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "posttrain.service", "--port", str(port), "--data-dir",
                                   str(data_dir), "--log-level", "warning"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with Client(url, timeout=60) as client:
                wait_until(client.ready, timeout=60, poll=0.1)
                client.submit(SPEC)  # warm-up: the first preflight imports torch/datasets in the server
                wait_until(lambda: client.list_jobs(state=["queued", "running"]).total == 0, poll=0.2)

                direct, service = [], []
                for run in range(args.runs):  # interleaved, so drift in machine load hits both alike
                    direct.append(direct_start_latency(work, run))
                    service.append(service_start_latency(client, data_dir))
                job_id = service[-1][2]
                status = load(url, f"/v1/jobs/{job_id}", args.clients, args.calls)
                health = load(url, "/healthz", args.clients, args.calls)
        finally:
            server.terminate()
            server.wait(30)

    direct_median = statistics.median(direct)
    service_median = statistics.median(s[0] for s in service)
    result = {
        "benchmark": "service_overhead",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "start_latency": {
            "runs": args.runs,
            "baseline_direct_worker_to_running_s": [round(v, 3) for v in direct],
            "service_submit_to_worker_running_s": [round(s[0], 3) for s in service],
            "service_submit_to_launch_s": [round(s[1], 3) for s in service],
            "median_direct_s": round(direct_median, 3),
            "median_service_s": round(service_median, 3),
            "median_overhead_s": round(service_median - direct_median, 3),
        },
        "status_calls": {"clients": args.clients, "calls_per_client": args.calls, "job_status": status,
                         "baseline_healthz": health},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
