"""torchrun runs as a user starts them: `posttrain train ... distributed.launcher=torchrun`, real ranks on CPU
(gloo) training the tiny model; DDP and FSDP2 against one process, sharded checkpoints through a SIGKILL,
resume on fewer ranks, two "nodes" on loopback; and the torchrun command for layouts we cannot start here."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml
from waiting import wait_for

from posttrain.distributed.checkpoint import DCP_DIR
from posttrain.distributed.layout import check_parallel_sizes
from posttrain.errors import ConfigError, UnsupportedError
from posttrain.job.directory import JobDir
from posttrain.launchers.torchrun import torchrun_command
from posttrain.ports import free_port
from posttrain.spec import JobSpec, spec_from_dict

RUN_TIMEOUT_S = 600


def write_config(tmp_path: Path, make_spec, **training) -> Path:
    """Full fine-tuning without dropout and in dataset order, so one process and two ranks see the same rows."""
    spec = make_spec(peft={"type": "none"}, training={"group_by_length": False, "per_device_train_batch_size": 4,
                                                       "max_steps": 3, "save_steps": 2, **training})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def posttrain_train(config: Path, job_dir: Path, *overrides: str, resume: bool = False,
                    wait: bool = True) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "posttrain.cli", "train", str(config), *overrides, "-o", str(job_dir)]
    process = subprocess.Popen([*argv, *(["--resume"] if resume else [])], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               start_new_session=True)
    if wait:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
        assert process.returncode == 0, output
    return process


def losses(job_dir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in JobDir(job_dir).read_metrics() if "loss" in record}


def pieces_per_tensor(checkpoint: Path) -> dict[str, int]:
    """How many shards DCP stored for each model tensor (files say nothing: every rank writes one)."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(checkpoint / DCP_DIR)).read_metadata()
    return {key: len(meta.chunks) for key, meta in metadata.state_dict_metadata.items()
            if key.startswith("model.") and hasattr(meta, "chunks")}


def test_ddp_and_fsdp_on_two_ranks_match_one_process_and_fsdp_really_shards(tmp_path, make_spec):
    config = write_config(tmp_path, make_spec)
    posttrain_train(config, tmp_path / "single")
    two = ("distributed.launcher=torchrun", "distributed.nproc_per_node=2", "training.per_device_train_batch_size=2")
    posttrain_train(config, tmp_path / "ddp", *two, "distributed.strategy=ddp")
    posttrain_train(config, tmp_path / "fsdp", *two, "distributed.strategy=fsdp")

    single = losses(tmp_path / "single")
    assert sorted(single) == [1, 2, 3]
    for name in ("ddp", "fsdp"):  # same global batch of 4 rows per step: the same losses
        assert losses(tmp_path / name) == pytest.approx(single, rel=2e-3), name
        assert (tmp_path / name / "worker.rank1.log").is_file()  # every rank logs to the job directory

    # FSDP: each rank holds DTensor shards of every parameter, and each tensor is stored in two pieces.
    for log in ("worker.log", "worker.rank1.log"):
        text = (tmp_path / "fsdp" / log).read_text()
        assert "fsdp: 20 of 20 parameters are DTensors" in text, text
    fsdp_pieces = pieces_per_tensor(tmp_path / "fsdp" / "checkpoints" / "checkpoint-2")
    ddp_pieces = pieces_per_tensor(tmp_path / "ddp" / "checkpoints" / "checkpoint-2")
    assert fsdp_pieces and set(fsdp_pieces.values()) == {2}
    assert ddp_pieces.keys() == fsdp_pieces.keys() and set(ddp_pieces.values()) == {1}

    # final/ is an ordinary transformers folder: it loads without any process group.
    from posttrain.modeling import load_for_inference

    model, _ = load_for_inference(tmp_path / "fsdp" / "final")
    assert not any(type(param).__name__ == "DTensor" for param in model.parameters())


def test_fsdp_options_lora_bf16_offload_and_activation_checkpointing_train_and_export(tmp_path, make_spec):
    config = write_config(tmp_path, make_spec, max_steps=2, per_device_train_batch_size=2)
    job_dir = tmp_path / "job"
    posttrain_train(config, job_dir, "distributed.launcher=torchrun", "distributed.nproc_per_node=2",
                    "distributed.strategy=fsdp", "distributed.fsdp.sharding_strategy=shard_grad_op",
                    "distributed.mixed_precision=bf16", "distributed.fsdp.cpu_offload=true",
                    "distributed.fsdp.activation_checkpointing=true", "peft.type=lora")
    log = (job_dir / "worker.log").read_text()
    assert "shard_grad_op over mesh (2,), 2 layers + root, mixed_precision=bf16 cpu_offload=True " \
           "activation_checkpointing=True" in log
    assert "48 of 48 parameters are DTensors" in log  # the LoRA adapters are sharded with their layers
    assert all(loss > 0 for loss in losses(job_dir).values()) and sorted(losses(job_dir)) == [1, 2]
    assert (job_dir / "final" / "adapter_config.json").is_file()


