"""Writes the bundled sample datasets (alpaca.jsonl, preference.jsonl, gsm8k.jsonl) beside this file.

Synthetic, templated and deterministic: rerunning the script reproduces the files byte for byte. The tasks
are small and regular on purpose, so that the tiny embedded model visibly learns them in a few hundred
steps (SFT loss drops, DPO reward margins grow, GSM8k-style answers get the ``#### N`` ending).

    python posttrain/assets/make_samples.py
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

ROWS_PER_FILE = 200
SEED = 20241123

NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
]  # fmt: skip

CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Greece": "Athens", "Chile": "Santiago", "Poland": "Warsaw", "Ireland": "Dublin", "India": "New Delhi",
    "Portugal": "Lisbon",
}  # fmt: skip

KINDS = {
    "animal": ["cat", "dog", "horse", "eagle", "salmon", "rabbit", "frog", "whale", "bee", "owl"],
    "plant": ["oak", "rose", "fern", "tulip", "cactus", "wheat", "maple", "moss", "daisy", "bamboo"],
    "mineral": ["quartz", "salt", "granite", "iron", "gold", "copper", "marble", "talc", "diamond", "coal"],
}

OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
    "open": "closed", "full": "empty", "young": "old", "strong": "weak", "high": "low", "wet": "dry",
}  # fmt: skip

WORDS = [
    "apple", "river", "stone", "cloud", "bread", "lamp", "chair", "green", "music", "paper",
    "window", "garden", "train", "honey", "candle", "forest", "pencil", "silver", "ocean", "tiger",
]  # fmt: skip

NAMES = ["Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kemi", "Liam"]
ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "shells", "cards", "coins", "eggs"]

POLITE_OPENINGS = ["Sure!", "Happy to help.", "Good question.", "Of course."]
POLITE_CLOSINGS = ["I hope that helps.", "Let me know if you need more.", "Have a nice day."]
RUDE_REPLIES = [
    "Figure it out yourself.",
    "That is a silly question.",
    "I do not care, ask someone else.",
    "Why would I tell you that?",
]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def alpaca_row(rng: random.Random) -> dict[str, str]:
    """One instruction from one of seven templated tasks, each with a short, fully determined answer.

    The seventh is a GSM8k-style word problem answered with '#### N', so that an SFT model has seen the
    answer format that the GRPO stage of the demo then rewards.
    """
    task = rng.randrange(7)
    if task == 6:
        problem = gsm8k_row(rng)
        return {"instruction": problem["question"], "input": "", "output": problem["answer"]}
    if task == 0:
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        if rng.random() < 0.5:
            words = f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}"
            result = a + b
        else:
            a, b = max(a, b), min(a, b)
            words = f"{NUMBER_WORDS[a]} minus {NUMBER_WORDS[b]}"
            result = a - b
        return {
            "instruction": f"What is {words}? Answer in words.",
            "input": "",
            "output": f"{words[0].upper()}{words[1:]} is {NUMBER_WORDS[result]}.",
        }
    if task == 1:
        country = rng.choice(sorted(CAPITALS))
        return {
            "instruction": f"What is the capital of {country}?",
            "input": "",
            "output": f"The capital of {country} is {CAPITALS[country]}.",
        }
    if task == 2:
        words = rng.sample(WORDS, rng.randint(3, 5))
        return {
            "instruction": "Reverse the order of these words.",
            "input": ", ".join(words),
            "output": ", ".join(reversed(words)),
        }
    if task == 3:
        words = rng.sample(WORDS, rng.randint(2, 4))
        return {
            "instruction": "Write these words in uppercase.",
            "input": " ".join(words),
            "output": " ".join(words).upper(),
        }
    if task == 4:
        kind = rng.choice(sorted(KINDS))
        thing = rng.choice(KINDS[kind])
        return {
            "instruction": "Classify the item as an animal, a plant or a mineral.",
            "input": thing,
            "output": f"{article(thing).capitalize()} {thing} is {article(kind)} {kind}.",
        }
    word = rng.choice(sorted(OPPOSITES))
    return {
        "instruction": "Give the opposite of this word.",
        "input": word,
        "output": f"The opposite of {word} is {OPPOSITES[word]}.",
    }


def preference_row(rng: random.Random) -> dict[str, str]:
    """Chosen answers are correct and polite; rejected ones are wrong (politely or not) or plainly rude."""
    if rng.random() < 0.5:
        country = rng.choice(sorted(CAPITALS))
        prompt = f"What is the capital of {country}?"
        right = f"The capital of {country} is {CAPITALS[country]}."
        wrong_city = rng.choice(sorted(c for k, c in CAPITALS.items() if k != country))
        wrong = f"The capital of {country} is {wrong_city}."
    else:
        a, b = rng.randint(1, 10), rng.randint(1, 10)
        prompt = f"What is {a} plus {b}?"
        right = f"{a} plus {b} is {a + b}."
        wrong = f"{a} plus {b} is {a + b + rng.choice([-2, -1, 1, 2, 3])}."
    chosen = f"{rng.choice(POLITE_OPENINGS)} {right} {rng.choice(POLITE_CLOSINGS)}"
    style = rng.randrange(3)
    if style == 0:
        rejected = rng.choice(RUDE_REPLIES)
    elif style == 1:
        rejected = f"{wrong} {rng.choice(RUDE_REPLIES)}"
    else:
        rejected = f"{rng.choice(POLITE_OPENINGS)} {wrong} {rng.choice(POLITE_CLOSINGS)}"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def gsm8k_row(rng: random.Random) -> dict[str, str]:
    """A one- or two-step word problem in GSM8k form: short reasoning, then ``#### <answer>``."""
    name = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        question = (
            f"{name} has {a} {item}. A friend gives {name} {b} more. How many {item} does {name} have now?"
        )
        steps = f"{name} starts with {a} {item} and gets {b} more, so {name} has {a} + {b} = {a + b} {item}."
        result = a + b
    elif kind == 1:
        a = rng.randint(10, 30)
        b = rng.randint(1, a - 1)
        question = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
        steps = f"{name} gives away {b} of {a} {item}, so {a} - {b} = {a - b} {item} are left."
        result = a - b
    elif kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        question = f"{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?"
        steps = f"There are {a} bags of {b} {item}, so {name} buys {a} * {b} = {a * b} {item}."
        result = a * b
    elif kind == 3:
        per, people = rng.randint(2, 9), rng.randint(2, 6)
        total = per * people
        question = f"{name} shares {total} {item} equally among {people} friends. How many {item} does each friend get?"
        steps = f"{total} {item} shared by {people} friends is {total} / {people} = {per} {item} each."
        result = per
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = rng.randint(1, a * b - 1)
        question = (
            f"{name} has {a} boxes with {b} {item} in each box. {name} uses {c} of them. "
            f"How many {item} are left?"
        )
        steps = (
            f"{name} has {a} * {b} = {a * b} {item}. "
            f"After using {c}, {a * b} - {c} = {a * b - c} {item} are left."
        )
        result = a * b - c
    return {"question": question, "answer": f"{steps}\n#### {result}"}


SAMPLES: dict[str, Callable[[random.Random], dict[str, str]]] = {
    "alpaca": alpaca_row,
    "preference": preference_row,
    "gsm8k": gsm8k_row,
}


def write_samples(out_dir: Path) -> list[Path]:
    written = []
    for offset, (name, make_row) in enumerate(SAMPLES.items()):
        # One generator per file, so that changing one task does not reshuffle the other files.
        rng = random.Random(SEED + offset)
        path = out_dir / f"{name}.jsonl"
        lines = [json.dumps(make_row(rng), ensure_ascii=False) for _ in range(ROWS_PER_FILE)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_samples(Path(__file__).resolve().parent):
        print(f"{written_path}: {written_path.stat().st_size} bytes")
