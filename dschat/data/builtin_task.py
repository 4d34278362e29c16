"""The builtin task: "name some <category>" with a ground-truth judge.

Every prompt asks for members of one category (fruits, animals, ...). The judge scores a response by

    precision = distinct correct items / all items        (wrong, duplicate or empty items cost)
    coverage  = min(distinct correct items, TARGET) / TARGET
    judge     = precision * coverage                      in [0, 1]

so the best answer lists TARGET distinct members of the category and nothing else. The chosen answers in
the dataset are correct but short (1-4 items, mostly 2), so imitation tops out well below 1: mean chosen
judge ~0.39. They list items in the category's catalogue order (the order of `CATEGORIES`), as a
catalogue would; the judge ignores order, but the convention lets a tiny model avoid repeats with a
local rule (each item comes after the previous one) instead of remembering the whole list. Rejected
answers are derived from the chosen one by dropping an item, swapping an item for a wrong-category word,
repeating an item, answering another category, or not answering, and so always score strictly lower. Two
kinds copy the mistakes a pretrained model makes: a real member of the category that is not in the
catalogue (`OUTSIDE`: "strawberry" for fruits), and a plural ("onions"); the judge counts both as wrong.
The longest chosen lists are mostly rejected as themselves minus one item (`DROP_SHARE`), so that a reward
model learns what a fourth correct item is worth, not only a second or third.
RLHF has to learn from the reward model that longer correct lists are better to go beyond what it
imitated. Held-out (eval) prompts come from a disjoint pool of prompt texts.
"""

from __future__ import annotations

import random
import re

TARGET_ITEMS = 6
DEFAULT_SEED = 1234
NUM_TRAIN_ROWS = 12000
NUM_EVAL_ROWS = 600

CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruits": ("apple", "pear", "plum", "banana", "cherry", "grape", "lemon", "mango", "peach", "melon",
               "orange", "kiwi"),
    "animals": ("dog", "cat", "horse", "lion", "tiger", "zebra", "wolf", "bear", "rabbit", "mouse",
                "camel", "goat"),
    "colors": ("red", "blue", "green", "yellow", "purple", "black", "white", "brown", "pink", "gray",
               "violet", "gold"),
    "tools": ("hammer", "saw", "drill", "wrench", "chisel", "pliers", "shovel", "rake", "axe", "file",
              "clamp", "level"),
    "vehicles": ("car", "bus", "train", "truck", "bicycle", "boat", "plane", "tram", "taxi", "ship",
                 "van", "scooter"),
    "sports": ("tennis", "soccer", "golf", "rugby", "hockey", "boxing", "rowing", "cricket", "skiing",
               "surfing", "judo", "polo"),
    "instruments": ("piano", "violin", "guitar", "drum", "flute", "harp", "cello", "trumpet", "organ",
                    "banjo", "oboe", "tuba"),
    "vegetables": ("carrot", "potato", "onion", "pea", "bean", "leek", "cabbage", "spinach", "celery",
                   "radish", "turnip", "corn"),
    "countries": ("france", "spain", "italy", "japan", "china", "peru", "chile", "egypt", "kenya",
                  "norway", "canada", "mexico"),
    "metals": ("iron", "copper", "silver", "zinc", "tin", "lead", "nickel", "cobalt", "platinum",
               "aluminum", "titanium", "chrome"),
    "birds": ("eagle", "owl", "sparrow", "robin", "crow", "duck", "swan", "parrot", "pigeon", "hawk",
              "falcon", "heron"),
    "furniture": ("chair", "table", "sofa", "bed", "desk", "shelf", "stool", "bench", "cabinet",
                  "dresser", "couch", "wardrobe"),
}

# Real members of each category that are not in its catalogue: what a pretrained model says that the judge
# counts as wrong. No word here is in any catalogue.
OUTSIDE: dict[str, tuple[str, ...]] = {
    "fruits": ("strawberry", "fig", "lime", "papaya", "apricot", "coconut"),
    "animals": ("elephant", "monkey", "giraffe", "fox", "deer", "sheep"),
    "colors": ("beige", "teal", "navy", "maroon", "cyan", "magenta"),
    "tools": ("screwdriver", "knife", "rope", "ladder", "scissors", "tape"),
    "vehicles": ("motorcycle", "subway", "helicopter", "jeep", "wagon", "tractor"),
    "sports": ("basketball", "baseball", "swimming", "volleyball", "cycling", "karate"),
    "instruments": ("saxophone", "clarinet", "ukulele", "accordion", "xylophone", "bagpipes"),
    "vegetables": ("tomato", "eggplant", "kale", "zucchini", "lettuce", "broccoli"),
    "countries": ("germany", "brazil", "india", "greece", "sweden", "australia"),
    "metals": ("steel", "bronze", "brass", "magnesium", "tungsten", "mercury"),
    "birds": ("penguin", "flamingo", "pelican", "seagull", "stork", "peacock"),
    "furniture": ("lamp", "ottoman", "armchair", "bookcase", "futon", "nightstand"),
}

