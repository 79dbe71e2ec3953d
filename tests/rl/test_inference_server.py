"""`posttrain rl serve-inference`: a real server process on a loopback port, used by real clients
(atroposlib's VLLMServer, the openai package, httpx)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from inference_harness import get, greedy, post, start_server
from transformers import AutoModelForCausalLM

from posttrain.inference.generation import SamplingParams, generate_batch
from posttrain.inference.launch import ServeOptions, load_served_model, vllm_serve_command
from posttrain.modeling import resolve_model_path

MODEL = "posttrain:tiny"
PROMPT = [1, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = start_server(MODEL, tmp_path_factory.mktemp("server"), "--enable-lora", "--max-lora-rank", "8")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Two LoRA adapters of the tiny model with random (non-zero) weights, so each changes the outputs."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapters")
    folders = {}
    for name, seed, rank in (("a", 1, 8), ("b", 2, 8), ("too-big", 3, 16)):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path(MODEL), dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=4 * rank, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
        model.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def test_health_and_models(server):
    assert get(f"{server.url}/health").status_code == 200
    models = get(f"{server.url}/v1/models").json()["data"]
    assert [m["id"] for m in models] == [MODEL]


def test_generate_has_vllms_native_shape(server):
    body = {"prompt": {"prompt_token_ids": PROMPT}, "logprobs": 0, "n": 3, "max_tokens": 5, "temperature": 1.0}
    reply = post(f"{server.url}/generate", json=body).json()

    assert reply["prompt_token_ids"] == PROMPT
    assert len(reply["text"]) == len(reply["token_ids"]) == len(reply["logprobs"]) == len(reply["finish_reasons"]) == 3
    for tokens, logprobs, reason in zip(reply["token_ids"], reply["logprobs"], reply["finish_reasons"], strict=True):
        assert reason in ("stop", "length") and 1 <= len(tokens) <= 5
        # [[{id: logprob}], ...]: one single-entry dict per generated token, keyed by that token.
        assert [int(next(iter(entry[0]))) for entry in logprobs] == tokens
        assert all(next(iter(entry[0].values())) <= 0 for entry in logprobs)


def test_atroposlibs_vllm_server_client_gets_tokens_and_logprobs(server, tiny_model_dir):
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig
    from atroposlib.envs.server_handling.vllm_server import VLLMServer

    config = APIServerConfig(model_name=MODEL, base_url=f"{server.url}/v1", tokenizer_name=str(tiny_model_dir),
                             api_key="x", server_type="vllm", timeout=120)
    client = VLLMServer(config)

    async def ask():
        tokens = await client.tokens_and_logprobs_completion(prompt="Hello world", n=4, max_tokens=6,
                                                             temperature=1.0)
        prompt_logprobs = await client.get_logprobs(prompt="Hello world", top_k=2)
        return tokens, prompt_logprobs

    (prompt_tokens, outputs, logprobs, reasons), prompt_logprobs = asyncio.run(ask())

    assert prompt_tokens == client.tokenizer.encode("Hello world")
    assert len(outputs) == len(logprobs) == len(reasons) == 4
    assert all(len(o) == len(lp) and all(v <= 0 for v in lp) for o, lp in zip(outputs, logprobs, strict=True))
    assert prompt_logprobs["prompt_tokens"] == prompt_tokens
    assert len(prompt_logprobs["prompt_topk_logprobs"]) == len(prompt_tokens)


def test_openai_completions_and_chat_return_logprobs(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    completion = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, logprobs=2, temperature=0)
    choice = completion.choices[0]
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == completion.usage.completion_tokens
    assert all(len(top) >= 1 for top in choice.logprobs.top_logprobs)

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          logprobs=True, top_logprobs=2, n=2)
    assert len(chat.choices) == 2
    for choice in chat.choices:
        assert choice.message.role == "assistant"
        assert all(len(token.top_logprobs) == 2 for token in choice.logprobs.content)


def test_concurrent_requests_are_batched_and_greedy_matches_one_by_one(server):
    prompts = [PROMPT, [1, 5], [1, 300, 301, 302, 303, 304, 305, 306], [1, 44, 45]]
    one_by_one = [greedy(server.url, p, max_tokens=6) for p in prompts]
    for _attempt in range(5):  # until the server really generated them together
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda p: greedy(server.url, p, max_tokens=6), prompts))
        assert together == one_by_one
        if get(f"{server.url}/weights/info").json()["largest_batch"] > 1:
            break
    else:
        pytest.fail("concurrent requests were never generated in one batch")


def test_left_padded_batch_equals_each_prompt_alone():
    model, tokenizer = load_served_model(ServeOptions(model=MODEL))
    prompts = [PROMPT, [1, 5], [1, 300, 301, 302, 303, 304, 305, 306, 307, 308]]
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=0, ignore_eos=True)
    batched = generate_batch(model, tokenizer, prompts, [params] * len(prompts))
    for prompt, result in zip(prompts, batched, strict=True):
        alone = generate_batch(model, tokenizer, [prompt], [params])[0].completions[0]
        assert result.completions[0].token_ids == alone.token_ids
        for together, single in zip(result.completions[0].logprobs, alone.logprobs, strict=True):
            assert together.keys() == single.keys()
            assert all(abs(together[k] - single[k]) < 1e-4 for k in single)


def test_stop_strings_cut_the_text(server):
    body = {"prompt": {"prompt_token_ids": PROMPT}, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    full = post(f"{server.url}/generate", json=body).json()["text"][0]
    stop = full[2:4]
    cut = post(f"{server.url}/generate", json={**body, "stop": [stop]}).json()
    assert cut["finish_reasons"] == ["stop"]
    assert stop not in cut["text"][0] and full.startswith(cut["text"][0])


def test_lora_load_unload_and_the_base_name_serves_the_newest(server, adapters):
    url = server.url
    base = greedy(url, PROMPT)
    load = post(f"{url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(adapters["a"])})
    assert load.status_code == 200, load.text
    with_a = greedy(url, PROMPT)
    assert with_a != base
    assert greedy(url, PROMPT, model=MODEL) == with_a == greedy(url, PROMPT, model="a")

    # The seed server's route; the newest adapter wins for unnamed requests, older ones stay addressable.
    reply = post(f"{url}/lora/load", json={"adapter_path": str(adapters["b"]), "adapter_name": "b"})
    assert reply.status_code == 200, reply.text
    with_b = greedy(url, PROMPT)
    assert with_b not in (base, with_a)
    assert greedy(url, PROMPT, model="a") == with_a
    assert [m["id"] for m in get(f"{url}/v1/models").json()["data"]] == [MODEL, "a", "b"]

    # In place: same name, new weights.
    inplace = {"lora_name": "a", "lora_path": str(adapters["b"]), "load_inplace": True}
    assert post(f"{url}/v1/load_lora_adapter", json=inplace).status_code == 200
    assert greedy(url, PROMPT, model="a") == with_b

    for name in ("a", "b"):
        assert post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
    assert greedy(url, PROMPT) == base

    # Loading again reuses a freed slot (a tensor copy, no PEFT injection): same outputs as a fresh load.
    assert post(f"{url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(adapters["a"])}).is_success
    assert greedy(url, PROMPT) == with_a
    assert post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "c"}).is_success


@pytest.mark.parametrize("path,body,status", [
    ("/generate", {"max_tokens": 4}, 422),  # no prompt
    ("/generate", {"prompt": {"prompt_token_ids": []}}, 422),
    ("/generate", {"prompt": {"prompt_token_ids": [1, 10**9]}}, 400),  # outside the vocabulary
    ("/generate", {"prompt": {"prompt_token_ids": [1]}, "max_tokens": 0}, 422),
    ("/generate", {"prompt": {"prompt_token_ids": [1]}, "max_tokens": 10**6}, 400),  # beyond the context
    ("/generate", {"prompt": {"prompt_token_ids": [1]}, "temprature": 0.5}, 422),  # a typo is refused
    ("/generate", {"prompt": {"prompt_token_ids": [1]}, "stream": True}, 400),
    ("/generate", {"prompt": {"prompt_token_ids": [1]}, "model": "nope"}, 404),
    ("/v1/completions", {"model": MODEL}, 422),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, 400),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 422),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 422),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/does/not/exist"}, 400),
    ("/v1/load_lora_adapter", {"lora_name": MODEL, "lora_path": "/tmp"}, 400),
    ("/v1/unload_lora_adapter", {"lora_name": "never-loaded"}, 404),
    ("/weights/broadcast/update", {}, 409),
    ("/generate", {"prompt": "hi", "max_tokens": 2, "seed": 2**64}, 422),  # torch seeds are uint64
    ("/generate", {"prompt": "hi", "max_tokens": 2, "seed": -1}, 422),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "seed": 2**64}, 422),
])
def test_bad_requests_are_4xx_with_a_message(server, path, body, status):
    reply = post(f"{server.url}{path}", json=body)
    assert reply.status_code == status, reply.text
    assert reply.json()["detail"]


def test_malformed_json_and_too_big_adapters_are_refused(server, adapters):
    reply = post(f"{server.url}/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 422
    too_big = {"lora_name": "big", "lora_path": str(adapters["too-big"])}
    reply = post(f"{server.url}/v1/load_lora_adapter", json=too_big)
    assert reply.status_code == 400 and "max-lora-rank 8" in reply.text


def test_pause_twice_is_a_conflict_and_resume_is_idempotent(server):
    assert post(f"{server.url}/weights/pause", json={"timeout_s": 30}).status_code == 200
    try:
        assert post(f"{server.url}/weights/pause", json={"timeout_s": 30}).status_code == 409
    finally:
        assert post(f"{server.url}/weights/resume").json()["resumed"] is True
    assert post(f"{server.url}/weights/resume").json()["resumed"] is False
    assert len(greedy(server.url, PROMPT)) == 8


def test_lora_is_refused_unless_enabled(tmp_path: Path, adapters):
    server = start_server(MODEL, tmp_path)
    try:
        reply = post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "a",
                                                                       "lora_path": str(adapters["a"])})
        assert reply.status_code == 400 and "--enable-lora" in reply.text
    finally:
        server.stop()


def test_vllm_backend_builds_the_vllm_serve_command():
    # vLLM cannot be installed here (no GPU): we check the command it would run and the clear error.
    options = ServeOptions(model=MODEL, port=9005, served_model_name="policy", enable_lora=True, max_lora_rank=32,
                           dtype="bfloat16", backend="vllm")
    command = vllm_serve_command(options)
    assert command[:3] == ["vllm", "serve", resolve_model_path(MODEL)]
    assert command[3:] == ["--host", "127.0.0.1", "--port", "9005", "--served-model-name", "policy", "--dtype",
                           "bfloat16", "--enable-lora", "--max-lora-rank", "32"]
    if shutil.which("vllm") is None:
        result = subprocess.run([sys.executable, "-m", "posttrain.cli", "rl", "serve-inference", "--model", MODEL,
                                 "--backend", "vllm"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        assert "needs vLLM installed" in result.stderr and "vllm serve" in result.stderr


def test_bad_cli_options_exit_2_with_a_message():
    result = subprocess.run([sys.executable, "-m", "posttrain.cli", "rl", "serve-inference", "--model", MODEL,
                             "--dtype", "float8"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--dtype 'float8'" in result.stderr
    result = subprocess.run([sys.executable, "-m", "posttrain.cli", "rl", "serve-inference", "--model",
                             "/no/such/model", "--port", "1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "/no/such/model" in result.stderr


# A stand-in server for the process tests: answers /health and starts a grandchild that must die with it.
FAKE_SERVER = """
import http.server, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def test_server_process_stop_ends_the_whole_tree(tmp_path: Path):
    import psutil
    from inference_harness import free_port

    from posttrain.inference.process import InferenceServerProcess

    port = free_port()
    log = tmp_path / "fake.log"
    server = InferenceServerProcess([sys.executable, "-c", FAKE_SERVER, str(port)], f"http://127.0.0.1:{port}/v1",
                                    log_path=log)
    server.start()
    grandchild = psutil.Process(int(log.read_text().split()[0]))
    assert grandchild.is_running() and server.healthy()

    server.stop(grace=5)

    grandchild.wait(timeout=30)  # raises if it is still alive
    assert not psutil.pid_exists(grandchild.pid) or grandchild.status() == psutil.STATUS_ZOMBIE
    assert not server.healthy()


