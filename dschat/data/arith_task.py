"""The builtin arithmetic task (`--data_path dschat/arith`): seeded word problems of one to three operations,
each a prompt-only row with its reference answer, for step 3 against the `accuracy` reward.

"Mia has 12 apples. She buys 7 more. Then she gives away 5. How many apples does Mia have now?" -> "14".
Train and held-out problems come from disjoint seeds and share no prompt text.
"""

from __future__ import annotations

import random

NAMES = ("Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gia", "Hugo", "Ivy", "Jack", "Kim", "Leo", "Mia", "Nina")
ITEMS = ("apples", "books", "coins", "pens", "stamps", "marbles", "cards", "shells", "stickers", "cookies")
ADD = ("buys {n} more", "finds {n} more", "gets {n} more from a friend", "is given {n} more")
SUB = ("gives away {n}", "loses {n}", "sells {n}", "uses {n}")
MUL = {2: "the number of {item} doubles", 3: "the number of {item} triples"}
NUM_TRAIN, NUM_EVAL, SEED = 4000, 200, 4321
INSTRUCTION = "Answer with the number only."


def _rows(seed: int, n: int, exclude: set[str]) -> list[dict[str, str]]:
    """n distinct problems from `seed` (none whose prompt is in `exclude`), as prompt-only rows with answers."""
    rng, rows, seen = random.Random(seed), [], set(exclude)
    while len(rows) < n:
        body, answer = word_problem(rng)
        prompt = f"Human: {body} {INSTRUCTION} Assistant:"
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "answer": str(answer)})
    return rows


def word_problem(rng: random.Random) -> tuple[str, int]:
    """A problem's full text (start value filled in, the question appended) and its answer."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = value = rng.randint(2, 20)
    sentences = []
    for i in range(rng.choice((1, 1, 2, 2, 3))):
        kind = rng.choice(("add", "add", "sub", "sub", "mul")) if value <= 60 else rng.choice(("add", "sub"))
        lead = "Then " if i else ""
        if kind == "add":
            n = rng.randint(1, 20)
            sentences.append(f"{lead}{name} {rng.choice(ADD).format(n=n)}.")
            value += n
        elif kind == "sub" and value > 1:
            n = rng.randint(1, value - 1)
            sentences.append(f"{lead}{name} {rng.choice(SUB).format(n=n)}.")
            value -= n
        else:
            k = rng.choice((2, 3))
            phrase = MUL[k].format(item=item)
            sentences.append(f"{lead}{phrase[0].upper() + phrase[1:] if not lead else phrase}.")
            value *= k
    text = f"{name} has {start} {item}. {' '.join(sentences)} How many {item} does {name} have now?"
    return text, value


def arith_dataset(seed: int = SEED, num_train: int = NUM_TRAIN, num_eval: int = NUM_EVAL) -> dict[str, list[dict]]:
    """{"train": rows, "eval": rows} of prompt-only problems with an "answer" column; eval prompts never in train."""
    held_out = _rows(seed + 1, num_eval, set())
    train = _rows(seed, num_train, {r["prompt"] for r in held_out})
    return {"train": train, "eval": held_out}
