"""A task with checkable answers for a real base model: few-shot single-digit addition and capital cities.

Gemma 3 270M answers most of them (greedy); a depth-pruned copy answers none. Each record is a few-shot prompt and
its one-word answer; a response is right when its first word is the answer:

    records = task_records("eval")                    # {"prompt": "3 + 4 = 7\\n...\\n6 + 2 =", "answer": "8"}
    task_accuracy(records, responses)                 # share of responses whose first word is the answer

The train and eval splits share no addition pair and no country.
"""

from __future__ import annotations

import random
import re

CAPITALS = (("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
            ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Sweden", "Stockholm"), ("Norway", "Oslo"),
            ("Finland", "Helsinki"), ("Ireland", "Dublin"), ("China", "Beijing"), ("Thailand", "Bangkok"),
            ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Cuba", "Havana"), ("Hungary", "Budapest"),
            ("Denmark", "Copenhagen"), ("Belgium", "Brussels"), ("Turkey", "Ankara"), ("Iran", "Tehran"),
            ("Argentina", "Buenos"), ("Chile", "Santiago"), ("Colombia", "Bogotá"), ("Mexico", "Mexico"),
            ("India", "New"), ("Indonesia", "Jakarta"), ("Vietnam", "Hanoi"))
SHOTS = 3
_FIRST_WORD = re.compile(r"\s*([^\W_]+)")


def _split(items: list, split: str, seed: int) -> list:
    """A fixed shuffle of `items`: its first third is the eval split, the rest the train split."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    items = list(items)
    random.Random(seed).shuffle(items)
    cut = len(items) // 3
    return items[:cut] if split == "eval" else items[cut:]


def task_records(split: str, seed: int = 0) -> list[dict[str, str]]:
    """Few-shot addition (a + b, digits 1–9) and capital-city records of one split; the shots come from the train
    split, so an eval answer never appears in its own prompt."""
    pairs = _split([(a, b) for a in range(1, 10) for b in range(1, 10)], split, seed)
    countries = _split(list(CAPITALS), split, seed)
    shot_pairs = _split([(a, b) for a in range(1, 10) for b in range(1, 10)], "train", seed)
    shot_countries = _split(list(CAPITALS), "train", seed)
    rng = random.Random(seed + (split == "eval"))
    records = []
    for a, b in pairs:
        shots = [p for p in rng.sample(shot_pairs, SHOTS + 1) if p != (a, b)][:SHOTS]
        prompt = "".join(f"{x} + {y} = {x + y}\n" for x, y in shots) + f"{a} + {b} ="
        records.append({"prompt": prompt, "answer": str(a + b), "task": "addition"})
    for country, capital in countries:
        shots = [c for c in rng.sample(shot_countries, SHOTS + 1) if c[0] != country][:SHOTS]
        prompt = "".join(f"The capital of {c} is {k}.\n" for c, k in shots) + f"The capital of {country} is"
        records.append({"prompt": prompt, "answer": capital, "task": "capitals"})
    return records


def first_word(response: str) -> str:
    """The response's first word (letters or digits), or '' when it has none."""
    match = _FIRST_WORD.match(response)
    return match.group(1) if match else ""


def task_accuracy(records: list[dict], responses: list[str]) -> float:
    """The share of responses whose first word is the record's answer."""
    if len(records) != len(responses) or not records:
        raise ValueError(f"need one response per record, got {len(responses)} for {len(records)} records")
    return sum(first_word(r) == rec["answer"] for rec, r in zip(records, responses)) / len(records)
