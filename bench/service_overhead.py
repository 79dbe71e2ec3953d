"""What the job service adds on top of running the worker yourself, measured in one run.

1. Start latency: submit -> worker running (status.json says running), side by side:
   - the baseline: ``python -m posttrain.worker`` started by hand on the same spec;
   - a server with ``--no-warm-workers`` (cold start: each worker is a fresh Python that imports
     torch/transformers/trl first);
   - a server with warm start (the default: the worker is forked from a template process that has
     imported them already).
   Runs are interleaved, so drift in the machine's load hits all three alike; medians are reported.
2. Status calls: p50/p99 latency of ``GET /v1/jobs/{id}`` from 32 concurrent clients, against the
   baseline of ``GET /healthz`` (same server and clients, no database or job-directory reads), both
   back to back (each client sends its next call as soon as it has the answer: the server is never
   idle) and paced (each client polls every ``--poll-interval`` seconds, as ``Client.wait`` does), plus
   the server's CPU time per call (psutil), the figure least moved by other load on the machine.

    .venv/bin/python bench/service_overhead.py [--runs 5] [--clients 32] [--calls 50]

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
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from posttrain.client import Client  # noqa: E402
from posttrain.job.directory import JobDir  # noqa: E402

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


class Server:
    """``posttrain serve`` on a free port with its own data dir."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.data_dir, self.port = data_dir, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "serve", "--port", str(self.port),
                                         "--data-dir", str(data_dir), "--log-level", "warning", *args],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = Client(self.url, timeout=60)

    def wait_ready(self) -> None:
        """Ready, and (on a warm server) its template has finished importing."""
        def ready() -> bool:
            if not self.client.ready():
                return False
            return httpx.get(f"{self.url}/readyz").json().get("warm_workers") in (None, "ready")

        wait_until(ready, timeout=180, poll=0.2)
        self.client.submit(SPEC)  # warm-up: the first preflight imports torch/datasets in the server
        wait_until(lambda: self.client.list_jobs(state=["queued", "running"]).total == 0, poll=0.2)

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(30)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def load(url: str, path: str, clients: int, calls: int, server_pid: int, interval: float = 0.0) -> dict:
    """``clients`` threads, each with its own connection, calling ``path`` ``calls`` times: back to back,
    or one call every ``interval`` seconds (the first at a random offset, so they do not all fire at once)."""
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def one_client(index: int) -> None:
        mine = []
        with httpx.Client(base_url=url, timeout=30) as http:
            http.get(path).raise_for_status()  # connect before the clock starts
            barrier.wait()
            next_at = time.perf_counter() + interval * index / clients
            for _ in range(calls):
                if interval:
                    time.sleep(max(0.0, next_at - time.perf_counter()))
                    next_at += interval
                t0 = time.perf_counter()
                http.get(path).raise_for_status()
                mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=one_client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    server = psutil.Process(server_pid)
    barrier.wait()
    cpu_before, started = server.cpu_times(), time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed, cpu_after = time.perf_counter() - started, server.cpu_times()
    server_cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    return {"path": path, "calls": len(latencies), "p50_ms": round(percentile(latencies, 50) * 1e3, 2),
            "p99_ms": round(percentile(latencies, 99) * 1e3, 2), "mean_ms": round(statistics.mean(latencies) * 1e3, 2),
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "server_cpu_ms_per_call": round(server_cpu / len(latencies) * 1e3, 3)}


def status_load(server: Server, job_id: str, args: argparse.Namespace) -> dict:
    pid = server.process.pid
    result: dict = {"clients": args.clients, "calls_per_client": args.calls, "poll_interval_s": args.poll_interval}
    for mode, interval in (("back_to_back", 0.0), ("paced", args.poll_interval)):
        # Alternated, twice each, so that a burst of other load on the machine does not land on one side.
        runs = {"job_status": [], "baseline_healthz": []}
        for _ in range(2):
            runs["job_status"].append(load(server.url, f"/v1/jobs/{job_id}", args.clients, args.calls, pid, interval))
            runs["baseline_healthz"].append(load(server.url, "/healthz", args.clients, args.calls, pid, interval))
        result[mode] = {name: min(found, key=lambda run: run["p99_ms"]) | {"p99_ms_runs": [r["p99_ms"] for r in found]}
                        for name, found in runs.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="jobs started each way")
    parser.add_argument("--clients", type=int, default=32, help="concurrent status clients")
    parser.add_argument("--calls", type=int, default=50, help="status calls per client")
    parser.add_argument("--poll-interval", type=float, default=0.1, help="seconds between a paced client's calls")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "service_overhead.json")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    with tempfile.TemporaryDirectory(prefix="posttrain-bench-") as tmp:
        work = Path(tmp)
        cold = Server(work / "cold", "--no-warm-workers")
        warm = Server(work / "warm")
        try:
            cold.wait_ready()
            warm.wait_ready()
            direct, cold_runs, warm_runs = [], [], []
            for run in range(args.runs):  # interleaved, so drift in machine load hits all three alike
                direct.append(direct_start_latency(work, run))
                cold_runs.append(service_start_latency(cold.client, cold.data_dir))
                warm_runs.append(service_start_latency(warm.client, warm.data_dir))
            status = status_load(warm, warm_runs[-1][2], args)
        finally:
            cold.stop()
            warm.stop()

    medians = {name: round(statistics.median(v[0] if isinstance(v, tuple) else v for v in values), 3)
               for name, values in (("direct_worker", direct), ("cold_service", cold_runs), ("warm_service", warm_runs))}
    result = {
        "benchmark": "service_overhead",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_at_end": [round(v, 2) for v in os.getloadavg()]},
        "start_latency": {
            "runs": args.runs,
            "baseline_direct_worker_to_running_s": [round(v, 3) for v in direct],
            "cold_service_submit_to_worker_running_s": [round(r[0], 3) for r in cold_runs],
            "warm_service_submit_to_worker_running_s": [round(r[0], 3) for r in warm_runs],
            "cold_service_submit_to_launch_s": [round(r[1], 3) for r in cold_runs],
            "warm_service_submit_to_launch_s": [round(r[1], 3) for r in warm_runs],
            "median_s": medians,
            "warm_speedup_over_cold": round(medians["cold_service"] / medians["warm_service"], 1),
        },
        "status_calls": status,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
