"""posttrain's environments on atroposlib's BaseEnv: the math reward (math-verify), the synthetic task's
reward, loading GSM8k-format data, finding environments by name, and the environments run through
`posttrain rl env NAME ...` (atroposlib's own command line) against a real inference server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from inference_harness import start_server

from posttrain.errors import ConfigError, DatasetError
from posttrain.rl.envs import environment_class
from posttrain.rl.envs.math_env import HUB_GSM8K, MathEnv, load_problems, reference_answer, score_reply
from posttrain.rl.envs.synthetic import DigitsEnv, digit_share


@pytest.mark.parametrize(("reply", "score"), [
    ("4 bags of 5 coins is 4 * 5 = 20.\n#### 20", 1.0),  # GSM8k's own answer line
    ("The answer is \\boxed{20}.", 1.0),  # boxed, as math models answer
    ("So she has 20 coins.", 1.0),  # no marker: the reply's final number
    ("#### 20.0", 1.0),  # the same number written differently
    ("It is 4 * 5 = 20, then minus 1.\n#### 19", 0.1),  # a number, the wrong one: the shaping credit only
    ("I do not know.", 0.0),
    ("", 0.0),
])
def test_math_reward_checks_the_final_answer_with_math_verify(reply, score):
    assert score_reply(reply, "20", number_reward=0.1) == score


def test_math_reward_without_shaping_is_plain_correctness_and_reads_gsm8k_answers():
    assert score_reply("#### 19", "20") == 0.0
    assert reference_answer("Half of 2,400 is 1,200.\n#### 1,200") == "1200"
    assert score_reply("#### 1200", reference_answer("...\n#### 1,200")) == 1.0


def test_gsm8k_data_loads_from_the_bundled_sample_and_bad_rows_are_named(tmp_path):
    problems = load_problems("posttrain:gsm8k")
    assert len(problems) == 200 and problems[0]["answer"] == "20"
    assert HUB_GSM8K == "openai/gsm8k:main"  # the real dataset, for machines online
    bad = tmp_path / "mine.jsonl"
    bad.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n" + json.dumps({"q": "x"}) + "\n")
    with pytest.raises(DatasetError, match=r"mine.jsonl row 2: expected GSM8k fields 'question' and 'answer'"):
        load_problems(str(bad))
    with pytest.raises(DatasetError, match="does not exist"):
        load_problems(str(tmp_path / "missing.jsonl"))


def test_digit_share_is_the_share_of_digits_among_non_space_characters():
    assert digit_share("123 456") == 1.0
    assert digit_share("ab12") == 0.5
    assert digit_share("  ") == 0.0 and digit_share("") == 0.0
    assert digit_share("aab", target_chars="a") == pytest.approx(2 / 3)


def test_environments_are_found_by_name_or_import_path():
    assert environment_class("gsm8k") is MathEnv
    assert environment_class("digits") is DigitsEnv
    assert environment_class("posttrain.rl.envs.synthetic:DigitsEnv") is DigitsEnv
    with pytest.raises(ConfigError, match="unknown environment 'gsm9k': use one of digits, gsm8k or module:ClassName"):
        environment_class("gsm9k")
    with pytest.raises(ConfigError, match="cannot import no_such_module"):
        environment_class("no_such_module:Env")
    with pytest.raises(ConfigError, match="is not an atroposlib BaseEnv subclass"):
        environment_class("posttrain.rl.envs.math_env:MathEnvConfig")


def test_env_command_refuses_an_unknown_environment_without_a_traceback():
    result = subprocess.run([sys.executable, "-m", "posttrain.cli", "rl", "env", "gsm9k", "serve"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 2
    assert "error: unknown environment 'gsm9k'" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    server = start_server("posttrain:tiny", tmp_path_factory.mktemp("server"))
    yield server
    server.stop()


def run_env(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain.cli", "rl", "env", *args], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout)


@pytest.mark.parametrize("name", ["digits", "gsm8k"])
def test_env_process_samples_scores_and_aligns_groups_from_our_server_as_vllm(tiny_server, tmp_path, name):
    """atroposlib's `process` command: groups from the server written to a file (no trajectory API)."""
    out = tmp_path / "groups.jsonl"
    result = run_env(
        name, "process", f"--env.data_path_to_save_groups={out}", "--env.total_steps=2", "--env.group_size=4",
        "--env.max_completion_tokens=12", "--env.tokenizer_name=posttrain:tiny", "--env.use_wandb=False",
        "--env.ensure_scores_are_not_same=False",
        f"--openai.base_url={tiny_server.url}/v1", "--openai.model_name=posttrain:tiny",
        "--openai.server_type=vllm", "--openai.api_key=x",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    groups = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(groups) == 2
    from transformers import AutoTokenizer

    from posttrain.modeling import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("posttrain:tiny"))
    for group in groups:
        assert len(group["tokens"]) == len(group["masks"]) == len(group["scores"]) == 4
        for tokens, masks, logprobs, score in zip(group["tokens"], group["masks"], group["inference_logprobs"],
                                                  group["scores"], strict=True):
            assert len(tokens) == len(masks) == len(logprobs)
            prompt = [i for i, m in enumerate(masks) if m == -100]
            completion = [i for i, m in enumerate(masks) if m != -100]
            # The prompt (rendered with the chat template) comes first and is not trained; then 1..12 sampled
            # tokens, each trained and with its sampling logprob (atroposlib fills 1.0 on the prompt).
            assert prompt == list(range(len(prompt))) and 1 <= len(completion) <= 12
            assert all(masks[i] == tokens[i] for i in completion)
            assert all(logprobs[i] == 1.0 for i in prompt) and all(logprobs[i] <= 0 for i in completion)
            assert tokenizer.decode(tokens[: len(prompt)]).startswith("<|begin_of_text|><|start_header_id|>")
            reply = tokenizer.decode([tokens[i] for i in completion], skip_special_tokens=True)
            expected = digit_share(reply) if name == "digits" else None
            if expected is not None:
                assert score == pytest.approx(expected)
            else:
                assert score in (0.0, 0.1, 1.0)
