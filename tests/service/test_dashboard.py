"""The web dashboard, in a real headless browser (Debian's chromium driven by Playwright), against a real
server training posttrain:tiny: the list shows the running job, its loss curve and log grow while it
trains, and the page's cancel button cancels it. On a keyed server the page asks for the key, refuses a
wrong one and shows only the key owner's jobs. A succeeded job's page has a playground: one prompt, the
base model's and the fine-tuned model's answers side by side, streamed.

Without chromium or Playwright the browser tests skip, saying why, except in CI (``CI`` set), where they
fail: the dashboard's test cannot silently vanish there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_harness import ServerProcess, train_spec, write_key_file

CHROMIUM = Path(os.environ.get("POSTTRAIN_CHROMIUM", "/usr/bin/chromium"))
# Without the networking flags chromium tries to reach Google's services and stalls on a machine
# without internet. Playwright adds --headless and --no-sandbox itself and gives the browser a fresh
# temporary profile (--user-data-dir) on every launch.
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ALICE, BOB = "pt-dash-alice", "pt-dash-bob"
WAIT_MS = 120_000  # a deadline for what the page must come to show, not a speed requirement


def browser_missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "Playwright is not installed (pip install -e '.[dev]')"
    if not CHROMIUM.is_file():
        return f"no chromium at {CHROMIUM} (apt-get install chromium, or set POSTTRAIN_CHROMIUM)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    missing = browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the dashboard's browser test must run in CI: {missing}")
        pytest.skip(missing)
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser) -> Iterator[object]:
    """A fresh browser tab (its own session storage); fails the test on any uncaught JavaScript error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.set_default_timeout(WAIT_MS)
    yield tab
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def test_the_page_is_served_without_a_key_and_the_data_only_with_one(start_server, tmp_path: Path):
    keys = write_key_file(tmp_path / "keys.txt", [f"{ALICE} alice"])
    server = start_server("--api-key-file", str(keys), api_key=ALICE)
    with httpx.Client(base_url=server.url) as http:
        index = http.get("/")
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        assert "frame-ancestors 'none'" in index.headers["content-security-policy"]
        script = http.get("/dashboard/app.js")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        assert http.get("/dashboard/nothing.js").status_code == 404
        assert http.get("/dashboard/..%2Fapp.py").status_code == 404  # only the folder's own files, by name
        assert http.get("/v1/jobs").status_code == 401  # the page's data calls need the key like any other
        assert "/" not in http.get("/openapi.json", headers={"Authorization": f"Bearer {ALICE}"}).json()["paths"]
    with server.client() as alice:  # the list shows each job's model: listings carry it, like single reads
        job = alice.submit(train_spec(max_steps=1, save_steps=1) | {"model": {"name_or_path": "posttrain:tiny"}})
        assert alice.get_job(job.id).model == "posttrain:tiny"
        assert [(j.id, j.model) for j in alice.list_jobs().jobs] == [(job.id, "posttrain:tiny")]


