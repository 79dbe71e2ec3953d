"""inline::posttrain through a real `llama stack run` (Llama Stack 0.6.1 in its own Python 3.12 venv),
driven by the official llama-stack-client: datasets registered through Llama Stack, SFT with LoRA and DPO
on the embedded tiny model, job list / status / artifacts / cancel, chat with a trained model through
Llama Stack's own inference API (posttrain's inline inference provider), and a Llama Stack restart mid-job.
One server is shared by the module; the restart test has its own."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from pathlib import Path

import pytest
from llama_stack_harness import LlamaStackServer, messages_rows, preference_rows, sft_request, training_config
from service_harness import HeldLog, frozen, kill_workers, worker_processes
from waiting import wait_for

pytestmark = pytest.mark.usefixtures("llama_stack_venv")


def workers_of(data_dir: Path, job_dir: Path) -> list:
    """Live worker processes of one job: by their --job-dir argument (cold) or recorded identity (warm). The
    harness's own lookup, which counts a worker that ends while it looks (a zombie) as gone; a second look at
    the process here raised psutil.ZombieProcess for one that ended in between."""
    return worker_processes(data_dir / "posttrain", job_dir)


@pytest.fixture(scope="module")
def server(llama_stack_venv, tmp_path_factory):
    server = LlamaStackServer(tmp_path_factory.mktemp("inline") / "data", "inline", clock_step=True).start()
    yield server
    server.stop()
    kill_workers(server.data_dir / "posttrain")


@pytest.fixture(scope="module")
def sft_job(server) -> dict:
    """A LoRA SFT job on rows registered inline, trained to completion."""
    registered = server.call("register", purpose="post-training/messages", dataset_id="adds",
                             source={"type": "rows", "rows": messages_rows()})
    assert registered["identifier"] == "adds", registered
    assert server.call("sft", **sft_request("sft-rows", "adds")) == {"job_uuid": "sft-rows"}
    return server.wait_finished("sft-rows")


def test_sft_with_lora_completes_with_checkpoints_and_metrics(server, sft_job):
    assert sft_job["status"] == "completed", server.log()[-3000:]
    assert sft_job["scheduled_at"] <= sft_job["started_at"] <= sft_job["completed_at"]
    resources = sft_job["resources_allocated"]
    assert resources["launcher"] == "local" and resources["posttrain_job_id"].startswith("job-")
    final = sft_job["checkpoints"][-1]
    assert final["identifier"] == "sft-rows/final" and final["post_training_job_id"] == "sft-rows"
    assert Path(final["path"]).is_dir() and final["epoch"] == 1
    metrics = final["training_metrics"]
    assert metrics["train_loss"] > 0 and metrics["validation_loss"] > 0
    assert math.isclose(metrics["perplexity"], math.exp(metrics["validation_loss"]), rel_tol=1e-9)
    # The job is posttrain's own: its spec has the request's settings, mapped.
    spec = json.loads((Path(resources["job_dir"]) / "spec.json").read_text())
    assert spec["name"] == "llama-stack/sft-rows" and spec["training"]["max_steps"] == 3
    assert spec["peft"]["target_modules"] == ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert spec["data"]["validation"]["source"]  # a held-out split gives the validation loss
    # Its worker was forked from the warm template run by worker_python (the posttrain venv, with torch).
    assert "forked from the warm template" in (Path(resources["job_dir"]) / "worker.log").read_text()


QUESTION, ANSWER = "What is the secret word?", "The secret word is pineapple."


@pytest.fixture(scope="module")
def taught_job(server) -> dict:
    """A LoRA job that taught the tiny model one fact, trained through Llama Stack's post_training."""
    row = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}
    server.call("register", purpose="post-training/messages", dataset_id="fact", source={"type": "rows", "rows": [row] * 16})
    request = sft_request("fact", "fact", steps=40)
    request["training_config"]["optimizer_config"]["lr"] = 1e-2
    request["algorithm_config"] = {**request["algorithm_config"], "rank": 16, "alpha": 32}
    assert server.call("sft", **request) == {"job_uuid": "fact"}
    status = server.wait_finished("fact")
    assert status["status"] == "completed", server.log()[-3000:]
    return status