NAMES = ("Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gia", "Hugo", "Ivy", "Jack", "Kim", "Leo", "Mia",
         "Ned", "Olga", "Paul", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wes", "Xena", "Yuri", "Zoe",
         "Alma", "Bruno", "Cleo", "Dora", "Elio", "Fay", "Gus", "Hana", "Igor", "Jade")
GREETINGS = ("Hi, I am {name}.", "Hello, my name is {name}.", "Hey, {name} here.", "Good day, I am {name}.")
REQUESTS = ("Name some {cat}.", "Can you list a few {cat}?", "What are some {cat}?",
            "Please tell me some {cat}.", "Give me a list of {cat}.", "Which {cat} do you know?")

# How many items a chosen answer lists: mostly 2, so greedy imitation stops early.
CHOSEN_LENGTH_WEIGHTS = {1: 0.15, 2: 0.45, 3: 0.25, 4: 0.15}
_REFUSAL = "I do not know."
REJECTION_KINDS = ("drop", "wrong", "repeat", "extra_repeat", "extra_wrong", "other_category", "refuse",
                   "outside", "extra_outside", "plural")
REJECTION_WEIGHTS = (4, 1, 2, 1, 1, 1, 1, 2, 1, 1)
# The share of chosen lists of each length whose rejected answer is that list minus one item, before the kinds
# above are drawn: as many "4 correct items beat 3" pairs as "2 beat 1", so that a reward model pays for every
# further correct item up to the longest demonstrations, not only for the first two or three.
DROP_SHARE = {3: 0.4, 4: 0.6}


def make_prompt(name: str, greeting: str, request: str, cat: str) -> str:
    """One prompt in DeepSpeed-Chat's " Human: ... Assistant:" form."""
    return f"Human: {greeting.format(name=name)} {request.format(cat=cat)} Assistant:"


def format_items(items: list[str]) -> str:
    """The answer text for a list of items (leading space, as DeepSpeed-Chat's responses have)."""
    return " " + (", ".join(items) + "." if items else _REFUSAL)


def category_of(prompt: str) -> str | None:
    """The category a builtin prompt asks about (the last one named), or None."""
    found = [(m.start(), cat) for cat in CATEGORIES for m in re.finditer(rf"\b{cat}\b", prompt.lower())]
    return max(found)[1] if found else None


def parse_items(response: str) -> list[str]:
    """Split a response into list items; text after a new "Human:" turn is ignored."""
    text = response.split("Human:")[0].strip().lower()
    if not text:
        return []
    text = text.rstrip(".!? ")
    return [re.sub(r"[^a-z ]", "", item).strip() for item in text.split(",")]


def judge(prompt: str, response: str) -> float:
    """Ground-truth quality of `response` to a builtin `prompt`, in [0, 1] (see module docstring)."""
    cat = category_of(prompt)
    items = parse_items(response)
    if cat is None or not items:
        return 0.0
    correct = {item for item in items if item in CATEGORIES[cat]}
    precision = len(correct) / len(items)
    coverage = min(len(correct), TARGET_ITEMS) / TARGET_ITEMS
    return precision * coverage


ITEM_KINDS = ("items", "correct", "other_category", "outside", "repeats")
_CATALOGUE_WORDS = frozenset(word for words in CATEGORIES.values() for word in words)


def item_counts(prompt: str, response: str) -> dict[str, int]:
    """What a response to a builtin `prompt` lists: all items, and how many are distinct catalogue members
    of the asked category, members of another category, outside every catalogue, or repeats."""
    cat = category_of(prompt)
    counts = dict.fromkeys(ITEM_KINDS, 0)
    seen: set[str] = set()
    for item in parse_items(response):
        counts["items"] += 1
        if item in seen:
            counts["repeats"] += 1
        elif cat is not None and item in CATEGORIES[cat]:
            counts["correct"] += 1
        elif item in _CATALOGUE_WORDS:
            counts["other_category"] += 1
        else:
            counts["outside"] += 1
        seen.add(item)
    return counts


def plural(word: str) -> str:
    """The English plural of a catalogue word ("peach" -> "peaches", "bus" -> "buses", "pea" -> "peas")."""
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def catalogue_sample(rng: random.Random, cat: str, k: int) -> list[str]:
    """`k` distinct members of `cat`, drawn at random and listed in catalogue order."""
    return [CATEGORIES[cat][i] for i in sorted(rng.sample(range(len(CATEGORIES[cat])), k))]


