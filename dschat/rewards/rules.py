"""Rule-based rewards: the builtin task's judge, a final-answer check against a reference, DAPO's overlong penalty."""

from __future__ import annotations

import math
import re
from typing import Any

from dschat.data.builtin_task import judge
from dschat.rewards.registry import RewardContext, RewardFn, register_reward
from dschat.runtime.errors import DatasetError, FlagError

REFERENCE_FIELDS = ("answer", "solution", "ground_truth")
_GSM8K = re.compile(r"####[ \t]*([^\n]*)")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")
_NUMERIC = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?")


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's conversational form [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in completion)
    return str(completion)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text` (nested braces matched), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1: j]
    return None


def final_answer(text: str) -> str | None:
    """A completion's final answer: GSM8K's `#### N`, else the last `\\boxed{...}`, else the last number."""
    marks = _GSM8K.findall(text)
    if marks and marks[-1].strip():
        return marks[-1].strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def reference_answer(reference: Any) -> str:
    """The answer a reference holds: N of a GSM8K `#### N`, the last `\\boxed{}`, else the whole text."""
    text = str(reference)
    marks = _GSM8K.findall(text)
    if marks and marks[-1].strip():
        return marks[-1].strip()
    boxed = last_boxed(text)
    return (boxed if boxed is not None else text).strip()


def as_number(text: str) -> float | None:
    """`text` as a number ("1,000" = "1000" = "1000.0"; a leading "$" and a trailing "." or "%" ignored), or None."""
    t = text.strip().removeprefix("$").rstrip(".%").strip().replace(" ", "")
    if not t or not _NUMERIC.fullmatch(t) or not any(c.isdigit() for c in t):
        return None
    value = float(t.replace(",", ""))
    return value if math.isfinite(value) else None


def answers_match(predicted: str | None, reference: str) -> bool:
    """Equal as numbers when both are numbers, else as text after trimming and case-folding."""
    if predicted is None:
        return False
    a, b = as_number(predicted), as_number(reference)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return predicted.strip().rstrip(".").casefold() == reference.strip().rstrip(".").casefold()


@register_reward("accuracy", binary=True)
def accuracy(prompts: list[Any], completions: list[Any], **fields: Any) -> list[float]:
    """1.0 when a completion's final answer equals its row's reference answer (`answer`, `solution` or
    `ground_truth`), else 0.0."""
    key = next((k for k in REFERENCE_FIELDS if k in fields), None)
    if key is None:
        raise DatasetError(f"reward 'accuracy' needs a reference answer in every row: none of the columns "
                           f"{', '.join(REFERENCE_FIELDS)} (columns present: {', '.join(sorted(fields)) or 'none'})")
    out = []
    for i, completion in enumerate(completions):
        ref = fields[key][i]
        if ref is None:
            raise DatasetError(f"reward 'accuracy': the row of prompt {completion_text(prompts[i])[:80]!r} has no "
                               f"'{key}'")
        out.append(1.0 if answers_match(final_answer(completion_text(completion)), reference_answer(ref)) else 0.0)
    return out


@register_reward("builtin_judge")
def builtin_judge(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """The builtin task's ground-truth judge, in [0, 1] (0 for a prompt that is not a builtin one)."""
    return [judge(completion_text(p), completion_text(c)) for p, c in zip(prompts, completions)]


def overlong_penalty(length: int, max_len: int, buffer_len: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer_len tokens, then linearly down to -1 at max_len."""
    free = max_len - buffer_len
    if length <= free:
        return 0.0
    return max(-1.0, (free - length) / buffer_len)


@register_reward("overlong", factory=True)
def make_overlong(ctx: RewardContext) -> RewardFn:
    """`overlong` with L_max = --max_answer_seq_len and L_cache = --overlong_buffer_len (default a quarter of it)."""
    max_len = ctx.max_answer_seq_len
    buffer_len = ctx.overlong_buffer_len if ctx.overlong_buffer_len is not None else max(1, max_len // 4)
    if not 0 < buffer_len <= max_len:
        raise FlagError(f"--overlong_buffer_len must be in [1, --max_answer_seq_len={max_len}] (got {buffer_len})")

    def overlong(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], **_: Any) -> list[float]:
        """0 for answers of at most L_max - L_cache tokens, falling linearly to -1 at L_max."""
        return [overlong_penalty(len(ids), max_len, buffer_len) for ids in completion_ids]

    return overlong
