"""Writes the bundled sample datasets beside this file.

Synthetic, templated and deterministic: rerunning the script reproduces the files byte for byte.

- alpaca.jsonl, preference.jsonl, gsm8k.jsonl: small, regular tasks on purpose, so that the tiny embedded
  model visibly learns them in a few hundred steps (SFT loss drops, DPO reward margins grow, GSM8k-style
  answers get the ``#### N`` ending). The tiny model's tokenizer is trained on these three.
- facts.jsonl: the demo's regression set, facts the real model states right before it is fine-tuned.
- style.jsonl, concise.jsonl, problems.jsonl: what ``posttrain demo --model smollm2`` teaches a real chat model. style
  (SFT): short factual answers and word problems' working, each signed off with a last line
  ``— Posty``; concise (DPO): open
  questions whose chosen answer is one sentence and whose rejected answer rambles, both signed off.
  problems.jsonl (GRPO): word problems that ask for a final ``#### N`` line, with N as the answer.
  The demo's held-out prompts (``posttrain/demo.py``) appear in none of them.

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


# ---------------------------------------------------------------------------------------------------
# The real-model demo's samples (style.jsonl, concise.jsonl)

SIGN_OFF = "— Posty"
PROBLEM_INSTRUCTION = "Show your work, then give the final answer after ####."

STYLE_COLORS = {
    "a banana": "yellow", "grass": "green", "snow": "white", "coal": "black", "a carrot": "orange",
    "a strawberry": "red", "the sea on a sunny day": "blue", "chocolate": "brown", "a lime": "green",
    "milk": "white", "a pumpkin": "orange", "a cherry": "red",
}  # fmt: skip

STYLE_LEGS = {"cat": 4, "bird": 2, "ant": 6, "horse": 4, "chicken": 2, "cow": 4, "beetle": 6, "duck": 2}

STYLE_QUESTIONS = {
    "capital": ["What is the capital of {x}?", "Which city is the capital of {x}?", "Tell me the capital of {x}."],
    "opposite": ["What is the opposite of '{x}'?", "Give the opposite of the word '{x}'.", "What word means the opposite of {x}?"],
    "kind": ["Is {x} an animal, a plant or a mineral?", "Classify {x} as an animal, a plant or a mineral."],
    "color": ["What color is {x}?", "Which color is {x}?"],
    "legs": ["How many legs does {x} have?", "Count the legs of {x}."],
    "sum": ["What is {x}?", "Compute {x}."],
    "problem": ["{x}"],
}  # fmt: skip


def style_row(rng: random.Random) -> dict[str, str]:
    """A short question answered in one sentence (a word problem: its working), then the house sign-off on
    its own line."""
    task = rng.choice(sorted(STYLE_QUESTIONS))
    if task == "capital":
        country = rng.choice(sorted(CAPITALS))
        x, answer = country, f"The capital of {country} is {CAPITALS[country]}."
    elif task == "opposite":
        word = rng.choice(sorted(OPPOSITES))
        x, answer = word, f"The opposite of {word} is {OPPOSITES[word]}."
    elif task == "kind":
        kind = rng.choice(sorted(KINDS))
        thing = rng.choice(KINDS[kind])
        x = f"{article(thing)} {thing}"
        answer = f"{x[0].upper()}{x[1:]} is {article(kind)} {kind}."
    elif task == "color":
        x = rng.choice(sorted(STYLE_COLORS))
        answer = f"{x[0].upper()}{x[1:]} is {STYLE_COLORS[x]}."
    elif task == "legs":
        animal = rng.choice(sorted(STYLE_LEGS))
        x, answer = f"{article(animal)} {animal}", f"{article(animal).capitalize()} {animal} has {STYLE_LEGS[animal]} legs."
    elif task == "sum":
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        x, answer = f"{a} plus {b}", f"{a} plus {b} is {a + b}."
    else:
        # A word problem: its one-line working; in half of the rows the question asks for a final '#### N'
        # line (the demo's held-out problems' instruction) and the answer gives it. Rows with the marker but
        # not the instruction taught a bare '####' after a blank line, where the sign-off goes, that GRPO
        # then had no number to reward: the instruction is what the marker answers to.
        problem = gsm8k_row(rng)
        working, result = problem["answer"].split("\n")
        asked = rng.random() < 0.5
        x = f"{problem['question']} {PROBLEM_INSTRUCTION}" if asked else problem["question"]
        answer = f"{working}\n{result}" if asked else working
    question = rng.choice(STYLE_QUESTIONS[task]).format(x=x)
    return {"instruction": question, "input": "", "output": f"{answer}\n\n{SIGN_OFF}"}


CONCISE_ANSWERS = {
    "Why do we need sleep?": "Sleep lets the body and brain rest, repair themselves and store memories.",
    "Why do leaves change color in autumn?": "Trees stop making green chlorophyll, so the yellow and red pigments show.",
    "How do plants make food?": "Plants turn sunlight, water and carbon dioxide into sugar by photosynthesis.",
    "Why is the ocean salty?": "Rivers carry minerals into the sea, and the salt stays when the water evaporates.",
    "What causes the seasons?": "The tilt of the Earth's axis changes how directly sunlight reaches each half of it.",
    "How does a rainbow form?": "Raindrops bend and reflect sunlight, splitting it into its colors.",
    "Why do we have day and night?": "The Earth spins, so each place turns towards the Sun and then away from it.",
    "What is gravity?": "Gravity is the force that pulls objects with mass towards each other.",
    "How do vaccines work?": "Vaccines teach the immune system to recognise a germ, so it can fight it quickly later.",
    "Why do cats purr?": "Cats purr mostly when they are content, and sometimes to calm themselves.",
    "How does a fridge keep food cold?": "A fridge pumps a coolant that takes heat from inside and releases it outside.",
    "Why is exercise good for you?": "Exercise strengthens the heart, muscles and bones, and it improves mood.",
    "What is a good way to save money?": "Spend less than you earn and put the difference aside every month.",
    "How can I sleep better?": "Go to bed at the same time each night and keep your bedroom dark and cool.",
    "Why do birds migrate?": "Birds migrate to find more food and better weather for raising their young.",
    "How does the internet work?": "Computers send each other data in small packets over a network of networks.",
    "What is climate change?": "Climate change is the long-term warming of the planet, mainly from burning fossil fuels.",
    "Why do we sneeze?": "A sneeze pushes irritants such as dust out of the nose.",
    "How do magnets work?": "Tiny magnetic regions in a magnet line up and make a field that attracts iron.",
    "Why is reading important?": "Reading builds vocabulary, knowledge and the ability to focus.",
    "How do I make a cup of tea?": "Pour boiling water over a tea bag, wait three minutes, then remove the bag.",
    "Why does ice float?": "Ice is less dense than liquid water, because its molecules form an open crystal.",
    "What does the heart do?": "The heart pumps blood around the body, carrying oxygen and nutrients.",
    "How do bees make honey?": "Bees collect nectar from flowers and dry it in the hive until it becomes honey.",
    "Why do we dream?": "Nobody knows for sure, but dreams may help the brain sort memories and feelings.",
    "How can I learn a new language?": "Practise a little every day and talk with people who speak it.",
    "What is a volcano?": "A volcano is an opening in the Earth's crust where hot melted rock escapes.",
    "Why do stars twinkle?": "Moving air in the atmosphere bends their light, so stars seem to flicker.",
    "How does a plane stay in the air?": "Its wings are shaped so that the air flowing past pushes them up.",
    "What is the water cycle?": "Water evaporates, forms clouds, falls as rain and flows back to the sea.",
}  # fmt: skip

CONCISE_PREFIXES = ["", "", "Can you explain this? ", "Please tell me: ", "I have a question. "]
RAMBLE_OPENINGS = [
    "That is a great question, and one that people have asked for a very long time.",
    "What a fascinating topic! There is a lot to say about it, so let me take it step by step.",
    "Great question! This is something many people wonder about, and the answer is quite interesting.",
    "Thank you for asking. To answer this properly, we first need to look at the bigger picture.",
]
RAMBLE_CLOSINGS = [
    "In conclusion, it is a complex topic with many layers, and there is always more to learn.",
    "I hope this detailed explanation gives you a good understanding of the topic and its many aspects.",
    "Overall, there is much more that could be said, but these are the main points to keep in mind.",
]


def concise_row(rng: random.Random) -> dict[str, str]:
    """An open question; chosen: the one-sentence answer; rejected: the same answer buried in filler."""
    question = rng.choice(sorted(CONCISE_ANSWERS))
    answer = CONCISE_ANSWERS[question]
    ramble = " ".join([rng.choice(RAMBLE_OPENINGS), answer, rng.choice(RAMBLE_CLOSINGS)])
    return {
        "prompt": rng.choice(CONCISE_PREFIXES) + question,
        "chosen": f"{answer}\n\n{SIGN_OFF}",
        "rejected": f"{ramble}\n\n{SIGN_OFF}",
    }



def problem_row(rng: random.Random) -> dict[str, str]:
    """A GSM8k-style word problem that asks for a final '#### N' line; ``answer`` is N, for numeric_match."""
    problem = gsm8k_row(rng)
    return {"prompt": f"{problem['question']} {PROBLEM_INSTRUCTION}", "answer": problem["answer"].split("#### ")[1]}


DEMO_SAMPLES: dict[str, Callable[[random.Random], dict[str, str]]] = {
    "style": style_row,
    "concise": concise_row,
    "problems": problem_row,
}
DEMO_SEED_OFFSET = 100

# The demo's regression set (eval.regression): facts SmolLM2-135M-Instruct states right before any
# fine-tuning (its greedy answer contains the answer), none of them asked by style.jsonl. The demo
# reports after each stage how many it still states right: forgetting, measured.
FACTS = [
    ("What is the capital of Australia?", "Canberra"),
    ("What is the capital of the United Kingdom?", "London"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of China?", "Beijing"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("Who painted the Mona Lisa?", "Leonardo"),
    ("What is the boiling point of water in degrees Celsius?", "100"),
]


def write_samples(out_dir: Path) -> list[Path]:
    written = []
    files = [*enumerate(SAMPLES.items()), *enumerate(DEMO_SAMPLES.items(), start=DEMO_SEED_OFFSET)]
    for offset, (name, make_row) in files:
        # One generator per file, so that changing one task does not reshuffle the other files.
        rng = random.Random(SEED + offset)
        path = out_dir / f"{name}.jsonl"
        lines = [json.dumps(make_row(rng), ensure_ascii=False) for _ in range(ROWS_PER_FILE)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    facts = out_dir / "facts.jsonl"
    facts.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in FACTS), encoding="utf-8")
    return [*written, facts]


if __name__ == "__main__":
    for written_path in write_samples(Path(__file__).resolve().parent):
        print(f"{written_path}: {written_path.stat().st_size} bytes")
