"""The OpenAI fine-tuning door, driven by OpenAI's own Python SDK against a real keyed server: only
``base_url`` and ``api_key`` differ from code written for OpenAI."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from service_harness import ServerProcess, module_server, write_key_file
from waiting import wait_for

KEY = "pt-openai-door-key"
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    # Keyed and without --allow-user-code: python graders must be refused here.
    keys = write_key_file(tmp_path_factory.mktemp("openai-keys") / "keys.txt", [f"{KEY} team"])
    yield from module_server(request, tmp_path_factory, "--api-key-file", str(keys), "--slots", "1",
                             "--cancel-grace", "5", api_key=KEY)


@pytest.fixture(scope="module")
def client(server: ServerProcess):
    # No retries: a test asserting an error wants the first answer.
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60) as sdk:
        yield sdk


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat_rows(count: int) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "You add numbers."},
                          {"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": str(2 * i)}]} for i in range(count)]


def preference_rows(count: int) -> list[dict]:
    return [{"input": {"messages": [{"role": "user", "content": f"Say {i} politely."}]},
             "preferred_output": [{"role": "assistant", "content": f"Certainly: {i}."}],
             "non_preferred_output": [{"role": "assistant", "content": f"{i}, whatever."}]} for i in range(count)]


def upload(client: openai.OpenAI, path: Path):
    with open(path, "rb") as handle:
        return client.files.create(file=handle, purpose="fine-tune")


def wait_until_done(client: openai.OpenAI, job_id: str, timeout: float = 300):
    return wait_for(lambda: (job := client.fine_tuning.jobs.retrieve(job_id)).status in TERMINAL and job,
                    timeout, f"fine-tuning job {job_id} to finish", interval=0.5)


def test_files_are_openai_shaped_and_keep_their_posttrain_fields(client: openai.OpenAI, server: ServerProcess,
                                                                 tmp_path: Path):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(4))
    created = upload(client, path)
    assert created.object == "file" and created.purpose == "fine-tune" and created.status == "processed"
    assert created.bytes == path.stat().st_size and created.filename == "chat.jsonl"
    assert created.id in [f.id for f in client.files.list()]
    assert client.files.retrieve(created.id).bytes == created.bytes
    assert client.files.content(created.id).read() == path.read_bytes()
    with server.client() as native:  # posttrain's client reads the same upload
        assert native.get_file(created.id).source == f"upload:{created.id}"
        assert created.id in [f.id for f in native.list_files().data]

    other = upload(client, write_jsonl(tmp_path / "more.jsonl", chat_rows(2)))
    paged = client.files.list(limit=1)
    assert len(paged.data) == 1 and paged.has_more
    second = paged.get_next_page()
    assert second.data and second.data[0].id != paged.data[0].id
    assert {paged.data[0].id, second.data[0].id} >= {created.id, other.id}
    fine_tune_files = client.files.list(purpose="fine-tune", limit=1).data
    assert fine_tune_files and all(f.purpose == "fine-tune" for f in fine_tune_files)
    assert not client.files.list(purpose="batch").data
    with pytest.raises(openai.BadRequestError):  # OpenAI's 400, not FastAPI's 422
        client.files.list(limit=0)

    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)


def test_a_bad_line_is_a_bad_request_naming_its_line(client: openai.OpenAI, tmp_path: Path):
    rows = [json.dumps(row) for row in chat_rows(3)]
    rows[1] = json.dumps({"messages": [{"role": "user"}]})  # line 2: a message without content
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(openai.BadRequestError) as caught:
        upload(client, path)
    assert caught.value.param == "file" and "line 2" in caught.value.message and "content" in caught.value.message

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(chat_rows(1)[0]) + "\n{not json\n")
    with pytest.raises(openai.BadRequestError, match="line 2"):
        upload(client, broken)


def test_supervised_job_runs_to_success_with_events_and_checkpoints(client: openai.OpenAI, server: ServerProcess,
                                                                    tmp_path: Path):
    training = upload(client, write_jsonl(tmp_path / "train.jsonl", chat_rows(8)))
    validation = upload(client, write_jsonl(tmp_path / "valid.jsonl", chat_rows(2)))
    job = client.fine_tuning.jobs.create(
        model="posttrain:tiny", training_file=training.id, validation_file=validation.id, suffix="adder", seed=7,
        metadata={"team": "math"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4, "n_epochs": 2}}},
    )
    assert job.object == "fine_tuning.job" and job.status in ("queued", "running")
    assert (job.model, job.training_file, job.validation_file, job.seed) == ("posttrain:tiny", training.id,
                                                                              validation.id, 7)
    # "auto" is resolved and reported back.
    assert job.method.supervised.hyperparameters.learning_rate_multiplier == 1.0
    assert job.method.supervised.hyperparameters.batch_size == 4 and job.metadata == {"team": "math"}

    # The same job through the native API: one job system.
    with server.client() as native:
        assert job.id in [j.id for j in native.list_jobs().jobs]
        assert native.get_job(job.id).method == "sft"

    job = wait_until_done(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:posttrain:tiny:team:adder:{job.id}"
    assert job.trained_tokens and job.trained_tokens > 0 and job.finished_at >= job.created_at
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=100)]
    results, = job.result_files
    assert client.files.retrieve(results).purpose == "fine-tune-results"
    table = client.files.content(results).text.splitlines()
    assert table[0] == "step,train_loss,train_mean_token_accuracy,valid_loss,valid_mean_token_accuracy"
    assert [line.split(",")[0] for line in table[1:5]] == ["1", "2", "3", "4"]

    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    assert events[0].message == "The job has successfully completed"
    assert events[-1].message == f"Created fine-tuning job: {job.id}"
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and all("step" in e.data for e in metrics) and any("train_loss" in e.data for e in metrics)
    first_page = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert first_page.has_more and [e.id for e in first_page.data] == [e.id for e in events[:2]]
    assert first_page.get_next_page().data[0].id == events[2].id

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [4, 2]  # newest first: one per epoch of 2 steps
    assert checkpoints[0].metrics.step == 4 and checkpoints[0].metrics.train_loss is not None
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-4"
    # The validation file, scored after the last step: valid_* on its checkpoint and in a metrics event, and
    # full_valid_* (every validation row) as OpenAI reports them at the end.
    last = checkpoints[0].metrics
    assert last.valid_loss > 0 and 0 <= last.valid_mean_token_accuracy <= 1
    assert last.full_valid_loss == last.valid_loss and last.full_valid_mean_token_accuracy is not None
    assert checkpoints[1].metrics.valid_loss is None  # no evaluation at step 2 (every 10 steps, and the end)
    validation = [e.data for e in metrics if "valid_loss" in e.data]
    assert [d["step"] for d in validation] == [4] and validation[0]["full_valid_loss"] == last.valid_loss


def test_dpo_job_on_openai_preference_rows_runs_to_success(client: openai.OpenAI, tmp_path: Path):
    training = upload(client, write_jsonl(tmp_path / "prefs.jsonl", preference_rows(8)))
    job = client.fine_tuning.jobs.create(
        model="posttrain:tiny", training_file=training.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "batch_size": 4}}},
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    assert job.method.dpo.hyperparameters.n_epochs == 1  # auto
    job = wait_until_done(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.endswith(job.id)


def test_reinforcement_job_with_a_string_check_grader_runs_to_completion(client: openai.OpenAI, tmp_path: Path):
    rows = [{"messages": [{"role": "user", "content": f"Reply with the word {word}."}], "word": word}
            for word in ("red", "blue", "green", "gold")]
    training = upload(client, write_jsonl(tmp_path / "prompts.jsonl", rows))
    validation = upload(client, write_jsonl(tmp_path / "held-out.jsonl", rows[:3]))
    grader = {"type": "string_check", "name": "says_word", "input": "{{sample.output_text}}",
              "reference": "{{item.word}}", "operation": "ilike"}
    job = client.fine_tuning.jobs.create(
        model="posttrain:tiny", training_file=training.id, validation_file=validation.id,
        method={"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": {
            "eval_interval": 1, "eval_samples": 2}}},
    )
    assert job.method.reinforcement.grader.name == "says_word"
    assert job.method.reinforcement.hyperparameters.compute_multiplier == 1.0
    job = wait_until_done(client, job.id)
    assert job.status == "succeeded", job.error
    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    rewards = [e.data for e in events if e.type == "metrics" and "reward" in e.data]
    assert rewards and all(0.0 <= r["reward"] <= 1.0 for r in rewards)
    # eval_interval=1: the grader scores eval_samples=2 answers to the validation file after every step.
    graded = sorted((e.data for e in events if e.type == "metrics" and "valid_says_word" in e.data),
                    key=lambda data: data["step"])
    assert [d["step"] for d in graded] == [r["step"] for r in sorted(rewards, key=lambda data: data["step"])]
    assert all(0.0 <= d["valid_says_word"] <= 1.0 for d in graded) and "full_valid_says_word" in graded[-1]


def test_a_bad_line_past_the_submit_time_sample_fails_the_job_naming_it(client: openai.OpenAI,
                                                                       server: ServerProcess, tmp_path: Path):
    lines = [json.dumps(row) for row in chat_rows(2100)]
    lines[2049] = json.dumps({"messages": [{"role": "user", "content": "No answer here."}]})  # line 2050
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with server.client() as native:  # uploaded without a purpose: no line check at upload
        big = native.upload(path)
    job = client.fine_tuning.jobs.create(model="posttrain:tiny", training_file=big.id,
                                         method={"type": "supervised", "supervised": {"hyperparameters": {
                                             "batch_size": 64}}})
    job = wait_until_done(client, job.id)
    assert job.status == "failed" and job.error.param == "training_file"
    assert job.error.code == "invalid_training_file" and "row 2050" in job.error.message
    assert f"{big.id} (big.jsonl)" in job.error.message and "/files/" not in job.error.message


def test_refusals_raise_the_sdks_own_exceptions(client: openai.OpenAI, tmp_path: Path):
    chat = upload(client, write_jsonl(tmp_path / "chat.jsonl", chat_rows(4)))
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=chat.id)
    assert caught.value.param == "model" and caught.value.code == "model_not_available"

    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("job-000000000000")
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.cancel("no-such-job")

    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="posttrain:tiny", training_file="file-missing")
    assert caught.value.param == "training_file"

    # A chat file cannot train DPO: the format check names the file by id, never by its server path.
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="posttrain:tiny", training_file=chat.id, method={"type": "dpo"})
    assert caught.value.param == "training_file" and chat.id in caught.value.message
    assert "/files/" not in caught.value.message

    python = {"type": "python", "name": "mine", "source": "def grade(sample, item):\n    return 1.0\n"}
    with pytest.raises(openai.PermissionDeniedError, match="allow-user-code"):
        client.fine_tuning.jobs.create(model="posttrain:tiny", training_file=chat.id,
                                       method={"type": "reinforcement", "reinforcement": {"grader": python}})
    judge = {"type": "score_model", "name": "judge", "input": [], "model": "gpt-4o"}
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.fine_tuning.jobs.create(model="posttrain:tiny", training_file=chat.id,
                                       method={"type": "reinforcement", "reinforcement": {"grader": judge}})
    with pytest.raises(openai.BadRequestError, match=r"method\.dpo is given but method\.type is 'supervised'"):
        client.fine_tuning.jobs.create(model="posttrain:tiny", training_file=chat.id,
                                       method={"type": "supervised", "dpo": {}})
    with pytest.raises(openai.BadRequestError, match="by metadata is not supported"):
        client.fine_tuning.jobs.list(metadata={"team": "math"})
    with pytest.raises(openai.BadRequestError, match="hyperparameters"):
        client.fine_tuning.jobs.create(model="posttrain:tiny", training_file=chat.id,
                                       method={"type": "supervised",
                                               "supervised": {"hyperparameters": {"n_epochs": 0}}})


def test_cancel_a_queued_or_running_job(client: openai.OpenAI, server: ServerProcess, tmp_path: Path):
    training = upload(client, write_jsonl(tmp_path / "long.jsonl", chat_rows(64)))
    job = client.fine_tuning.jobs.create(
        model="posttrain:tiny", training_file=training.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 1, "n_epochs": 50}}},
    )
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.id == job.id
    job = wait_until_done(client, job.id, timeout=120)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    with server.client() as native:
        assert native.get_job(job.id).state == "cancelled"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)


def test_pause_and_resume_a_running_job(client: openai.OpenAI, server: ServerProcess, tmp_path: Path):
    training = upload(client, write_jsonl(tmp_path / "pause.jsonl", chat_rows(16)))
    job = client.fine_tuning.jobs.create(
        model="posttrain:tiny", training_file=training.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 1, "n_epochs": 25}}},
    )
    with server.client() as native:
        wait_for(lambda: native.get_job(job.id).step >= 3, 180, "the job to take a few steps", interval=0.2)
        paused = client.fine_tuning.jobs.pause(job.id)
        assert paused.id == job.id and paused.status in ("running", "paused")
        job = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status == "paused" and j, 120,
                       "the job to pause", interval=0.3)
        at_pause = native.get_job(job.id)
        assert at_pause.state == "paused" and 3 <= at_pause.step < at_pause.total_steps
        # It stopped with a checkpoint of the very step it paused at.
        assert client.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number == at_pause.step
        with pytest.raises(openai.ConflictError):
            client.fine_tuning.jobs.pause(job.id)
        assert client.fine_tuning.jobs.resume(job.id).status == "queued"
        job = wait_until_done(client, job.id)
        assert job.status == "succeeded", job.error
        final = native.get_job(job.id)
        assert final.step == final.total_steps == 16 * 25
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.resume(job.id)


def test_native_errors_carry_openais_error_object_beside_detail_and_type(server: ServerProcess):
    headers = {"Authorization": f"Bearer {KEY}"}
    response = httpx.post(f"{server.url}/v1/jobs", json={"spec": {"training": {"max_steps": "many"}}},
                          headers=headers)
    body = response.json()
    assert response.status_code == 422 and body["type"] == "ConfigError" and "max_steps" in body["detail"]
    assert body["error"] == {"message": body["detail"], "type": "invalid_request_error",
                             "param": "training.max_steps", "code": None}
    missing = httpx.get(f"{server.url}/v1/jobs/job-000000000000", headers=headers).json()
    assert missing["error"]["type"] == "not_found_error" and missing["detail"] == missing["error"]["message"]


def test_a_wrong_key_gets_the_sdks_permission_denied_error(server: ServerProcess):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-a-key", max_retries=0) as stranger, \
            pytest.raises(openai.PermissionDeniedError):
        stranger.fine_tuning.jobs.list()