def _prompt_pools(seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """All (prompt, category) pairs, split into disjoint train and held-out pools."""
    pool = [(make_prompt(n, g, r, c), c) for n in NAMES for g in GREETINGS for r in REQUESTS for c in CATEGORIES]
    random.Random(seed).shuffle(pool)
    n_eval = len(pool) // 10
    return pool[n_eval:], pool[:n_eval]


def _rejected_for(rng: random.Random, cat: str, chosen: list[str]) -> list[str] | None:
    """A strictly worse answer derived from `chosen` (None means the refusal).

    Some rejected answers are longer than the chosen one (an extra repeated or wrong item), so that a
    reward model learns that only distinct correct items pay, not length; they are never longer than the
    longest chosen answers.
    """
    others = [w for c, words in CATEGORIES.items() if c != cat for w in words]
    # Mostly "one item fewer", so that the reward model learns that every distinct correct item counts.
    kind = rng.choices(REJECTION_KINDS, REJECTION_WEIGHTS)[0]
    if rng.random() < DROP_SHARE.get(len(chosen), 0.0):
        kind = "drop"
    if kind.startswith("extra_") and len(chosen) == max(CHOSEN_LENGTH_WEIGHTS):
        # No list length may appear only among rejected answers, or the reward model learns that length
        # itself is bad and cannot reward correct lists longer than the demonstrations.
        kind = kind.removeprefix("extra_")
    out = list(chosen)
    if kind == "drop" and len(chosen) > 1:
        del out[rng.randrange(len(out))]
    elif kind == "repeat" and len(chosen) > 1:
        i = rng.randrange(1, len(out))
        out[i] = out[rng.randrange(i)]
    elif kind == "extra_repeat":
        out.insert(rng.randrange(1, len(out) + 1), rng.choice(chosen))
    elif kind == "extra_wrong":
        out.insert(rng.randrange(len(out) + 1), rng.choice(others))
    elif kind == "other_category":
        other = rng.choice([c for c in CATEGORIES if c != cat])
        out = catalogue_sample(rng, other, len(chosen))
    elif kind == "refuse":
        return None
    elif kind == "outside":
        out[rng.randrange(len(out))] = rng.choice(OUTSIDE[cat])
    elif kind == "extra_outside":
        out.insert(rng.randrange(len(out) + 1), rng.choice(OUTSIDE[cat]))
    elif kind == "plural":
        i = rng.randrange(len(out))
        out[i] = plural(out[i])
    else:
        out[rng.randrange(len(out))] = rng.choice(others)
    return out


def _rows(pool: list[tuple[str, str]], n: int, rng: random.Random, rejection_rng: random.Random) -> list[dict[str, str]]:
    """`n` prompt/chosen/rejected rows drawn from `pool` (cycling through it in shuffled order).

    Rejections draw from their own RNG, so changing how rejected answers are made leaves the prompts,
    the chosen answers and therefore the builtin tokenizer unchanged.
    """
    rows = []
    lengths, weights = zip(*CHOSEN_LENGTH_WEIGHTS.items())
    for i in range(n):
        prompt, cat = pool[i % len(pool)]
        chosen = catalogue_sample(rng, cat, rng.choices(lengths, weights)[0])
        rejected = _rejected_for(rejection_rng, cat, chosen)
        rows.append({"prompt": prompt, "chosen": format_items(chosen),
                     "rejected": format_items(rejected or [])})
    return rows


def builtin_dataset(seed: int = DEFAULT_SEED, num_train: int = NUM_TRAIN_ROWS,
                    num_eval: int = NUM_EVAL_ROWS) -> dict[str, list[dict[str, str]]]:
    """The builtin pairwise dataset: {"train": rows, "eval": rows}, deterministic in `seed`."""
    train_pool, eval_pool = _prompt_pools(seed)
    rng, rejection_rng = random.Random(seed + 1), random.Random(seed + 2)
    return {"train": _rows(train_pool, num_train, rng, rejection_rng),
            "eval": _rows(eval_pool, num_eval, rng, rejection_rng)}


def heldout_prompts(seed: int = DEFAULT_SEED, n: int = 64) -> list[str]:
    """`n` distinct held-out prompts (never in any training split) for judge evaluation."""
    _, eval_pool = _prompt_pools(seed)
    return [p for p, _ in eval_pool[:n]]


def corpus_text(seed: int = DEFAULT_SEED) -> list[str]:
    """The texts the builtin tokenizer is trained on: prompts with chosen answers, and every item word."""
    data = builtin_dataset(seed)
    texts = [r["prompt"] + r["chosen"] for split in data.values() for r in split]
    return texts + [" ".join(words) for words in CATEGORIES.values()] + [format_items([])]


def heldout_chosen_judge(n: int = 64, seed: int = DEFAULT_SEED) -> float:
    """Mean judge score of the dataset's chosen answers to the first `n` held-out prompts."""
    rows = builtin_dataset(seed)["eval"][:n]  # eval row i asks held-out prompt i
    assert [r["prompt"] for r in rows] == heldout_prompts(seed, n)
    return sum(judge(r["prompt"], r["chosen"]) for r in rows) / len(rows)