def test_the_dashboard_follows_a_training_job_and_cancels_it(start_server, page, tmp_path: Path):
    from playwright.sync_api import expect

    server: ServerProcess = start_server("--cancel-grace", "10")
    spec = train_spec(max_steps=3000, save_steps=100)  # ~60 s on an idle CPU; cancelled long before
    spec["name"] = "dashboard-run"
    with server.client() as client:
        job = client.submit(spec)

        page.goto(f"{server.url}/")
        row = page.locator(f"tr[data-job-id='{job.id}']")
        expect(row.locator(".state")).to_have_text("running")
        expect(row).to_contain_text("dashboard-run")
        expect(row).to_contain_text("sft")
        expect(row).to_contain_text("posttrain:tiny")

        row.locator("a.job-link").click()
        expect(page).to_have_url(re.compile(f"#/jobs/{job.id}$"))
        expect(page.locator("h1")).to_have_text("dashboard-run")
        # States the page has no colour for (a newer server's) still show, as their name.
        state_class = "s => import(new URL('dashboard/format.js', location.href)).then(m => m.stateClass(s))"
        assert page.evaluate(state_class, "running") == "state state-running"
        assert page.evaluate(state_class, "resuming") == "state state-other"

        # The loss curve gains points while the job trains (the page asks for metrics after the last step).
        loss = "path.line[data-series='loss']"
        expect(page.locator(loss)).to_have_count(1)
        points = int(page.locator(loss).get_attribute("data-count"))
        page.wait_for_function("([sel, n]) => Number(document.querySelector(sel)?.dataset.count) > n",
                               arg=[loss, points])
        assert int(page.locator(loss).get_attribute("data-count")) <= len(client.metrics(job.id))

        # The log panel follows the log: new lines arrive without reloading.
        expect(page.locator("#log")).to_contain_text("posttrain.worker")
        lines = page.locator("#log .line").count()
        page.wait_for_function("n => document.querySelectorAll('#log .line').length > n", arg=lines)

        # Pause from the page: the job stops with a checkpoint and shows paused; resume runs it again.
        page.locator("#pause-job").click()
        assert client.wait(job.id, timeout=120, states=("paused",)).state == "paused"
        expect(page.locator(".title .state")).to_have_text("paused")
        expect(page.locator("#log-state")).to_have_text("ended: job paused")
        expect(page.locator("#pause-job")).to_have_text("Resume")
        page.locator("#pause-job").click()
        expect(page.locator(".title .state")).to_have_text("running", timeout=60_000)
        expect(page.locator("#log-state")).to_have_text("following", timeout=30_000)
        expect(page.locator("#pause-job")).to_have_text("Pause")

        # Cancel from the page; the API agrees.
        assert client.get_job(job.id).state == "running", "the job ended before the page could cancel it"
        page.once("dialog", lambda dialog: dialog.accept())
        page.locator("#cancel-job").click()
        assert client.wait(job.id, timeout=120).state == "cancelled"
        expect(page.locator(".title .state")).to_have_text("cancelled")
        expect(page.locator("#cancel-job")).to_be_hidden()
        expect(page.locator("#log-state")).to_have_text("ended: job cancelled")

        # Its complete checkpoints are listed as the API lists them, and a file downloads from its link.
        checkpoints = [f"checkpoints/{name}" for name in client.artifacts(job.id).checkpoints]
        expect(page.locator(".files details summary strong")).to_have_text(checkpoints)
        with page.expect_download() as download:
            page.locator("a.file-link", has_text="spec.json").click()
        assert json.loads(Path(download.value.path()).read_text())["name"] == "dashboard-run"


def test_a_keyed_server_asks_for_the_key_and_shows_only_that_owners_jobs(start_server, page, tmp_path: Path):
    from playwright.sync_api import expect

    keys = write_key_file(tmp_path / "keys.txt", [f"{ALICE} alice", f"{BOB} bob"])
    server: ServerProcess = start_server("--api-key-file", str(keys), api_key=ALICE)
    with server.client(ALICE) as alice, server.client(BOB) as bob:
        mine = alice.submit(train_spec(max_steps=2))
        theirs = bob.submit(train_spec(max_steps=2))

    page.goto(f"{server.url}/")
    key = page.locator("#api-key")
    expect(key).to_be_visible()
    expect(page.locator(".key-form .error")).to_have_count(0)  # a first visit is asked, not scolded
    expect(page.locator("table.jobs")).to_have_count(0)

    key.fill("not-a-key")
    key.press("Enter")
    expect(page.locator(".key-form .error")).to_have_text("API key not accepted by this server")
    expect(page.locator("table.jobs")).to_have_count(0)

    page.locator("#api-key").fill(ALICE)
    page.locator("#api-key").press("Enter")
    expect(page.locator(f"tr[data-job-id='{mine.id}']")).to_be_visible()
    expect(page.locator("tr.job-row")).to_have_count(1)  # Bob's job is not Alice's to see
    page.reload()  # the key lasts for the tab's session
    expect(page.locator(f"tr[data-job-id='{mine.id}']")).to_be_visible()

    page.goto(f"{server.url}/#/jobs/{theirs.id}")
    expect(page.locator("#no-job")).to_contain_text(f"no job '{theirs.id}'")
    expect(page.locator("#log")).to_have_count(0)

    # A download on a keyed server goes through fetch with the key (a plain link could not send it).
    page.goto(f"{server.url}/#/jobs/{mine.id}")
    with page.expect_download() as download:
        page.locator("a.file-link", has_text="spec.json").click()
    assert json.loads(Path(download.value.path()).read_text())["model"]["name_or_path"] == "posttrain:tiny"

    page.locator("#forget-key").click()
    expect(page.locator("#api-key")).to_be_visible()


