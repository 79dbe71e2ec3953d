"""The inference engine in-process: continuous batching, LoRA adapters mixed per row, streams, stop strings,
seeds, cancellation, and the serving pool's memory budget. Real tiny model, real PEFT adapters, real threads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from posttrain.inference.engine import TokenEvent
from posttrain.inference.generation import SamplingParams
from posttrain.inference.model_source import ModelSource
from posttrain.inference.pool import ModelPool, PoolOptions, weight_bytes
from posttrain.modeling import resolve_model_path

MODEL = "posttrain:tiny"
PROMPTS = [[1, 17, 42, 99, 7], [1, 5], [1, 300, 301, 302, 303, 304, 305, 306], [1, 44, 45], [1, 9, 8, 7, 6, 5, 4]]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def greedy(max_tokens: int, **more) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **more)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[Path]:
    """Four LoRA adapters of the tiny model with random (non-zero) weights, one of them over every linear layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    folders = []
    for seed, modules in ((1, ["q_proj", "v_proj"]), (2, ["q_proj", "v_proj"]), (3, ALL_LINEAR), (4, ["v_proj"])):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path(MODEL), dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=modules, init_lora_weights=False))
        model.save_pretrained(root / f"adapter-{seed}")
        folders.append(root / f"adapter-{seed}")
    return folders


@pytest.fixture(scope="module")
def pool():
    # float32: the batch-shape independence these tests check is exact there; in bfloat16 a batch's rounding
    # can differ from one row's alone, and on the tiny random model's near-ties that can flip a greedy token.
    pool = ModelPool(PoolOptions(memory_bytes=1 << 30, dtype="float32"))
    yield pool
    pool.close()


def test_four_adapters_mixed_in_running_batches_answer_as_each_alone(pool, adapters):
    sources = [ModelSource(MODEL)] + [ModelSource(MODEL, adapter=str(folder)) for folder in adapters]
    resolved = [pool.resolve(source) for source in sources]
    engine = resolved[0][0]
    assert all(e is engine for e, _ in resolved)  # one copy of the base serves them all
    # (source, prompt, max_tokens): rows of different lengths, so they leave the batch at different steps.
    jobs = [(s, p, 4 + 3 * ((s + p) % 4)) for s in range(len(sources)) for p in range(len(PROMPTS))]
    alone = {job: engine.generate(PROMPTS[job[1]], greedy(job[2]), resolved[job[0]][1]).completions[0].token_ids
             for job in jobs}
    # Each adapter changes the answers, so an answer that crossed adapters would show.
    answers = [[alone[job] for job in jobs if job[0] == s] for s in range(len(sources))]
    assert all(answers[s] != answers[0] for s in range(1, len(sources)))

    # Three waves: the second joins while the first is generating, the third once rows have left (holes).
    first_token = threading.Event()
    futures = {}
    waves = [jobs[0::3], jobs[1::3], jobs[2::3]]
    for wave_number, wave in enumerate(waves):
        for job in wave:
            futures[job] = engine.submit(PROMPTS[job[1]], greedy(job[2]), resolved[job[0]][1],
                                         lambda _events: first_token.set())
        if wave_number == 0:
            assert first_token.wait(60)
        elif wave_number == 1:
            next(iter(futures.values())).result(timeout=120)
    together = {key: future.result(timeout=120).completions[0].token_ids for key, future in futures.items()}
    assert together == alone
    assert engine.most_adapters_together == 5  # the four adapters and the base shared decode steps


def test_streamed_text_is_the_answer_and_never_shows_a_stop_string(pool):
    engine, _ = pool.resolve(ModelSource(MODEL))
    full = engine.generate(PROMPTS[0], greedy(24)).completions[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip() and stop in full
    pieces: list[str] = []

    def listen(events: list[TokenEvent]) -> None:
        pieces.extend(event.text for event in events)

    result = engine.submit(PROMPTS[0], greedy(24, stop=(stop,)), listener=listen).result(timeout=120)
    completion = result.completions[0]
    assert completion.finish_reason == "stop"
    assert completion.text == full[:full.index(stop)]
    assert "".join(pieces) == completion.text


def test_a_seed_makes_sampling_repeatable_and_n_samples_differ(pool):
    engine, _ = pool.resolve(ModelSource(MODEL))
    params = SamplingParams(max_tokens=12, temperature=1.0, n=2, seed=1234, ignore_eos=True)
    first = [c.token_ids for c in engine.generate(PROMPTS[1], params).completions]
    again = [c.token_ids for c in engine.generate(PROMPTS[1], params).completions]
    other = [c.token_ids for c in engine.generate(PROMPTS[1], SamplingParams(
        max_tokens=12, temperature=1.0, n=2, seed=99, ignore_eos=True)).completions]
    assert first == again
    assert first[0] != first[1]
    assert other != first


def test_a_cancelled_request_leaves_the_batch(pool):
    engine, _ = pool.resolve(ModelSource(MODEL))
    started = threading.Event()
    future = engine.submit(PROMPTS[2], greedy(900), listener=lambda _events: started.set())
    assert started.wait(60)
    assert future.cancel()
    from waiting import wait_for

    wait_for(lambda: engine.running == 0 and engine.pending == 0, 60, "the cancelled request to leave the batch")
    # The engine goes on serving.
    assert len(engine.generate(PROMPTS[0], greedy(3)).completions[0].token_ids) == 3


def test_the_memory_budget_unloads_the_least_recently_used_adapter(adapters):
    base_bytes = weight_bytes(Path(resolve_model_path(MODEL)))
    adapter_bytes = weight_bytes(adapters[0])
    small = ModelPool(PoolOptions(memory_bytes=base_bytes + adapter_bytes * 3 // 2, dtype="float32"))
    try:
        first, second = (ModelSource(MODEL, adapter=str(folder)) for folder in adapters[:2])
        engine, name = small.resolve(first)
        answer = engine.generate(PROMPTS[0], greedy(6), name).completions[0].token_ids
        small.resolve(second)
        assert small.loaded()[0]["adapters"] == [str(adapters[1].resolve())]
        engine, name = small.resolve(first)  # loaded again on its next use, with the same weights
        assert small.loaded()[0]["adapters"] == [str(adapters[0].resolve())]
        assert engine.generate(PROMPTS[0], greedy(6), name).completions[0].token_ids == answer
    finally:
        small.close()