def test_server_process_that_dies_at_start_reports_its_log(tmp_path: Path):
    from posttrain.inference.process import InferenceServerProcess, ServerProcessError

    server = InferenceServerProcess([sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"],
                                    "http://127.0.0.1:9", log_path=tmp_path / "dead.log")
    with pytest.raises(ServerProcessError, match=r"(?s)exited with code 3.*no model here"):
        server.start()


def test_one_request_that_fails_does_not_fail_the_ones_batched_with_it():
    """The engine generates requests arriving together as one batch; one that raises inside generation
    (here a seed torch refuses, sent past the HTTP models' bounds) fails alone."""
    from posttrain.inference.engine import InferenceEngine

    model, tokenizer = load_served_model(ServeOptions(model=MODEL))
    engine = InferenceEngine(model, tokenizer, MODEL, batch_wait_s=1.0)  # a long window: one batch
    try:
        good_params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        bad = engine.submit(PROMPT, SamplingParams(max_tokens=4, seed=2**64))
        good = engine.submit(PROMPT, good_params)
        assert len(good.result(timeout=120).completions[0].token_ids) == 4
        with pytest.raises(ValueError, match="Overflow"):
            bad.result(timeout=120)
        assert engine.largest_batch == 2  # they really were batched together
    finally:
        engine.close()


def test_an_adapter_folder_without_weights_is_refused_without_a_hub_lookup(server, tmp_path: Path, adapters):
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(adapters["a"] / "adapter_config.json", folder)
    for path in (folder, tmp_path / "missing", "some-user/some-hub-adapter"):
        reply = post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(path)})
        assert reply.status_code == 400 and "not a local LoRA adapter folder" in reply.text, reply.text