def test_the_playground_streams_the_base_and_the_fine_tuned_answers_side_by_side(start_server, page, tmp_path: Path):
    """A LoRA job taught one fact; on its page (a keyed server: the page's key reaches the inference routes),
    one prompt gets the base model's answer and the fine-tuned one's, each streamed in several chunks."""
    from playwright.sync_api import expect

    question, answer = "What is the secret word?", "The secret word is pineapple."
    row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    (tmp_path / "fact.jsonl").write_text((json.dumps(row) + "\n") * 16)
    keys = write_key_file(tmp_path / "keys.txt", [f"{ALICE} alice"])
    server = start_server("--api-key-file", str(keys), api_key=ALICE)
    with server.client() as alice:
        spec = train_spec(max_steps=40, save_steps=1000, per_device_train_batch_size=4, learning_rate=1e-2)
        spec |= {"name": "taught", "model": {"name_or_path": "posttrain:tiny"}, "peft": {"type": "lora"},
                 "data": {"source": alice.upload(tmp_path / "fact.jsonl").source}}
        job = alice.submit(spec)
        assert alice.wait(job.id, timeout=300).state == "succeeded"
        served = alice.get_model(job.id)

    page.goto(f"{server.url}/#/jobs/{job.id}")
    page.locator("#api-key").fill(ALICE)
    page.locator("#api-key").press("Enter")
    playground = page.locator("#playground")
    expect(playground.locator("[data-role='base']")).to_contain_text("posttrain:tiny")
    expect(playground.locator("[data-role='tuned']")).to_contain_text(served["id"])  # ft:posttrain:tiny:alice:taught:job-...
    page.locator("#playground-prompt").fill(question)
    page.locator("#playground-send").click()

    tuned, base = playground.locator("[data-role='tuned']"), playground.locator("[data-role='base']")
    expect(tuned).to_have_attribute("data-state", "done")
    expect(base).to_have_attribute("data-state", "done")
    expect(tuned.locator(".answer-text")).to_have_text(answer)  # greedy (temperature 0, the default)
    assert base.locator(".answer-text").inner_text() not in ("", answer)
    assert int(tuned.locator(".answer-text").get_attribute("data-chunks")) > 1  # streamed, not in one piece


def test_eval_curves_the_best_checkpoint_and_the_compare_page(start_server, page, tmp_path: Path):
    from playwright.sync_api import expect

    server: ServerProcess = start_server("--slots", "2")
    evaluation = {"data": "posttrain:alpaca", "every_steps": 2, "max_samples": 3, "graders": ["text_similarity"],
                  "max_new_tokens": 6, "select_best": "loss"}
    with server.client() as client:
        jobs = []
        for name, rate in (("eval-a", 1e-3), ("eval-b", 3e-3)):
            spec = train_spec(max_steps=4, learning_rate=rate) | {"name": name, "eval": evaluation}
            jobs.append(client.submit(spec))
        jobs = [client.wait(job.id, timeout=300) for job in jobs]
        assert [job.state for job in jobs] == ["succeeded"] * 2, [job.error for job in jobs]
        best = jobs[0].best
        answers = client.evaluation(jobs[0].id).answers

    # A job's page: the eval curves beside the training curves, the best checkpoint named and marked.
    page.goto(f"{server.url}/#/jobs/{jobs[0].id}")
    expect(page.locator("path.line[data-series='eval_loss']")).to_have_attribute("data-count", "2")
    expect(page.locator("figure[data-panel='Evaluation'] path.line[data-series='eval_text_similarity']")).to_have_count(1)
    expect(page.locator("#best-checkpoint")).to_contain_text(f"checkpoint-{best['step']}")
    expect(page.locator(f"figure[data-panel='Loss'] g.marker[data-step='{best['step']}']")).to_have_count(1)
    expect(page.locator(f"details[data-group='{best['checkpoint']}'] .badge.best")).to_have_text("best")

    # The list ticks two jobs for the compare page: their scores and answers side by side.
    page.goto(f"{server.url}/")
    for job in jobs:
        page.locator(f"tr[data-job-id='{job.id}'] input.compare-pick").check()
    expect(page.locator("#compare-jobs")).to_have_text("Compare 2")
    assert "#/jobs/" not in page.url  # ticking a box does not open the job
    page.locator("#compare-jobs").click()
    expect(page).to_have_url(re.compile(f"#/compare/{jobs[0].id},{jobs[1].id}$"))
    scores = page.locator("#compare-scores")
    expect(scores.locator("thead th")).to_have_count(3)
    expect(scores.locator("th[data-job-id]")).to_contain_text(["eval-a", "eval-b"])
    similarity = scores.locator("tr[data-metric='eval_text_similarity'] td.value")
    expect(similarity).to_have_count(2)
    expect(scores.locator("tr[data-metric='best']")).to_contain_text(f"checkpoint-{best['step']}")
    rows = page.locator("#compare-answers tr.answer-row")
    expect(rows).to_have_count(len(answers))
    expect(rows.first.locator("td")).to_have_count(4)  # prompt, reference, one answer per job
    expect(rows.first.locator("td").nth(1)).to_have_text(answers[0]["reference"])
