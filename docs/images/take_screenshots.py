"""Take the dashboard screenshots of docs/dashboard.md: a real server, a few posttrain:tiny jobs, chromium.

    .venv/bin/python docs/images/take_screenshots.py        # writes docs/images/dashboard-*.png

Needs Debian's chromium (/usr/bin/chromium, or POSTTRAIN_CHROMIUM) and Playwright (the dev extra). About
a minute on a laptop CPU: two jobs run to the end, one is cancelled, one trains while the pictures are taken.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from playwright.sync_api import expect, sync_playwright

from posttrain.client import Client

OUT = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("POSTTRAIN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def job(name: str, steps: int, **sections: dict) -> dict:
    spec = {"name": name, "training": {"max_steps": steps, "save_steps": 40, "logging_steps": 2, "num_threads": 1,
                                       "learning_rate": 2e-3, "per_device_train_batch_size": 2},
            "tracking": {"report_to": []}}
    for section, values in sections.items():
        spec[section] = {**spec.get(section, {}), **values}
    return spec


def compact(path: Path) -> None:
    """256 colours are plenty for a flat page: the PNG shrinks about fourfold (Pillow comes with matplotlib)."""
    image = Image.open(path).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(url: str) -> None:
    """Cancel what is still queued or running: workers outlive the server (their own sessions)."""
    with Client(url, timeout=5) as client:
        active = client.list_jobs(state=["queued", "running"]).jobs
        for each in active:
            client.cancel(each.id)
        for each in active:
            client.wait(each.id, timeout=120)


def main() -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="posttrain-screenshots-"))
    url = f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen([sys.executable, "-m", "posttrain.service", "--port", url.rsplit(":", 1)[1],
                               "--data-dir", str(data_dir), "--slots", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with Client(url, timeout=5) as client:
            while not client.ready():
                time.sleep(0.2)
            # Two finished jobs (SFT, DPO), one cancelled, then one training and one queued behind it.
            done = [client.submit(job("alpaca-sft", 80)),
                    client.submit(job("preference-dpo", 40, method={"name": "dpo", "beta": 0.1},
                                      data={"source": "posttrain:preference"}))]
            for finished in done:
                client.wait(finished.id, timeout=600)
            stopped = client.submit(job("style-sft", 2000, data={"source": "posttrain:style"}))
            while client.get_job(stopped.id).step < 20:
                time.sleep(0.2)
            client.cancel(stopped.id)
            client.wait(stopped.id, timeout=120)
            running = client.submit(job("alpaca-sft-eval", 2000, data={"validation": {"split_ratio": 0.1}},
                                        training={"eval_steps": 20}))
            client.submit(job("gsm8k-grpo", 50, method={"name": "grpo"}, data={"source": "posttrain:gsm8k"},
                              training={"per_device_train_batch_size": 4}), priority=-1)
            client.submit(job("queued-sft", 50), priority=-1)
            while client.get_job(running.id).step < 160:
                time.sleep(0.2)

            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1200, "height": 640}, device_scale_factor=1)
                page.goto(f"{url}/")
                expect(page.locator("tr.job-row")).to_have_count(6)
                page.wait_for_timeout(500)
                page.screenshot(path=OUT / "dashboard-jobs.png")
                page.set_viewport_size({"width": 1200, "height": 1000})
                page.goto(f"{url}/#/jobs/{running.id}")
                expect(page.locator("path.line[data-series='eval_loss']")).to_have_count(1, timeout=60_000)
                page.wait_for_timeout(2500)  # a few more points and log lines
                page.screenshot(path=OUT / "dashboard-job.png", full_page=True)
                browser.close()
            for picture in ("dashboard-jobs.png", "dashboard-job.png"):
                compact(OUT / picture)
    finally:
        stop(url)
        server.terminate()
        server.wait(30)
    shutil.rmtree(data_dir, ignore_errors=True)
    print(f"wrote {OUT / 'dashboard-jobs.png'} and {OUT / 'dashboard-job.png'}")


if __name__ == "__main__":
    main()