def test_chat_with_the_trained_model_through_llama_stacks_inference_api(server, taught_job):
    """Trained through post_training, called through Llama Stack's chat completions: the job's Checkpoint
    identifier is the model's name under the posttrain inference provider, answered by the inline provider's
    own inference worker (under worker_python: Llama Stack's environment has no torch)."""
    identifier = taught_job["checkpoints"][-1]["identifier"]
    assert identifier == "fact/final"
    model = f"posttrain/{identifier}"

    def ask(name: str) -> dict:
        return server.call("chat", model=name, messages=[{"role": "user", "content": QUESTION}], max_tokens=12,
                           temperature=0)

    reply = ask(model)
    assert reply["model"] == model and reply["choices"][0]["message"]["content"] == ANSWER, reply
    assert reply["usage"]["completion_tokens"] >= 1
    assert ask("posttrain/posttrain:tiny")["choices"][0]["message"]["content"] != ANSWER  # the base was not taught
    chunks = server.call("chat-stream", model=model, messages=[{"role": "user", "content": QUESTION}],
                         max_tokens=12, temperature=0)
    assert len(chunks) > 1 and "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks if c["choices"]) == ANSWER
    assert (server.data_dir / "posttrain" / "inference-worker.log").is_file()

    # Registered under its identifier, it is listed at once (unregistered, after Llama Stack's next refresh).
    registered = server.call("register-model", model_id=identifier, provider_id="posttrain",
                             provider_model_id=identifier)
    assert registered["identifier"] == model, registered
    assert model in [listed["id"] for listed in server.call("models")]
    missing = server.call("chat", model="posttrain/no-such-job/final", messages=[{"role": "user", "content": "hi"}])
    assert missing["error"]["status"] == 404, missing
    refused = server.call("register-model", model_id="nothing", provider_id="posttrain", provider_model_id="nothing/final")
    assert 400 <= refused["error"]["status"] < 500, refused


def test_artifacts_load_with_transformers_and_peft_and_generate(server, sft_job):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    artifacts = server.artifacts("sft-rows")
    assert artifacts["job_uuid"] == "sft-rows"
    assert [c["identifier"] for c in artifacts["checkpoints"]] == [c["identifier"] for c in sft_job["checkpoints"]]
    final = Path(artifacts["checkpoints"][-1]["path"])
    model = AutoPeftModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("What is 2 plus 2?", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[-1] > ids["input_ids"].shape[-1]


def test_job_list_shows_jobs(server, sft_job):
    listed = server.call("list")
    assert {"job_uuid": "sft-rows"} in listed


def test_the_client_s_stale_status_route_is_404_and_the_workaround_works(server, sft_job):
    # llama-stack-client 0.6.1 calls /v1alpha/post-training/job/status (no job_uuid): docs/llama-stack.md.
    assert server.call("stale-status")["error"]["status"] == 404
    status = server.call("get", path="/v1alpha/post-training/jobs/sft-rows/status")
    assert status["status"] == "completed" and status["job_uuid"] == "sft-rows"


def test_instruct_rows_from_a_local_csv_file_and_a_data_uri(server, tmp_path):
    rows = [{"chat_completion_input": json.dumps([{"role": "user", "content": f"Spell {word}."}]),
             "expected_answer": " ".join(word)} for word in ("cat", "dog", "fish", "bird", "frog", "mouse")]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["chat_completion_input", "expected_answer"])
    writer.writeheader()
    writer.writerows(rows)
    (tmp_path / "spell.csv").write_text(buffer.getvalue())
    data_uri = "data:text/csv;base64," + base64.b64encode(buffer.getvalue().encode()).decode()
    server.call("register", purpose="post-training/messages", dataset_id="spell-file",
                source={"type": "uri", "uri": f"file://{tmp_path / 'spell.csv'}"})
    server.call("register", purpose="post-training/messages", dataset_id="spell-data",
                source={"type": "uri", "uri": data_uri})
    # The data: URI dataset validates the file one: validation_dataset_id instead of a held-out split.
    request = sft_request("sft-instruct", "spell-file", steps=2, data_format="instruct",
                          validation_dataset_id="spell-data")
    assert server.call("sft", **request) == {"job_uuid": "sft-instruct"}
    status = server.wait_finished("sft-instruct")
    assert status["status"] == "completed", server.log()[-3000:]
    assert status["checkpoints"][-1]["training_metrics"]["validation_loss"] > 0
    job_dir = Path(status["resources_allocated"]["job_dir"])
    spec = json.loads((job_dir / "spec.json").read_text())
    train_rows = [json.loads(line) for line in Path(spec["data"]["source"]).read_text().splitlines()]
    assert train_rows[0] == {"messages": [{"role": "user", "content": "Spell cat."},
                                          {"role": "assistant", "content": "c a t"}]}
    assert len(train_rows) == 6  # all of them: validation comes from the other dataset