def kill_tree(process: subprocess.Popen[str]) -> None:
    """SIGKILL the CLI, torchrun and every rank (each rank runs in a session of its own)."""
    root = psutil.Process(process.pid)
    for child in [root, *root.children(recursive=True)]:
        child.kill()
    process.wait()


def test_sharded_checkpoint_survives_sigkill_and_resumes_on_one_process(tmp_path, make_spec):
    config = write_config(tmp_path, make_spec, max_steps=30, save_steps=3, per_device_train_batch_size=2,
                          save_total_limit=3)
    job_dir = tmp_path / "job"
    job = JobDir(job_dir)
    fsdp_lora = ("distributed.launcher=torchrun", "distributed.nproc_per_node=2", "distributed.strategy=fsdp",
                 "peft.type=lora", "peft.dropout=0")
    process = posttrain_train(config, job_dir, *fsdp_lora, wait=False)
    try:
        wait_for(lambda: job.latest_checkpoint() is not None or process.poll() is not None, RUN_TIMEOUT_S,
                 "a complete sharded checkpoint")
        assert process.poll() is None, process.communicate()[0]
        kill_tree(process)
    finally:
        if process.poll() is None:
            kill_tree(process)
    killed_at = job.read_status().step
    checkpoint_step = JobDir.checkpoint_step(job.latest_checkpoint())
    assert 3 <= checkpoint_step < 30 and killed_at < 30
    assert json.loads((job.latest_checkpoint() / "trainer_state.json").read_text())["global_step"] == checkpoint_step

    posttrain_train(config, job_dir, *fsdp_lora, "distributed.nproc_per_node=1", resume=True)
    log = job.log_path.read_text()
    assert f"resuming from {job.latest_checkpoint().parent / f'checkpoint-{checkpoint_step}'}" in log
    assert "loaded the sharded checkpoint" in log
    status = job.read_status()
    assert status.state == "succeeded" and status.step == 30
    steps = [record["step"] for record in job.read_metrics() if "loss" in record]
    assert steps == list(range(1, 31))  # no gap, no step twice
    assert (job.final_dir / "adapter_config.json").is_file()


def test_ctrl_c_stops_every_rank_after_the_same_step(tmp_path, make_spec):
    config = write_config(tmp_path, make_spec, max_steps=400, save_steps=1000, per_device_train_batch_size=2)
    job = JobDir(tmp_path / "job")
    process = posttrain_train(config, job.root, "distributed.launcher=torchrun", "distributed.nproc_per_node=2",
                              wait=False)
    try:
        wait_for(lambda: (job.read_status() is not None and job.read_status().step >= 2) or process.poll() is not None,
                 RUN_TIMEOUT_S, "two steps")
        ranks = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGINT)  # what a Ctrl-C in the terminal delivers to the CLI
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            kill_tree(process)
    assert process.returncode == 143, output
    status = job.read_status()
    assert status.state == "cancelled" and 2 <= status.step < 400
    assert "stopping after the current step" in (job.root / "worker.rank1.log").read_text()
    assert not [rank for rank in ranks if rank.is_running() and rank.status() != psutil.STATUS_ZOMBIE]


def test_torchrun_nodes_meet_on_loopback_and_each_node_records_its_part(tmp_path, make_spec):
    """Three nodes, one rank each: node 0 (rank 0) and node 1 share a job directory, as machines on shared
    storage do; node 2 has one of its own, as a pod with a local disk (of the same name, as every node's is
    on a c10d run: it is the rendezvous id). Every node exits 0; each job directory says what it holds."""
    config = write_config(tmp_path, make_spec, max_steps=2, per_device_train_batch_size=2)
    endpoint = f"127.0.0.1:{free_port()}"
    shared, own = tmp_path / "shared" / "job", tmp_path / "own" / "job"
    nodes = [posttrain_train(config, job_dir, "distributed.launcher=torchrun", "distributed.nnodes=3",
                             f"distributed.node_rank={node_rank}", "distributed.nproc_per_node=1",
                             f"distributed.rdzv_endpoint={endpoint}", "distributed.strategy=fsdp",
                             "distributed.fsdp.sharding_strategy=hybrid_shard", wait=False)
             for node_rank, job_dir in enumerate([shared, shared, own])]
    outputs = [node.communicate(timeout=RUN_TIMEOUT_S)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0, 0], outputs

    # The shared directory is rank 0's: node 1 left its status alone.
    status = JobDir(shared).read_status()
    assert status.state == "succeeded" and status.step == 2 and status.node_rank is None
    assert "over mesh (3, 1)" in JobDir(shared).log_path.read_text()  # replicated across the nodes
    assert (shared / "final").is_dir() and (shared / "worker.rank1.log").is_file()

    # Node 2's own directory: which node it was, that its ranks did their part, where the results are.
    node = JobDir(own).read_status()
    assert node.state == "succeeded" and node.step == 2 and node.node_rank == 2
    assert node.rank0_job_dir == str(shared.resolve()) and node.rank0_host == socket.gethostname()
    assert spec_from_dict(JobDir(own).read_spec_dict()).distributed.nnodes == 3
    assert (own / "worker.rank2.log").is_file() and not (own / "final").exists()
    assert "2 of 3:" in outputs[2] and "succeeded" in outputs[2]


