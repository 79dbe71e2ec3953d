"""Kubeflow Pipelines: the pipeline built from a JobSpec, compiled to IR YAML, run end to end with kfp.local,
submitted to a KFP host, and reached from the service's KFP launcher and the Llama Stack inline provider.

What cannot exist here is replaced, and only that: a Kubeflow cluster (its REST API is a loopback fake that
records what the real kfp.Client sends) and S3 (a loopback stub that stores what boto3 uploads). Everything
that runs a pipeline runs it for real, with kfp.local's SubprocessRunner on the tiny model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import uvicorn
import yaml
from fastapi import FastAPI, Request, Response
from ports import free_port
from waiting import wait_for

from posttrain.job.directory import JobDir
from posttrain.spec import spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
POSTTRAIN = [sys.executable, "-m", "posttrain.cli"]
ALPACA = ROOT / "posttrain" / "assets" / "alpaca.jsonl"


def posttrain(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*POSTTRAIN, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", **(env or {})})


def write_config(folder: Path, spec: dict, name: str = "job.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def small_data(tmp_path) -> Path:
    """16 alpaca rows in a local file: the data a user points the pipeline at."""
    path = tmp_path / "data" / "rows.jsonl"
    path.parent.mkdir()
    path.write_text("".join(ALPACA.read_text().splitlines(keepends=True)[:16]))
    return path


def tiny_spec(make_spec, data: Path, **sections) -> dict:
    spec = make_spec(name="kfp-tiny", data={"source": str(data)},
                     training={"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 2,
                               "learning_rate": 1e-3})
    spec.update(sections)
    return spec


# -- compile ---------------------------------------------------------------------------------------------

def compiled(tmp_path: Path, spec: dict, *overrides: str, env: dict[str, str] | None = None) -> dict:
    config = write_config(tmp_path, spec)
    proc = posttrain("kfp", "compile", str(config), *overrides, "-o", str(tmp_path / "pipeline.yaml"), cwd=tmp_path,
                     env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return yaml.safe_load((tmp_path / "pipeline.yaml").read_text())


def executor(ir: dict, step: str) -> dict:
    return ir["deploymentSpec"]["executors"][f"exec-{step}"]["container"]


def test_compiled_pipeline_has_prepare_train_export_with_dataset_and_model_artifacts(tmp_path, make_spec, small_data):
    ir = compiled(tmp_path, tiny_spec(make_spec, small_data))
    assert ir["pipelineInfo"]["name"] == "posttrain-kfp-tiny"
    assert set(ir["components"]) == {"comp-prepare-data", "comp-train", "comp-export"}
    outputs = {name: {key: value["artifactType"]["schemaTitle"] for key, value in
                      component["outputDefinitions"]["artifacts"].items()}
               for name, component in ir["components"].items()}
    assert outputs == {"comp-prepare-data": {"dataset": "system.Dataset"}, "comp-train": {"job": "system.Artifact"},
                       "comp-export": {"model": "system.Model"}}
    tasks = ir["root"]["dag"]["tasks"]
    assert tasks["train"]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"] == {
        "producerTask": "prepare-data", "outputArtifactKey": "dataset"}
    assert tasks["export"]["inputs"]["artifacts"]["job"]["taskOutputArtifact"]["producerTask"] == "train"
    assert ir["root"]["outputDefinitions"]["artifacts"]["Output"]["artifactType"]["schemaTitle"] == "system.Model"
    # The JobSpec is the pipeline's parameter, whole: the steps run exactly this spec.
    default = ir["root"]["inputDefinitions"]["parameters"]["spec_json"]["defaultValue"]
    assert spec_from_dict(json.loads(default)).data.source == str(small_data)
    for step in ("prepare-data", "train", "export"):
        container = executor(ir, step)
        assert container["image"] == "python:3.11"
        assert "posttrain.kfp.steps" in container["args"][-1] or "posttrain.kfp.steps" in " ".join(container["command"])
        assert "resources" not in container  # no GPU asked for
    assert not any(task.get("cachingOptions", {}).get("enableCache") for task in tasks.values())


def test_use_gpu_requests_gpus_on_the_train_step_only_with_packages_and_image(tmp_path, make_spec, small_data):
    ir = compiled(tmp_path, tiny_spec(make_spec, small_data), "distributed.kfp.use_gpu=true",
                  "distributed.kfp.gpu_count=2", "distributed.kfp.base_image=quay.io/acme/trainer:1",
                  'distributed.kfp.packages_to_install=["posttrain==0.1.0", "bitsandbytes>=0.45"]')
    train = executor(ir, "train")
    accelerator = train["resources"]["accelerator"]  # kfp 2.17 writes both the old and the new field names
    assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("nvidia.com/gpu", "2")
    assert {"name": "USE_GPU", "value": "true"} in train["env"]
    for step in ("prepare-data", "export"):
        assert "resources" not in executor(ir, step) and "env" not in executor(ir, step)
    for step in ("prepare-data", "train", "export"):
        container = executor(ir, step)
        assert container["image"] == "quay.io/acme/trainer:1"
        install = " ".join(container["command"])
        assert "pip install" in install and "'posttrain==0.1.0' 'bitsandbytes>=0.45'" in install


def test_the_use_gpu_variable_asks_for_a_gpu_as_in_the_seed(tmp_path, make_spec, small_data):
    ir = compiled(tmp_path, tiny_spec(make_spec, small_data), env={"USE_GPU": "True"})
    accelerator = executor(ir, "train")["resources"]["accelerator"]
    assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("nvidia.com/gpu", "1")


def test_compile_warns_when_no_image_or_package_brings_posttrain(tmp_path, make_spec, small_data):
    config = write_config(tmp_path, tiny_spec(make_spec, small_data))
    proc = posttrain("kfp", "compile", str(config), "-o", str(tmp_path / "p.yaml"), cwd=tmp_path)
    assert proc.returncode == 0 and "packages_to_install does not name posttrain" in proc.stderr


def test_compile_reports_a_bad_key_with_the_closest_one(tmp_path, make_spec, small_data):
    config = write_config(tmp_path, tiny_spec(make_spec, small_data))
    proc = posttrain("kfp", "compile", str(config), "distributed.kfp.use_gpus=true", cwd=tmp_path)
    assert proc.returncode == 2 and "use_gpu" in proc.stderr and "Traceback" not in proc.stderr


# -- run here (kfp.local) --------------------------------------------------------------------------------

def test_local_run_trains_the_tiny_model_and_exports_a_loadable_model(tmp_path, make_spec, small_data):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    config = write_config(tmp_path, tiny_spec(make_spec, small_data))
    proc = posttrain("kfp", "run", str(config), "--local", "-o", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    job = JobDir(tmp_path / "run")
    status = job.read_status()
    assert status.state == "succeeded" and status.step == 2
    assert [record["step"] for record in job.read_metrics() if "loss" in record] == [1, 2]
    assert (job.final_dir / "adapter_config.json").is_file() and job.checkpoints()
    # The Model artifact is the export step's output under the job's kfp/ folder, with its metadata.
    model_dir = Path(proc.stderr.split("model artifact:")[1].split()[0])
    assert model_dir.is_relative_to(job.root / "kfp") and model_dir.name == "model"
    model = AutoPeftModelForCausalLM.from_pretrained(model_dir)
    ids = AutoTokenizer.from_pretrained(model_dir)("Hello", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=2, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 2
    prepared = next((job.root / "kfp").rglob("dataset/train.jsonl"))
    assert len(prepared.read_text().splitlines()) == 16
    # The same directory again is refused, as `posttrain train` refuses it.
    again = posttrain("kfp", "run", str(config), "--local", "-o", str(tmp_path / "run"), cwd=tmp_path)
    assert again.returncode == 2 and "already holds a run" in again.stderr


def test_bad_rows_fail_the_prepare_step_and_nothing_trains(tmp_path, make_spec, small_data):
    small_data.write_text(small_data.read_text() + '{"instruction": "no output here"}\n')
    config = write_config(tmp_path, tiny_spec(make_spec, small_data))
    # `posttrain train` with distributed.launcher=kfp runs the pipeline too: the error is its first step's.
    proc = posttrain("train", str(config), "distributed.launcher=kfp", "-o", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2 and "prepare-data:" in proc.stderr, proc.stderr[-3000:]
    status = JobDir(tmp_path / "run").read_status()
    assert status.state == "failed" and status.error.startswith("prepare-data:") and "row 17" in status.error
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_export_checks_final_and_copies_a_full_model_or_fails_naming_the_step(tmp_path, tiny_model_dir):
    from posttrain.kfp.steps import StepFailed, export_model

    job = JobDir(tmp_path / "job").create()
    with pytest.raises(StepFailed, match="the train step wrote no model"):
        export_model(str(job.root), str(tmp_path / "model"), record_in=str(job.root))
    assert job.read_status().state == "failed" and job.read_status().error.startswith("export: ")
    shutil.copytree(tiny_model_dir, job.final_dir)  # a full model (no adapter), as peft.type=none leaves
    metadata = export_model(str(job.root), str(tmp_path / "model"))
    assert metadata["kind"] == "model" and (tmp_path / "model" / "config.json").is_file()


# -- submit to a KFP host (fake API + S3 stub on loopback) ------------------------------------------------

@pytest.fixture
def fake_cluster():
    """A loopback stand-in for a KFP API server and an S3-compatible store: they record what they are sent
    (a real cluster cannot run here). Yields (url, state)."""
    state: dict = {"objects": {}, "experiments": [], "runs": []}
    app = FastAPI()

    @app.get("/apis/v2beta1/healthz")
    def healthz():
        return {"multi_user": False}

    @app.get("/apis/v2beta1/experiments")
    def list_experiments(filter: str = ""):
        wanted = json.loads(filter)["predicates"][0]["stringValue"] if filter else None
        return {"experiments": [e for e in state["experiments"] if wanted in (None, e["display_name"])]}

    @app.post("/apis/v2beta1/experiments")
    async def create_experiment(request: Request):
        experiment = {**await request.json(), "experiment_id": f"exp-{len(state['experiments']) + 1}"}
        state["experiments"].append(experiment)
        return experiment

    @app.post("/apis/v2beta1/runs")
    async def create_run(request: Request):
        if state.get("reject"):
            return Response(json.dumps({"error": state["reject"], "code": 3}), status_code=400,
                            media_type="application/json")
        run = {**await request.json(), "run_id": f"run-{len(state['runs']) + 1}", "state": "PENDING"}
        state["runs"].append(run)
        return run

    @app.put("/{bucket}/{key:path}")
    async def put_object(bucket: str, key: str, request: Request):
        state["objects"][f"s3://{bucket}/{key}"] = await request.body()
        return Response(headers={"ETag": '"0"'})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "the fake cluster to listen")
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(10)


def s3_env(url: str, tmp_path: Path) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
            "HOME": str(tmp_path)}  # no kfp context file of this machine's user


def test_remote_run_uploads_the_data_and_submits_the_pipeline_with_s3_outputs(tmp_path, make_spec, small_data,
                                                                               fake_cluster):
    url, state = fake_cluster
    config = write_config(tmp_path, tiny_spec(make_spec, small_data))
    proc = posttrain("kfp", "run", str(config), "--host", url, "--s3-bucket", "my-bucket",
                     f"distributed.kfp.s3_endpoint_url={url}", "distributed.kfp.experiment=posttrain-tests",
                     "distributed.kfp.use_gpu=true", cwd=tmp_path, env=s3_env(url, tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [(uri, body)] = state["objects"].items()
    assert uri.startswith("s3://my-bucket/posttrain/") and uri.endswith("/data/train.jsonl")
    assert body == small_data.read_bytes()
    assert [e["display_name"] for e in state["experiments"]] == ["posttrain-tests"]
    [run] = state["runs"]
    assert run["experiment_id"] == "exp-1" and "run-1" in proc.stderr
    root = uri.removesuffix("/data/train.jsonl")
    assert run["runtime_config"]["pipeline_root"] == root
    spec = run["pipeline_spec"]
    importer = spec["deploymentSpec"]["executors"]["exec-importer"]["importer"]
    assert importer["artifactUri"]["constant"] == f"{root}/data"  # the uploaded folder, imported as the Dataset
    assert importer["typeSchema"]["schemaTitle"] == "system.Dataset"
    assert spec["root"]["dag"]["tasks"]["prepare-uploaded-data"]["inputs"]["artifacts"]["uploaded"][
        "taskOutputArtifact"]["producerTask"] == "importer"
    assert "comp-prepare-uploaded-data" in spec["components"]
    sent = json.loads(spec["root"]["inputDefinitions"]["parameters"]["spec_json"]["defaultValue"])
    assert sent["data"]["source"] == "train.jsonl"  # relative to the imported folder
    train = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert train["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"


def test_remote_run_errors_name_what_is_missing(tmp_path, make_spec, small_data, fake_cluster):
    url, state = fake_cluster
    config = write_config(tmp_path, tiny_spec(make_spec, small_data))
    env = {**s3_env(url, tmp_path), "KFP_HOST": "", "KFP_S3_BUCKET": ""}
    no_host = posttrain("kfp", "run", str(config), cwd=tmp_path, env=env)
    assert no_host.returncode == 2 and "no Kubeflow Pipelines host" in no_host.stderr and "--local" in no_host.stderr
    no_bucket = posttrain("kfp", "run", str(config), "--host", url, cwd=tmp_path, env=env)
    assert no_bucket.returncode == 2 and "distributed.kfp.s3_bucket" in no_bucket.stderr
    assert str(small_data) in no_bucket.stderr
    bucket_from_env = posttrain("kfp", "run", str(config), "--host", url, f"distributed.kfp.s3_endpoint_url={url}",
                                cwd=tmp_path, env={**env, "KFP_S3_BUCKET": "env-bucket"})
    assert bucket_from_env.returncode == 0, bucket_from_env.stderr
    assert next(iter(state["objects"])).startswith("s3://env-bucket/")
    down = posttrain("kfp", "run", str(config), "--host", f"http://127.0.0.1:{free_port()}", "--s3-bucket", "b",
                     f"distributed.kfp.s3_endpoint_url={url}", cwd=tmp_path, env=env)
    assert down.returncode == 2 and "could not reach the KFP host" in down.stderr and "Traceback" not in down.stderr
    # A bundled (or hub) dataset is read by the step itself: nothing to upload, so no bucket is needed.
    bundled = posttrain("kfp", "run", str(config), "--host", url, "data.source=posttrain:alpaca", cwd=tmp_path,
                        env=env)
    assert bundled.returncode == 0, bundled.stderr
    assert len(state["objects"]) == 1 and "pipeline_root" not in state["runs"][-1]["runtime_config"]
    assert "comp-prepare-data" in state["runs"][-1]["pipeline_spec"]["components"]
    state["reject"] = "Invalid input error: pipeline spec is invalid"
    refused = posttrain("kfp", "run", str(config), "--host", url, "data.source=posttrain:alpaca", cwd=tmp_path,
                        env=env)
    assert refused.returncode == 2 and "did not accept the run" in refused.stderr
    assert "pipeline spec is invalid" in refused.stderr and "Traceback" not in refused.stderr
    mixed = posttrain("kfp", "run", str(config), "--local", "--host", url, cwd=tmp_path, env=env)
    assert mixed.returncode == 2 and "--local runs here" in mixed.stderr


def test_a_missing_kfp_is_a_clear_error(monkeypatch):
    from posttrain.errors import PosttrainError
    from posttrain.kfp.pipeline import require_kfp

    monkeypatch.setitem(sys.modules, "kfp", None)  # what `import kfp` meets where it is not installed
    with pytest.raises(PosttrainError, match=r"pip install 'posttrain\[kfp\]'"):
        require_kfp()


# -- the service's KFP launcher and the Llama Stack provider ---------------------------------------------
# (a service job through a real server, and its cancel: tests/service/test_kfp_jobs.py)

def test_kfp_launcher_pause_checkpoints_and_resume_finishes_the_run(tmp_path, make_spec, small_data):
    from posttrain.job.result import EXIT_PAUSED
    from posttrain.job.signals import PAUSE_SIGNAL
    from posttrain.launchers import LaunchRequest
    from posttrain.launchers.kfp import KFPLauncher

    spec = tiny_spec(make_spec, small_data, distributed={"launcher": "kfp"})
    spec["training"].update(max_steps=40, save_steps=1000)
    job = JobDir(tmp_path / "job").create()
    job.write_spec(json.dumps(spec_from_dict(spec).model_dump(mode="json")))
    launcher = KFPLauncher(sys.executable)
    env = {"OMP_NUM_THREADS": "1"}
    handle = launcher.launch(LaunchRequest("job-1", job.root, env=env))
    try:
        wait_for(lambda: (job.read_status() and job.read_status().step >= 1) or handle.poll(), 300,
                 "the train step to log a step")
        handle.signal_main(PAUSE_SIGNAL)  # what the scheduler sends to pause: to the driver only
        paused = wait_for(handle.poll, 120, "the pipeline to pause")
    finally:
        handle.signal(signal.SIGKILL)
    assert paused.code == EXIT_PAUSED, job.log_path.read_text()[-3000:]
    assert job.read_status().state == "paused" and job.latest_checkpoint() is not None
    paused_at = job.checkpoint_step(job.latest_checkpoint())
    resumed = launcher.launch(LaunchRequest("job-1", job.root, resume=True, env=env))
    try:
        assert wait_for(resumed.poll, 300, "the resumed pipeline to finish").code == 0, job.log_path.read_text()[-3000:]
    finally:
        resumed.signal(signal.SIGKILL)
    status = job.read_status()
    assert status.state == "succeeded" and status.step == 40 and job.final_dir.is_dir()
    assert f"resuming from {job.checkpoints_dir / f'checkpoint-{paused_at}'}" in job.log_path.read_text()


def test_llama_stack_inline_provider_with_launcher_kfp_runs_the_pipeline(tmp_path, make_spec, small_data):
    from posttrain.llama_stack.config import InlineProviderConfig
    from posttrain.llama_stack.jobs import LocalJobs
    from posttrain.llama_stack.mapping import job_spec

    request = {
        "job_uuid": "kfp-job", "model": "posttrain:tiny", "checkpoint_dir": None, "hyperparam_search_config": {},
        "logger_config": {}, "algorithm_config": {"type": "LoRA", "lora_attn_modules": ["q_proj", "v_proj"],
                                                  "apply_lora_to_mlp": False, "apply_lora_to_output": False,
                                                  "rank": 4, "alpha": 8},
        "training_config": {"n_epochs": 1, "max_steps_per_epoch": 2, "gradient_accumulation_steps": 1,
                            "data_config": {"dataset_id": "d", "batch_size": 4, "shuffle": True,
                                            "data_format": "instruct"}},
    }
    config = InlineProviderConfig(data_dir=str(tmp_path / "ls"), worker_python=sys.executable, launcher="kfp",
                                  device="cpu", validation_split=0)
    spec = job_spec("sft", request, config, data_source="placeholder", validation_source=None)
    rows = [json.loads(line) for line in small_data.read_text().splitlines()]
    jobs = LocalJobs(config)
    try:
        job = jobs.submit(spec, rows, None)
        done = wait_for(lambda: (info := jobs.find("kfp-job")) and info.state in ("succeeded", "failed") and info,
                        600, "the Llama Stack job to finish")
        job_dir = Path(jobs.location(job.id, ""))
        assert done.state == "succeeded", (job_dir / "worker.log").read_text()[-3000:]
        assert jobs.describe(done)["launcher"] == "kfp"
        assert json.loads((job_dir / "spec.json").read_text())["distributed"]["launcher"] == "kfp"
        assert next((job_dir / "kfp").rglob("model/adapter_config.json"))  # the pipeline's Model artifact
        assert [a.path for a in jobs.artifacts(job.id).artifacts if a.path.startswith("final/")]
        assert jobs.metrics(job.id)
    finally:
        jobs.close()
    shutil.rmtree(tmp_path / "ls", ignore_errors=True)