def test_an_api_key_guards_every_route_but_health(tmp_path: Path, adapters):
    root = tmp_path / "adapters"
    shutil.copytree(adapters["a"], root / "a")
    server = start_server(MODEL, tmp_path, "--api-key", "s3cret", "--enable-lora", "--max-lora-rank", "8",
                          "--lora-root", str(root))
    key = {"Authorization": "Bearer s3cret"}
    generate = {"prompt": {"prompt_token_ids": PROMPT}, "max_tokens": 2}
    try:
        assert get(f"{server.url}/health").status_code == 200
        for method, path, body in [("post", "/generate", generate), ("get", "/v1/models", None),
                                   ("post", "/v1/completions", {"prompt": "hi"}),
                                   ("post", "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(root)}),
                                   ("post", "/lora/load", {"adapter_path": str(root / "a")}),
                                   ("post", "/weights/pause", {}), ("get", "/weights/info", None),
                                   ("post", "/weights/broadcast/init", {"master_address": "10.0.0.1",
                                                                        "master_port": 1})]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                call = post if method == "post" else get
                reply = call(f"{server.url}{path}", headers=headers, **({"json": body} if body else {}))
                assert reply.status_code == 401 and "API key" in reply.text, (path, headers, reply.text)
        assert post(f"{server.url}/generate", json=generate, headers=key).status_code == 200
        # OpenAI clients configured with api_key send it as the Bearer token.
        import openai
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret")
        assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices
        # Adapters only from inside --lora-root, with the same answer as for a folder that does not exist.
        outside = post(f"{server.url}/v1/load_lora_adapter", headers=key,
                       json={"lora_name": "b", "lora_path": str(adapters["b"])})
        escape = post(f"{server.url}/v1/load_lora_adapter", headers=key,
                      json={"lora_name": "b", "lora_path": f"{root}/../../{adapters['b'].parent.name}/b"})
        for reply in (outside, escape):
            assert reply.status_code == 400 and "inside --lora-root" in reply.text, reply.text
        inside = post(f"{server.url}/v1/load_lora_adapter", headers=key,
                      json={"lora_name": "a", "lora_path": str(root / "a")})
        assert inside.status_code == 200, inside.text
    finally:
        server.stop()


@pytest.mark.parametrize("flags, message", [
    (["--host", "0.0.0.0"], "set --api-key"),
    (["--host", "0.0.0.0", "--api-key", "k", "--enable-lora"], "needs --lora-root"),
])
def test_a_server_reachable_from_other_machines_needs_a_key(flags, message):
    result = subprocess.run([sys.executable, "-m", "posttrain.cli", "rl", "serve-inference", "--model", MODEL,
                             *flags], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "POSTTRAIN_INFERENCE_API_KEY": ""})
    assert result.returncode == 2 and message in result.stderr, result.stderr
