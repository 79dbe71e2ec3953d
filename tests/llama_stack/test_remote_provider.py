"""remote::posttrain through a real `llama stack run` in front of a real `posttrain serve` (with an API
key), both on loopback: Llama Stack 8321 -> remote provider -> posttrain service -> worker, and chat with
the result through Llama Stack's inference API (remote::posttrain inference -> the service's OpenAI routes).
The service's store is the truth: its jobs carry the Llama Stack job_uuid as their name."""

from __future__ import annotations

import pytest
from llama_stack_harness import LlamaStackServer, messages_rows, preference_rows, sft_request, training_config
from service_harness import ServerProcess, kill_workers, write_key_file
from waiting import wait_for

KEY = "llama-stack-test-key-0123456789"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    folder = tmp_path_factory.mktemp("remote-service")
    keys = write_key_file(folder / "keys.txt", [f"{KEY} llama"])
    server = ServerProcess(folder / "data", "--api-key-file", str(keys), api_key=KEY).start()
    yield server
    server.stop()
    kill_workers(server.data_dir)


@pytest.fixture(scope="module")
def stack(llama_stack_venv, service, tmp_path_factory):
    server = LlamaStackServer(tmp_path_factory.mktemp("remote") / "data", "remote", url=service.url,
                              api_key=KEY).start()
    server.call("register", purpose="post-training/messages", dataset_id="adds",
                source={"type": "rows", "rows": messages_rows()})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def remote_sft(stack) -> dict:
    """A LoRA SFT job sent through Llama Stack to the service, trained to completion."""
    assert stack.call("sft", **sft_request("remote-sft", "adds")) == {"job_uuid": "remote-sft"}
    status = stack.wait_finished("remote-sft")
    assert status["status"] == "completed", stack.log()[-3000:]
    return status


def test_sft_runs_on_the_service_and_shows_through_llama_stack(stack, service, remote_sft, tmp_path):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    status = remote_sft
    job_id = status["resources_allocated"]["posttrain_job_id"]
    assert status["resources_allocated"]["service"] == service.url
    with service.client() as client:
        job = client.get_job(job_id)
        assert job.name == "llama-stack/remote-sft" and job.state == "succeeded" and job.total_steps == 3
        final = status["checkpoints"][-1]
        assert final["path"] == f"{service.url}/v1/jobs/{job_id}/artifacts/final"
        assert final["training_metrics"]["validation_loss"] > 0
        # The artifacts download from the service and load with transformers + PEFT.
        for artifact in client.artifacts(job_id).artifacts:
            if artifact.path.startswith("final/"):
                client.download(job_id, artifact.path, tmp_path / artifact.path)
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "final")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "final")
    ids = tokenizer("What is 3 plus 3?", return_tensors="pt")
    with torch.no_grad():
        assert model.generate(**ids, max_new_tokens=4, do_sample=False).shape[-1] > ids["input_ids"].shape[-1]
    assert {"job_uuid": "remote-sft"} in stack.call("list")
    assert stack.artifacts("remote-sft")["checkpoints"] == status["checkpoints"]


def test_chat_with_the_trained_model_through_llama_stack(stack, service, remote_sft):
    """remote::posttrain inference: the job's Checkpoint identifier names its model, which the service's
    inference worker answers, exactly as the service answers the same job asked for directly."""
    import openai

    question = [{"role": "user", "content": "What is 3 plus 3?"}]
    model = f"posttrain/{remote_sft['checkpoints'][-1]['identifier']}"
    reply = stack.call("chat", model=model, messages=question, max_tokens=8, temperature=0)
    assert reply["model"] == model == "posttrain/remote-sft/final", reply
    direct = openai.OpenAI(base_url=f"{service.url}/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model=remote_sft["resources_allocated"]["posttrain_job_id"], messages=question, max_tokens=8, temperature=0)
    assert reply["choices"][0]["message"]["content"] == direct.choices[0].message.content
    assert reply["usage"]["completion_tokens"] == direct.usage.completion_tokens >= 1


def test_the_services_other_jobs_are_not_llama_stacks(stack, service):
    # A job submitted to the service directly, named like a job_uuid: not listed, found or cancelled as one.
    with service.client() as client:
        other = client.submit({"name": "not-from-llama-stack", "model": {"name_or_path": "posttrain:tiny"},
                               "training": {"max_steps": 1}})
        assert {"job_uuid": "not-from-llama-stack"} not in stack.call("list")
        assert stack.cancel("not-from-llama-stack").status_code == 404
        assert client.get_job(other.id).cancel_requested is False


def test_dpo_runs_on_the_service(stack, service):
    stack.call("register", purpose="post-training/messages", dataset_id="prefs",
               source={"type": "rows", "rows": preference_rows()})
    request = {"job_uuid": "remote-dpo", "finetuned_model": "posttrain:tiny",
               "algorithm_config": {"beta": 0.1, "loss_type": "hinge"}, "training_config": training_config("prefs", 2),
               "hyperparam_search_config": {}, "logger_config": {}}
    assert stack.call("dpo", **request) == {"job_uuid": "remote-dpo"}
    status = stack.wait_finished("remote-dpo")
    assert status["status"] == "completed", stack.log()[-3000:]
    with service.client() as client:
        assert client.get_job(status["resources_allocated"]["posttrain_job_id"]).method == "dpo"


def test_cancel_reaches_the_service(stack, service):
    stack.call("sft", **sft_request("remote-cancel", "adds", steps=100_000))
    wait_for(lambda: stack.status("remote-cancel")["status"] == "in_progress", 120, "the job to start")
    assert stack.cancel("remote-cancel").status_code == 200
    assert stack.wait_finished("remote-cancel", timeout=120)["status"] == "cancelled"
    job_id = stack.status("remote-cancel")["resources_allocated"]["posttrain_job_id"]
    with service.client() as client:
        assert client.get_job(job_id).state == "cancelled"


def test_bad_request_is_a_llama_stack_error_and_nothing_reaches_the_service(stack, service):
    request = sft_request("remote-qat", "adds")
    request["algorithm_config"] = {"type": "QAT", "quantizer_name": "int8", "group_size": 32}
    answer = stack.call("sft", **request)
    assert answer["error"]["status"] == 400 and "QAT" in answer["error"]["message"]
    with service.client() as client:
        assert "remote-qat" not in {job.name for job in client.list_jobs(limit=500).jobs}
    assert stack.alive()


def test_a_llama_stack_restart_loses_nothing(stack, remote_sft):
    before = stack.call("list")
    assert {"job_uuid": "remote-sft"} in before
    stack.stop()
    stack.start()
    assert stack.call("list") == before
    assert stack.status("remote-sft")["status"] == "completed"