# -- the command and the checks, for layouts this machine cannot start -------------------------------


def spec_with(**distributed) -> JobSpec:
    return spec_from_dict({"distributed": {"launcher": "torchrun", **distributed}})


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_torchrun_command_for_one_node_many_nodes_and_pinned_node_ranks():
    worker = ["--spec", "s.json", "--job-dir", "job"]
    one = torchrun_command(spec_with(nproc_per_node=3, master_port=29511), worker, {}, python="py")
    assert one[:3] == ["py", "-m", "torch.distributed.run"] and one[-5:] == ["posttrain.worker", *worker]
    assert option(one, "--nproc-per-node") == "3" and option(one, "--master-port") == "29511"
    assert option(one, "--rdzv-backend") == "static" and option(one, "--master-addr") == "127.0.0.1"

    c10d = torchrun_command(spec_with(nnodes=2, rdzv_endpoint="10.0.0.1:29500", max_restarts=2), worker, {}, run_id="r")
    assert option(c10d, "--rdzv-backend") == "c10d" and option(c10d, "--rdzv-endpoint") == "10.0.0.1:29500"
    assert option(c10d, "--max-restarts") == "2" and option(c10d, "--rdzv-id") == "r" and "--node-rank" not in c10d

    # c10d would ignore a pinned node_rank: auto picks the static rendezvous, which honours it.
    pinned = torchrun_command(spec_with(nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500"), worker, {})
    assert option(pinned, "--rdzv-backend") == "static" and option(pinned, "--node-rank") == "1"
    assert option(pinned, "--master-addr") == "10.0.0.1" and option(pinned, "--master-port") == "29500"

    # nproc_per_node=auto follows the GPUs the scheduler assigned; no GPU means one CPU process.
    auto = spec_with()
    assert option(torchrun_command(auto, worker, {"CUDA_VISIBLE_DEVICES": "2,3"}), "--nproc-per-node") == "2"
    assert option(torchrun_command(auto, worker, {"CUDA_VISIBLE_DEVICES": ""}), "--nproc-per-node") == "1"

    with pytest.raises(ConfigError, match=r"distributed\.rdzv_endpoint"):
        torchrun_command(spec_with(nnodes=2), worker, {})


def test_parallel_sizes_that_cannot_run_are_clear_errors():
    assert check_parallel_sizes(spec_with().distributed, 4, "cpu") == 4
    with pytest.raises(UnsupportedError, match=r"tensor and context parallelism.*gloo"):
        check_parallel_sizes(spec_with(tensor_parallel_size=2).distributed, 2, "cpu")
    with pytest.raises(ConfigError, match="data_parallel_size 3 does not match the world size 2"):
        check_parallel_sizes(spec_with(data_parallel_size=3).distributed, 2, "cpu")


def test_qlora_with_fsdp_on_cpu_says_why_it_cannot_run():
    from posttrain.distributed.layout import check_fsdp_support

    spec = spec_from_dict({"peft": {"type": "qlora"}, "distributed": {"launcher": "torchrun", "strategy": "fsdp"}})
    with pytest.raises(UnsupportedError, match=r"QLoRA .* cannot run on CPU"):
        check_fsdp_support(spec, "cpu")



def test_a_torchrun_restart_after_a_pause_does_not_train_on(tmp_path, monkeypatch):
    from posttrain.job.result import EXIT_OK
    from posttrain.worker.entry import main

    job = JobDir(tmp_path / "job").create()
    job.update_status(state="paused", step=7)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    # (no spec file: a restart of a paused run stops before it reads anything)
    assert main(["--spec", str(tmp_path / "missing.json"), "--job-dir", str(job.root)]) == EXIT_OK
    assert job.read_status().state == "paused" and job.read_status().step == 7
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert main(["--spec", str(tmp_path / "missing.json"), "--job-dir", str(job.root)]) != EXIT_OK
