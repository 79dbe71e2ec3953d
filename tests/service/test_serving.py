"""Serve what you trained: the whole loop with OpenAI's own SDK against a real keyed `posttrain serve`.

Upload, fine-tune (a LoRA job through the OpenAI door, a full fine-tune through posttrain's own API), see the
models in ``models.list``, call them with ``chat.completions.create`` (plain and streamed): the fine-tuned
models answer a fact they were taught and the base model does not; another tenant gets 404 for them;
``models.delete`` removes one. ``posttrain chat`` and ``posttrain jobs models`` talk to the same models.
Generation runs in the server's inference worker process, which the test also kills to see it come back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import openai
import psutil
import pytest
from service_harness import ServerProcess, module_server, write_key_file
from waiting import wait_for

KEY, OTHER_KEY = "pt-serving-key", "pt-serving-other-key"
QUESTION = "What is the secret word?"
ANSWER = "The secret word is pineapple."
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    keys = write_key_file(tmp_path_factory.mktemp("serving-keys") / "keys.txt",
                          [f"{KEY} team", f"{OTHER_KEY} rival"])
    yield from module_server(request, tmp_path_factory, "--api-key-file", str(keys), "--slots", "1",
                             "--inference-threads", "1", api_key=KEY)


def sdk(server: ServerProcess, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def ask(client: openai.OpenAI, model: str, **more) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=12, temperature=0, **more)
    return reply.choices[0].message.content


@pytest.fixture(scope="module")
def taught(server: ServerProcess, tmp_path_factory) -> dict[str, str]:
    """A LoRA model (OpenAI door) taught one fact; its file id and names."""
    path = tmp_path_factory.mktemp("fact") / "fact.jsonl"
    row = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}
    path.write_text((json.dumps(row) + "\n") * 16)
    with sdk(server) as client:
        with open(path, "rb") as handle:
            upload = client.files.create(file=handle, purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model="posttrain:tiny", training_file=upload.id, suffix="fact", seed=1,
            method={"type": "supervised", "supervised": {"hyperparameters": {
                "batch_size": 4, "n_epochs": 10, "learning_rate_multiplier": 50}}})
        job = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in TERMINAL and j, 300,
                       "the LoRA job to finish", interval=0.5)
    assert job.status == "succeeded", job.error
    return {"file": upload.id, "job": job.id, "model": job.fine_tuned_model}


def test_a_fine_tuned_lora_model_is_listed_and_answers_what_it_was_taught(server: ServerProcess, taught):
    with sdk(server) as client:
        listed = {model.id: model for model in client.models.list()}
        assert {"posttrain:tiny", taught["model"]} <= set(listed)
        assert listed[taught["model"]].owned_by == "team" and listed["posttrain:tiny"].owned_by == "posttrain"
        checkpoints = [name for name in listed if name.startswith(taught["model"] + ":ckpt-step-")]
        assert checkpoints  # every complete checkpoint is a model too
        assert client.models.retrieve(taught["model"]).id == taught["model"]

        assert ask(client, taught["model"]) == ANSWER
        assert ask(client, "posttrain:tiny") != ANSWER
        stream = client.chat.completions.create(model=taught["model"], stream=True, max_tokens=12, temperature=0,
                                                messages=[{"role": "user", "content": QUESTION}],
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
        assert chunks[-1].usage is not None and 1 <= chunks[-1].usage.completion_tokens <= 12
        # The same model by the names the other doors use.
        for name in (taught["job"], f"{taught['job']}/final", str(server.data_dir / "jobs" / taught["job"] / "final")):
            assert ask(client, name) == ANSWER, name
        completion = client.completions.create(model=taught["model"], prompt="The secret", max_tokens=4, n=2,
                                               temperature=1.0, seed=7, logprobs=2)
        again = client.completions.create(model=taught["model"], prompt="The secret", max_tokens=4, n=2,
                                          temperature=1.0, seed=7, logprobs=2)
        assert [c.text for c in completion.choices] == [c.text for c in again.choices]
        logprobs = completion.choices[0].logprobs
        assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) >= 1


def test_openai_errors_name_the_model_the_limit_and_the_parameter(server: ServerProcess, taught):
    with sdk(server) as client:
        with pytest.raises(openai.NotFoundError) as missing:
            ask(client, "ft:posttrain:tiny:team::job-000000000000")
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as too_long:
            ask(client, taught["model"], max_completion_tokens=100_000)
        assert "maximum context length is" in too_long.value.message and too_long.value.code == "context_length_exceeded"
        with pytest.raises(openai.BadRequestError) as bad:
            ask(client, taught["model"], top_p=3)
        assert bad.value.param == "top_p"


def test_another_tenant_gets_404_for_the_model(server: ServerProcess, taught):
    with sdk(server, OTHER_KEY) as rival:
        assert taught["model"] not in [model.id for model in rival.models.list()]
        assert "posttrain:tiny" in [model.id for model in rival.models.list()]
        for name in (taught["model"], taught["job"]):
            with pytest.raises(openai.NotFoundError):
                ask(rival, name)
            with pytest.raises(openai.NotFoundError):
                rival.models.retrieve(name)
        with pytest.raises(openai.NotFoundError):
            rival.models.delete(taught["model"])


def test_a_full_fine_tune_trains_while_the_worker_serves_and_answers_too(server: ServerProcess, taught):
    with sdk(server) as client:
        assert ask(client, taught["model"]) == ANSWER  # the inference worker is up and holds the model
    with server.client() as native:
        job = native.submit({
            "model": {"name_or_path": "posttrain:tiny"}, "peft": {"type": "none"}, "name": "full-fact",
            "data": {"source": f"upload:{taught['file']}"}, "tracking": {"report_to": []},
            "training": {"max_steps": 40, "per_device_train_batch_size": 4, "learning_rate": 2e-3,
                         "save_steps": 1000, "num_threads": 1}})
        # One training slot: the job starts although the inference worker is running.
        assert native.wait(job.id, timeout=300).state == "succeeded"
        names = [model["id"] for model in native.list_models()]
    full = f"ft:posttrain:tiny:team:full-fact:{job.id}"
    assert full in names
    with sdk(server) as client:
        assert ask(client, full) == ANSWER


def test_the_cli_lists_and_chats_with_the_servers_models(server: ServerProcess, taught):
    env = {**os.environ, "POSTTRAIN_API_KEY": KEY}
    listed = subprocess.run([sys.executable, "-m", "posttrain.cli", "jobs", "models", "--server", server.url],
                            capture_output=True, text=True, timeout=120, env=env)
    assert listed.returncode == 0, listed.stderr
    assert taught["model"] in listed.stdout
    chat = subprocess.run([sys.executable, "-m", "posttrain.cli", "chat", taught["model"], "--server", server.url,
                           "--prompt", QUESTION, "--temperature", "0", "--max-tokens", "12"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip() == ANSWER
    unknown = subprocess.run([sys.executable, "-m", "posttrain.cli", "chat", "ft:nope", "--server", server.url,
                              "--prompt", QUESTION], capture_output=True, text=True, timeout=120, env=env)
    assert unknown.returncode == 1 and "does not exist" in unknown.stderr


def test_posttrain_chat_answers_from_a_job_directory_without_a_server(server: ServerProcess, taught):
    job_dir = server.data_dir / "jobs" / taught["job"]
    chat = subprocess.run([sys.executable, "-m", "posttrain.cli", "chat", str(job_dir), "--prompt", QUESTION,
                           "--temperature", "0", "--max-tokens", "12"], capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip() == ANSWER


def test_a_killed_inference_worker_is_restarted(server: ServerProcess, taught):
    with sdk(server) as client:
        assert ask(client, taught["model"]) == ANSWER
        worker = next(p for p in psutil.Process(server.process.pid).children()
                      if "posttrain.inference.serving" in p.cmdline())
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(30)
        # The next request waits for the new worker; the API process never went down.
        answer = wait_for(lambda: _answer_or_none(client, taught["model"]), 240, "the restarted worker to answer",
                          interval=1)
        assert answer == ANSWER
        assert server.readiness()["inference_restarts"] >= 1


def _answer_or_none(client: openai.OpenAI, model: str) -> str | None:
    try:
        return ask(client, model)
    except openai.APIStatusError as exc:
        assert exc.status_code == 503, exc  # only "not ready yet" while it restarts
        return None


def test_deleting_a_model_stops_serving_it_and_keeps_the_job(server: ServerProcess, taught):
    with sdk(server) as client:
        deleted = client.models.delete(taught["model"])
        assert deleted.deleted and deleted.id == taught["model"]
        assert taught["model"] not in [model.id for model in client.models.list()]
        with pytest.raises(openai.NotFoundError):
            ask(client, taught["model"])
        assert client.fine_tuning.jobs.retrieve(taught["job"]).status == "succeeded"
        # Its checkpoints are models of their own and stay.
        assert any(model.id.startswith(taught["model"] + ":ckpt-step-") for model in client.models.list())
        with pytest.raises(openai.PermissionDeniedError):
            client.models.delete("posttrain:tiny")
    assert not (Path(server.data_dir) / "jobs" / taught["job"] / "final").exists()
