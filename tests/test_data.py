"""Training data: every source, every format, and every way a row can be wrong.

Each test writes a small file, points a DataSpec at it and looks at the rows TRL will be given.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from posttrain.data import load_training_data
from posttrain.errors import ConfigError, DatasetError
from posttrain.spec import DataSpec

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    {"instruction": "Name a colour.", "output": "Blue."},
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_json(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(rows, indent=2))
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def load(source: Path | str, method: str = "sft", **data: Any):
    return load_training_data(DataSpec(source=str(source), **data), method)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# Formats -> canonical rows


def test_alpaca_rows_become_conversational_prompt_completion(tmp_path):
    data = load(write_jsonl(tmp_path / "train.jsonl", ALPACA))

    assert data.format == "alpaca"
    assert data.train.to_list() == [
        {"prompt": user("Add the numbers.\n\n2 and 3"), "completion": assistant("5")},
        {"prompt": user("Say hello."), "completion": assistant("Hello!")},
        {"prompt": user("Name a colour."), "completion": assistant("Blue.")},
    ]
    assert data.eval is None and data.skipped == 0


def test_alpaca_rows_can_stay_plain_text_for_models_without_chat_template(tmp_path):
    spec = DataSpec(source=str(write_jsonl(tmp_path / "train.jsonl", ALPACA[:1])))

    data = load_training_data(spec, "sft", conversational=False)

    assert data.train[0] == {"prompt": "Add the numbers.\n\n2 and 3", "completion": "5"}


def test_sharegpt_conversations_become_messages_with_standard_roles(tmp_path):
    rows = [{"conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Capital of France?"},
        {"from": "gpt", "value": "Paris."},
    ]}]

    data = load(write_jsonl(tmp_path / "chats.jsonl", rows))

    assert data.format == "sharegpt"
    assert data.train.to_list() == [{"messages": CHAT}]


def test_sharegpt_conversations_may_use_role_and_content(tmp_path):
    data = load(write_jsonl(tmp_path / "chats.jsonl", [{"conversations": CHAT}]), format="sharegpt")

    assert data.train[0] == {"messages": CHAT}


def test_messages_rows_pass_through(tmp_path):
    data = load(write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT, "id": 7}]))

    assert data.format == "messages"
    assert data.train.to_list() == [{"messages": CHAT}]


def test_text_rows(tmp_path):
    data = load(write_jsonl(tmp_path / "corpus.jsonl", [{"text": "Once upon a time."}]))

    assert data.format == "text"
    assert data.train.to_list() == [{"text": "Once upon a time."}]


def test_preference_rows_for_dpo_and_reward_are_conversational(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])

    for method in ("dpo", "reward"):
        data = load(path, method)
        assert data.format == "preference"
        assert data.train.to_list() == [{"prompt": user("2+2?"), "chosen": assistant("4"), "rejected": assistant("5")}]


def test_preference_rows_can_stay_plain_text(tmp_path):
    spec = DataSpec(source=str(write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])))

    data = load_training_data(spec, "dpo", conversational=False)

    assert data.train[0] == {"prompt": "2+2?", "chosen": "4", "rejected": "5"}


def test_preference_conversations_without_prompt_share_their_leading_turns_as_prompt(tmp_path):
    rows = [{
        "chosen": [*user("Capital of France?"), *assistant("Paris.")],
        "rejected": [*user("Capital of France?"), *assistant("Rome.")],
    }]

    data = load(write_jsonl(tmp_path / "pairs.jsonl", rows), "dpo")

    assert data.train[0] == {"prompt": user("Capital of France?"), "chosen": assistant("Paris."), "rejected": assistant("Rome.")}


def test_preference_rows_train_sft_on_the_chosen_answer(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])

    data = load(path, "sft")

    assert data.train.to_list() == [{"prompt": user("2+2?"), "completion": assistant("4")}]


def test_gsm8k_rows_become_prompts_with_the_final_answer(tmp_path):
    rows = [{"question": "Tom has 3 bags of 4 apples. How many apples?", "answer": "3 * 4 = 12 apples.\n#### 12"}]

    data = load(write_jsonl(tmp_path / "gsm8k.jsonl", rows), "grpo")

    assert data.format == "prompt"
    assert data.train.to_list() == [{"prompt": user("Tom has 3 bags of 4 apples. How many apples?"), "answer": "12"}]


def test_prompt_answer_rows_accept_plain_and_numeric_answers(tmp_path):
    rows = [{"prompt": "6 * 7?", "answer": 42}, {"prompt": "Capital of Peru?", "answer": " Lima "}]

    data = load(write_jsonl(tmp_path / "prompts.jsonl", rows), "grpo")

    assert [row["answer"] for row in data.train] == ["42", "Lima"]


def test_openai_preference_rows_train_dpo_and_sft(tmp_path):
    rows = [{"input": {"messages": [{"role": "system", "content": "Be brief."}, *user("2+2?")]},
             "preferred_output": assistant("4"), "non_preferred_output": assistant("Five, I think.")}]
    path = write_jsonl(tmp_path / "openai-prefs.jsonl", rows)

    data = load(path, "dpo")
    assert data.format == "preference"
    assert data.train[0] == {"prompt": [CHAT[0], *user("2+2?")], "chosen": assistant("4"),
                             "rejected": assistant("Five, I think.")}
    assert load(path, "sft").train[0]["completion"] == assistant("4")


@pytest.mark.parametrize(("row", "message"), [
    ({"input": "2+2?", "preferred_output": assistant("4"), "non_preferred_output": assistant("5")},
     "'input' must be an object holding 'messages'"),
    ({"input": {"messages": user("2+2?")}, "preferred_output": user("4"), "non_preferred_output": assistant("5")},
     "'preferred_output' may hold only assistant messages"),
    ({"input": {"messages": user("2+2?")}, "preferred_output": assistant("4")}, "'non_preferred_output' is missing"),
])
def test_bad_openai_preference_rows_name_the_field(tmp_path, row: dict, message: str):
    path = write_jsonl(tmp_path / "prefs.jsonl", [row])
    with pytest.raises(DatasetError, match=message) as caught:
        load(path, "dpo", format="preference")
    assert "prefs.jsonl row 1" in str(caught.value)


def test_openai_reinforcement_rows_prompt_grpo_and_keep_their_fields_for_graders(tmp_path):
    rows = [{"messages": user("Reply with red."), "word": "red", "meta": {"level": 1}},
            {"messages": user("6 * 7?"), "answer": 42}]

    data = load(write_jsonl(tmp_path / "rft.jsonl", rows), "grpo")

    assert data.format == "prompt"
    first, second = data.train.to_list()
    assert first["prompt"] == user("Reply with red.") and json.loads(first["item"])["meta"] == {"level": 1}
    assert second["answer"] == "42" and json.loads(second["item"])["answer"] == 42
    with pytest.raises(DatasetError, match="ends with an assistant turn"):
        load(write_jsonl(tmp_path / "answered.jsonl", [{"messages": CHAT}]), "grpo")


def test_openai_fine_tuning_files_are_checked_line_by_line(tmp_path):
    from posttrain.data.openai_files import check_fine_tuning_file

    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 2)
    assert check_fine_tuning_file(chat, "chat.jsonl") == "chat"
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": user("Hi?"), "answer": "hi"}])
    assert check_fine_tuning_file(prompts, "prompts.jsonl") == "prompt"
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"messages": CHAT}, {"messages": user("Hi?")}])
    with pytest.raises(DatasetError, match=r"line 2: reinforcement prompts .* but line 1 began a file of chat rows"):
        check_fine_tuning_file(mixed, "mixed.jsonl")
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    with pytest.raises(DatasetError, match=r"alpaca.jsonl: line 1: expected 'messages'.*found the fields input"):
        check_fine_tuning_file(alpaca, "alpaca.jsonl")


def test_canonical_rows_are_what_trl_renders_with_a_chat_template(tmp_path):
    from trl.data_utils import apply_chat_template, is_conversational, maybe_extract_prompt

    from posttrain.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    sft = load("posttrain:alpaca").train[0]
    dpo = load("posttrain:preference", "dpo").train[0]
    grpo = load("posttrain:gsm8k", "grpo").train[0]
    chat = load(write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}])).train[0]

    for row in (sft, dpo, grpo, chat):
        assert is_conversational(row)
    assert maybe_extract_prompt(dpo) == dpo  # DPO will not try to re-split the prompt
    rendered = apply_chat_template(dpo, tokenizer)
    assert dpo["prompt"][0]["content"] in rendered["prompt"]
    assert dpo["chosen"][0]["content"] in rendered["chosen"]
    assert sft["completion"][0]["content"] in apply_chat_template(sft, tokenizer)["completion"]
    assert "Paris." in apply_chat_template(chat, tokenizer)["text"]


# ---------------------------------------------------------------------------------------------------
# Sources


def test_json_file_with_a_list_of_objects(tmp_path):
    data = load(write_json(tmp_path / "train.json", ALPACA))

    assert len(data.train) == 3


def test_json_file_holding_json_lines(tmp_path):
    data = load(write_jsonl(tmp_path / "train.json", ALPACA))

    assert len(data.train) == 3


def test_csv_file(tmp_path):
    data = load(write_csv(tmp_path / "train.csv", [{"instruction": "Say hi.", "input": "", "output": "Hi."}]))

    assert data.train.to_list() == [{"prompt": user("Say hi."), "completion": assistant("Hi.")}]


def test_csv_cells_may_hold_json_conversations(tmp_path):
    data = load(write_csv(tmp_path / "chats.csv", [{"messages": json.dumps(CHAT)}]))

    assert data.train[0] == {"messages": CHAT}


def test_parquet_file(tmp_path):
    data = load(write_parquet(tmp_path / "train.parquet", [{"messages": CHAT}, {"messages": CHAT}]))

    assert data.format == "messages"
    assert len(data.train) == 2


def test_folder_of_files_is_read_in_name_order(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", ALPACA[:1])
    write_csv(folder / "b.csv", [{"instruction": "Second file.", "input": "", "output": "Yes."}])
    write_parquet(folder / "c.parquet", [{"instruction": "Third file.", "input": None, "output": "Yes."}])
    (folder / "README.md").write_text("not data")

    data = load(folder)

    assert [row["prompt"][0]["content"] for row in data.train] == [
        "Add the numbers.\n\n2 and 3", "Second file.", "Third file.",
    ]


def test_saved_dataset_folder(tmp_path):
    from datasets import Dataset

    Dataset.from_list(ALPACA[:2]).save_to_disk(str(tmp_path / "saved"))

    data = load(tmp_path / "saved")

    assert data.format == "alpaca" and len(data.train) == 2


def test_saved_dataset_dict_folder_picks_the_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({
        "train": Dataset.from_list(ALPACA),
        "test": Dataset.from_list(ALPACA[:1]),
    }).save_to_disk(str(tmp_path / "saved"))

    assert len(load(tmp_path / "saved").train) == 3
    assert len(load(tmp_path / "saved", split="test").train) == 1
    with pytest.raises(DatasetError, match=r"has no split 'validation' \(splits: train, test\)"):
        load(tmp_path / "saved", split="validation")


@pytest.mark.parametrize(("sample", "method", "fmt"), [
    ("posttrain:alpaca", "sft", "alpaca"),
    ("posttrain:preference", "dpo", "preference"),
    ("posttrain:gsm8k", "grpo", "prompt"),
])
def test_bundled_samples(sample, method, fmt):
    data = load(sample, method)

    assert data.format == fmt
    assert len(data.train) >= 100
    assert data.source == sample


def test_unknown_bundled_sample_lists_the_bundled_ones():
    with pytest.raises(DatasetError, match="posttrain:alpaca, posttrain:preference, posttrain:gsm8k"):
        load("posttrain:dolly")


def test_validation_split_holds_out_a_seeded_fraction(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ALPACA * 67)
    data = load(path, validation={"split_ratio": 0.1})
    again = load(path, validation={"split_ratio": 0.1})
    assert len(data.train) + len(data.eval) == 201
    assert data.eval.to_list() == again.eval.to_list()


# ---------------------------------------------------------------------------------------------------
# Auto-detection, column mapping, max_samples and validation data


def test_auto_detection_names_the_columns_found_and_what_each_format_needs(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"query": "hi", "response": "hello"}])

    with pytest.raises(DatasetError) as error:
        load(path)

    message = str(error.value)
    assert str(path) in message
    assert "query, response" in message
    assert "alpaca: instruction, output" in message
    assert "preference: chosen or preferred_output, rejected or non_preferred_output" in message


def test_columns_are_renamed_before_detection(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"query": "Say hi.", "response": "Hi."}])

    data = load(path, columns={"query": "instruction", "response": "output"})

    assert data.format == "alpaca"
    assert data.train[0] == {"prompt": user("Say hi."), "completion": assistant("Hi.")}


def test_a_misspelt_column_mapping_names_the_real_columns(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"query": "Say hi.", "response": "Hi."}])

    with pytest.raises(DatasetError, match=r"renames 'querry', but the data has no such column \(columns: query, response\)"):
        load(path, columns={"querry": "instruction", "response": "output"})


def test_max_samples_takes_the_first_rows(tmp_path):
    data = load(write_jsonl(tmp_path / "train.jsonl", ALPACA), max_samples=2)

    assert [row["completion"][0]["content"] for row in data.train] == ["5", "Hello!"]


def test_split_ratio_holds_out_rows_the_same_way_for_the_same_seed(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(50)]
    spec = DataSpec(source=str(write_jsonl(tmp_path / "corpus.jsonl", rows)), validation={"split_ratio": 0.2})

    first = load_training_data(spec, "sft", seed=1)
    again = load_training_data(spec, "sft", seed=1)
    other = load_training_data(spec, "sft", seed=2)

    assert (len(first.train), len(first.eval)) == (40, 10)
    assert first.eval.to_list() == again.eval.to_list()
    assert first.eval.to_list() != other.eval.to_list()
    assert not {row["text"] for row in first.train} & {row["text"] for row in first.eval}


def test_split_ratio_must_leave_training_rows(tmp_path):
    with pytest.raises(DatasetError, match="leaves no training rows out of 1"):
        load(write_jsonl(tmp_path / "one.jsonl", ALPACA[:1]), validation={"split_ratio": 0.5})


def test_validation_source_is_a_separate_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ALPACA)
    held_out = write_csv(tmp_path / "valid.csv", [{"instruction": "Check.", "input": "", "output": "Done."}])

    data = load(train, validation={"source": str(held_out)})

    assert len(data.train) == 3
    assert data.eval.to_list() == [{"prompt": user("Check."), "completion": assistant("Done.")}]


def test_validation_takes_a_ratio_or_a_source_not_both(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ALPACA)

    with pytest.raises(ConfigError, match=r"data.validation: set either split_ratio or source"):
        load(train, validation={"source": str(train), "split_ratio": 0.1})


# ---------------------------------------------------------------------------------------------------
# Bad input: every error names what and where


def test_missing_file_is_named_and_not_looked_up_on_the_hub(tmp_path):
    for source in (str(tmp_path / "nope.jsonl"), "./data/train.jsonl", "missing.csv", "~/nowhere/data"):
        with pytest.raises(DatasetError, match=f"dataset path {source} does not exist"):
            load(source)


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n\n" + '{"instruction": "Say hi", "output": }\n')

    with pytest.raises(DatasetError, match=r"train.jsonl row 3: not valid JSON: Expecting value \(line 3, column 37\)"):
        load(path)


def test_malformed_json_file_names_file_and_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"instruction": "Say hi", "output": "Hi"},\n  {"instruction": \n]')

    with pytest.raises(DatasetError, match=r"train.json: not valid JSON at line 4, column 1"):
        load(path)


def test_missing_field_names_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [*ALPACA, {"instruction": "Forgot the answer."}])

    with pytest.raises(DatasetError) as error:
        load(path)

    assert str(error.value) == f"{path} row 4: field 'output' is missing"
    assert (error.value.source, error.value.row) == (str(path), 4)


def test_field_of_the_wrong_type(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "Add 2 and 3.", "output": 5}])

    with pytest.raises(DatasetError, match="row 1: field 'output' must be a string, got int"):
        load(path)


def test_empty_field(tmp_path):
    with pytest.raises(DatasetError, match="row 1: field 'text' is empty"):
        load(write_jsonl(tmp_path / "corpus.jsonl", [{"text": "  "}]))


def test_bad_role_names_the_message(tmp_path):
    rows = [{"messages": [*user("Hi"), {"role": "bot", "content": "Hello"}]}]

    with pytest.raises(DatasetError, match=r"row 1: field 'messages\[1\].role' is 'bot'; expected one of user"):
        load(write_jsonl(tmp_path / "chats.jsonl", rows))


def test_empty_conversation(tmp_path):
    with pytest.raises(DatasetError, match="row 1: field 'conversations' is an empty conversation"):
        load(write_jsonl(tmp_path / "chats.jsonl", [{"conversations": []}]))


def test_conversation_without_assistant_turn(tmp_path):
    with pytest.raises(DatasetError, match="row 1: field 'messages' has no assistant turn"):
        load(write_jsonl(tmp_path / "chats.jsonl", [{"messages": user("Hi")}]))


def test_gsm8k_answer_without_final_answer_marker(tmp_path):
    rows = [{"question": "1 + 1?", "answer": "#### 2"}, {"question": "2 + 2?", "answer": "It is 4."}]

    with pytest.raises(DatasetError, match=r"gsm8k.jsonl row 2: field 'answer' does not end in '#### <final answer>'"):
        load(write_jsonl(tmp_path / "gsm8k.jsonl", rows), "grpo")


def test_preference_strings_need_a_prompt(tmp_path):
    with pytest.raises(DatasetError, match="row 1: field 'prompt' is missing"):
        load(write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": "Yes.", "rejected": "No."}]), "dpo")


@pytest.mark.parametrize(("rows", "method", "message"), [
    (ALPACA, "dpo", "format alpaca cannot train method dpo: needs prompt/chosen/rejected rows"),
    (ALPACA, "grpo", "format alpaca cannot train method grpo: needs prompt/answer"),
    ([{"question": "1+1?", "answer": "#### 2"}], "sft", "format prompt cannot train method sft"),
    ([{"messages": CHAT}], "reward", "format messages cannot train method reward"),
])
def test_format_that_cannot_train_the_method(tmp_path, rows, method, message):
    with pytest.raises(DatasetError, match=message):
        load(write_jsonl(tmp_path / "train.jsonl", rows), method)


def test_declared_format_is_checked_against_every_row(tmp_path):
    with pytest.raises(DatasetError, match="row 1: field 'text' is missing"):
        load(write_jsonl(tmp_path / "train.jsonl", ALPACA), format="text")


def test_skip_mode_drops_and_counts_bad_rows(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([
        json.dumps(ALPACA[0]),
        json.dumps({"instruction": "No answer."}),
        "{not json",
        json.dumps({"instruction": "Typed answer.", "output": 3}),
        json.dumps(ALPACA[1]),
    ]))

    data = load(path, on_bad_row="skip")

    assert data.skipped == 3
    assert [row["completion"][0]["content"] for row in data.train] == ["5", "Hello!"]


def test_skip_mode_still_fails_when_no_row_is_usable(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "a"}, {"instruction": "b", "output": ""}])

    with pytest.raises(DatasetError, match="no usable rows: all 2 rows were bad and skipped"):
        load(path, on_bad_row="skip")


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")

    with pytest.raises(DatasetError, match=r"empty\.jsonl: has no rows"):
        load(tmp_path / "empty.jsonl")


def test_unsupported_file_type(tmp_path):
    (tmp_path / "train.txt").write_text("hello")

    with pytest.raises(DatasetError, match=r"cannot read \.txt files; use one of \.json, \.jsonl, \.csv, \.parquet"):
        load(tmp_path / "train.txt")


def test_hub_branch_loads_through_datasets_load_dataset(tmp_path, monkeypatch):
    # Tests never reach the hub: datasets.load_dataset also takes a local folder of data files, which runs
    # the same code path offline. Its cache goes to tmp_path instead of the user's home.
    import datasets

    from posttrain.data.sources import _read_hub_dataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "hub-like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ALPACA)

    rows = list(_read_hub_dataset(str(folder), "train"))

    assert [row.row for row in rows] == [1, 2, 3]
    assert rows[0].source == f"{folder}[train]"
    assert rows[0].values["instruction"] == "Add the numbers."
    with pytest.raises(DatasetError, match=r"cannot load hub dataset .* \(split 'test'\)"):
        list(_read_hub_dataset(str(folder), "test"))


@pytest.mark.parametrize(("value", "local"), [
    ("./x", True), ("data.jsonl", True), ("a/b/c", True), ("~/d", True), ("/abs", True),
    ("owner/name", False), ("gpt2", False), ("posttrain:alpaca", False), ("upload:file-1", False),
])
def test_one_rule_tells_local_paths_from_hub_ids(value: str, local: bool, tmp_path, monkeypatch):
    from posttrain.data.sources import is_local_path

    monkeypatch.chdir(tmp_path)
    assert is_local_path(value) is local
    (tmp_path / "gpt2").mkdir()
    assert is_local_path("gpt2")  # a folder that exists here is local, whatever its shape