def test_dpo_through_preference_optimize(server):
    server.call("register", purpose="post-training/messages", dataset_id="prefs",
                source={"type": "rows", "rows": preference_rows()})
    request = {"job_uuid": "dpo-1", "finetuned_model": "posttrain:tiny",
               "algorithm_config": {"beta": 0.2, "loss_type": "sigmoid"},
               "training_config": training_config("prefs", steps=2), "hyperparam_search_config": {},
               "logger_config": {}}
    assert server.call("dpo", **request) == {"job_uuid": "dpo-1"}
    status = server.wait_finished("dpo-1")
    assert status["status"] == "completed", server.log()[-3000:]
    spec = json.loads((Path(status["resources_allocated"]["job_dir"]) / "spec.json").read_text())
    assert spec["method"]["name"] == "dpo" and spec["method"]["beta"] == 0.2
    assert status["checkpoints"][-1]["training_metrics"]["validation_loss"] > 0


def test_cancel_stops_a_running_worker(server):
    server.call("register", purpose="post-training/messages", dataset_id="long",
                source={"type": "rows", "rows": messages_rows(16)})
    assert server.call("sft", **sft_request("to-cancel", "long", steps=100_000)) == {"job_uuid": "to-cancel"}
    wait_for(lambda: server.status("to-cancel")["status"] == "in_progress", 120, "the job to start")
    job_dir = Path(server.status("to-cancel")["resources_allocated"]["job_dir"])
    wait_for(lambda: workers_of(server.data_dir, job_dir), 60, "its worker process")
    response = server.cancel("to-cancel")
    assert response.status_code == 200, response.text
    status = server.wait_finished("to-cancel", timeout=120)
    assert status["status"] == "cancelled" and status["completed_at"]
    assert not workers_of(server.data_dir, job_dir)


def test_a_cancel_at_any_point_of_a_start_ends_the_job_and_the_next_one_starts(server):
    """Through Llama Stack's cancel route: queued, launching (claimed, its worker not forked yet), just
    forked (no signal handler yet) and running, each job ends cancelled with no worker left, and the next
    job starts. Llama Stack sees the wall clock stepped since the workers started: the inline provider
    used to lose every such cancel then (the job trained on with cancel_requested set, in the only slot)."""
    server.call("register", purpose="post-training/messages", dataset_id="start-up",
                source={"type": "rows", "rows": messages_rows(16)})

    def submit(job_uuid: str, steps: int = 100_000) -> Path:
        assert server.call("sft", **sft_request(job_uuid, "start-up", steps=steps)) == {"job_uuid": job_uuid}
        return Path(server.status(job_uuid)["resources_allocated"]["job_dir"])

    def ends_cancelled(job_uuid: str, job_dir: Path) -> None:
        status = server.wait_finished(job_uuid, timeout=90)
        assert status["status"] == "cancelled", server.log()[-3000:]
        assert not workers_of(server.data_dir, job_dir)

    with server.clock_step.stepped():
        with frozen(server.warm_template_pid()):  # the scheduler claims a job, then waits for its fork
            launching = submit("start-launching")
            wait_for(lambda: server.status("start-launching")["status"] == "in_progress", 60, "the job to be claimed")
            queued = submit("start-queued")
            assert server.status("start-queued")["status"] == "scheduled"
            assert server.cancel("start-queued").status_code == 200
            forked = submit("start-forked")
            held = HeldLog(forked)
            assert server.cancel("start-launching").status_code == 200
            assert not (launching / "worker-process.json").exists()  # not forked yet
        ends_cancelled("start-queued", queued)
        ends_cancelled("start-launching", launching)

        # The next job started: its worker is held at its first instant, before it handles any signal.
        wait_for(held.held_worker, 60, "the next job's worker to be forked")
        running = submit("start-running")
        assert server.cancel("start-forked").status_code == 200
        ends_cancelled("start-forked", forked)
        held.close()

        wait_for(lambda: json.loads((running / "status.json").read_text()).get("step", 0) > 0, 120, "a step")
        assert workers_of(server.data_dir, running)  # what ends_cancelled sees gone
        submit("start-last", steps=2)
        assert server.cancel("start-running").status_code == 200
        ends_cancelled("start-running", running)
        assert server.wait_finished("start-last")["status"] == "completed", server.log()[-3000:]
    assert not (queued / "worker-process.json").exists()  # never started


def _set(section: str, **values):
    def change(request: dict) -> None:
        target = request
        for part in section.split(".") if section else []:
            target = target[part]
        target.update(values)
    return change


@pytest.mark.parametrize(("change", "named"), [
    (_set("training_config.data_config", dataset_id="no-such-dataset"), "no-such-dataset"),
    (lambda request: request.update(algorithm_config={"type": "QAT", "quantizer_name": "int8", "group_size": 32}),
     "QAT"),
    (_set("training_config", n_epochs="many"), "n_epochs"),
    (_set("training_config.data_config", shuffle=False), "shuffle"),
    (_set("algorithm_config", use_dora=True), "use_dora"),
    (lambda request: request["training_config"].update(efficiency_config={"fsdp_cpu_offload": True}),
     "fsdp_cpu_offload"),
    (_set("", job_uuid="sft-rows"), "already taken"),
], ids=["unknown-dataset", "qat", "malformed-training-config", "no-shuffle", "dora", "fsdp", "duplicate-uuid"])
def test_bad_requests_are_errors_naming_the_problem_and_the_server_stays_up(server, sft_job, change, named):
    request = sft_request("bad-request", "adds")
    request["algorithm_config"] = dict(request["algorithm_config"])
    change(request)
    answer = server.call("sft", **request)
    assert "error" in answer, answer
    assert 400 <= answer["error"]["status"] < 500 and named in answer["error"]["message"], answer
    assert server.alive()
    assert {"job_uuid": "bad-request"} not in server.call("list")


def test_unknown_job_is_404(server):
    assert server.get("/v1alpha/post-training/jobs/no-such-job/status").status_code == 404


def test_jobs_survive_a_llama_stack_restart_while_one_runs(llama_stack_venv, tmp_path):
    first = LlamaStackServer(tmp_path / "data", "inline").start()
    try:
        first.call("register", purpose="post-training/messages", dataset_id="adds",
                   source={"type": "rows", "rows": messages_rows(16)})
        first.call("sft", **sft_request("before", "adds", steps=2))
        assert first.wait_finished("before")["status"] == "completed"
        first.call("sft", **sft_request("across", "adds", steps=60))
        wait_for(lambda: first.status("across")["status"] == "in_progress", 120, "the job to start")
        job_dir = Path(first.status("across")["resources_allocated"]["job_dir"])
        wait_for(lambda: json.loads((job_dir / "status.json").read_text()).get("step", 0) > 0, 120, "a step")
        worker = workers_of(tmp_path / "data", job_dir)
        first.kill()  # no goodbye: the worker runs on in its own session
        assert worker and worker[0].is_running()
        second = LlamaStackServer(tmp_path / "data", "inline").start()
        try:
            assert {"job_uuid": "before"} in second.call("list")
            # Llama Stack lists the trained models of its inference provider when it starts.
            assert "posttrain/before/final" in [model["id"] for model in second.call("models")]
            assert second.status("before")["status"] == "completed"
            assert second.status("across")["status"] in ("in_progress", "completed")
            done = second.wait_finished("across")
            assert done["status"] == "completed", second.log()[-3000:]
            assert json.loads((job_dir / "status.json").read_text())["step"] == 60
            assert done["resources_allocated"]["attempt"] == 1  # the same worker went on: never restarted
        finally:
            second.stop()
    finally:
        first.kill()
        kill_workers(tmp_path / "data" / "posttrain")


def test_providers_d_form_serves_the_same_provider(llama_stack_venv, tmp_path):
    server = LlamaStackServer(tmp_path / "data", "inline", providers_d=True).start()
    try:
        assert server.call("list") == []
        assert "external_providers_dir" in server.run_yaml.read_text()
    finally:
        server.stop()


def test_llama_stack_venv_has_the_provider_and_no_torch(llama_stack_venv):
    import subprocess

    probe = ("import importlib.util as u, posttrain.llama_stack.provider as p; "
             "print(u.find_spec('torch') is None, [s.provider_type for s in p.get_provider_spec()])")
    done = subprocess.run([str(llama_stack_venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "True ['inline::posttrain', 'remote::posttrain']"
    probe = ("import importlib.util as u, posttrain.llama_stack.inference.provider as p, "
             "posttrain.llama_stack.inference.inline, posttrain.llama_stack.inference.remote; "
             "print(u.find_spec('torch') is None, [(s.api.value, s.provider_type) for s in p.get_provider_spec()])")
    done = subprocess.run([str(llama_stack_venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "True [('inference', 'inline::posttrain'), ('inference', 'remote::posttrain')]"
