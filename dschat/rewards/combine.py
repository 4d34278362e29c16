"""Several rewards at once: call each with TRL's convention, check what it returns, weight and sum; pass@k."""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

from dschat.rewards import model, rules  # noqa: F401  (importing them registers the builtin rewards)
from dschat.rewards.registry import (
    REWARDS,
    RewardContext,
    RewardSpec,
    accepted_kwargs,
    is_user_function,
    load_user_function,
)
from dschat.runtime import dist
from dschat.runtime.errors import DschatError, FlagError, RewardFunctionError


@dataclass
class RewardBatch:
    """One rollout's completions with their prompts and row fields (the rollout's tensors for model rewards)."""

    prompts: list[Any]
    completions: list[Any]
    completion_ids: list[list[int]]
    fields: list[dict[str, Any]] = field(default_factory=list)
    seq: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def columns(self) -> dict[str, list[Any]]:
        """Every row field as a column (a list over the batch; None where a row lacks it), as TRL passes them."""
        names = dict.fromkeys(k for row in self.fields for k in row)
        return {k: [row.get(k) for row in self.fields] for k in names}


@dataclass
class RewardResult:
    """Each reward's values (None: no opinion) and the weighted total per completion."""

    values: dict[str, list[float | None]]
    total: torch.Tensor  # [B] fp32


def resolve_spec(value: str) -> RewardSpec:
    """The RewardSpec of one --reward_fn value: a registered reward, or a user's function loaded now."""
    if is_user_function(value):
        fn = load_user_function(value)
        return RewardSpec(getattr(fn, "__name__", value.rpartition(":")[2]), lambda _ctx: fn, binary=None)
    if value not in REWARDS:
        raise FlagError(f"--reward_fn {value!r}: not a registered reward ({', '.join(sorted(REWARDS))}) and not "
                        f"file.py:function or module:function")
    return REWARDS[value]


def check_values(name: str, values: Any, n: int) -> list[float | None]:
    """A reward function's return as n floats or None; anything else is a RewardFunctionError naming it."""
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().reshape(-1).tolist()
    elif hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardFunctionError(f"reward function {name!r} returned a {type(values).__name__}; it must return a "
                                  f"list with one number (or None) per completion ({n})")
    if len(values) != n:
        raise RewardFunctionError(f"reward function {name!r} returned {len(values)} values for {n} completions")
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if not isinstance(v, numbers.Real):
            raise RewardFunctionError(f"reward function {name!r} returned {v!r} ({type(v).__name__}) for completion "
                                      f"{i}: expected a number or None")
        if not math.isfinite(float(v)):
            raise RewardFunctionError(f"reward function {name!r} returned {v} for completion {i}: rewards must be "
                                      f"finite (None means 'no opinion')")
        out.append(float(v))
    return out


class RewardSet:
    """The rewards of --reward_fn with their --reward_weights; called once per rollout batch."""

    def __init__(self, specs: list[RewardSpec], weights: list[float], ctx: RewardContext):
        names = [s.name for s in specs]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise FlagError(f"--reward_fn: reward {dup!r} is named twice")
        if len(weights) != len(specs):
            raise FlagError(f"--reward_weights has {len(weights)} values for {len(specs)} --reward_fn entries")
        self.specs, self.weights = specs, [float(w) for w in weights]
        self.fns = [s.make(ctx) for s in specs]

    @classmethod
    def from_flags(cls, reward_fn: list[str], reward_weights: list[float] | None, ctx: RewardContext) -> RewardSet:
        """The set --reward_fn / --reward_weights ask for (weights default to 1 each)."""
        specs = [resolve_spec(v) for v in reward_fn]
        return cls(specs, reward_weights if reward_weights is not None else [1.0] * len(specs), ctx)

    @property
    def names(self) -> list[str]:
        """The rewards' names, in --reward_fn order."""
        return [s.name for s in self.specs]

    @property
    def needs_text(self) -> bool:
        """Whether any reward reads the completions' text (then rollouts are decoded)."""
        return any(not s.needs_tokens for s in self.specs)

    def binary(self, name: str, nonbinary_values: float) -> bool:
        """Whether pass@k applies to a reward: registered as 0/1-valued, or (a user's function) every value of
        this evaluation was 0 or 1."""
        spec = self.specs[self.names.index(name)]
        return spec.binary if spec.binary is not None else nonbinary_values == 0

    def _call(self, spec: RewardSpec, fn: Any, batch: RewardBatch) -> list[float | None]:
        kwargs: dict[str, Any] = {**batch.columns(), "prompts": batch.prompts, "completions": batch.completions,
                                  "completion_ids": batch.completion_ids}
        if spec.needs_tokens:
            kwargs |= {"seq": batch.seq, "attention_mask": batch.attention_mask}
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # builtins and some callables have none: nothing to check
            signature = None
        kwargs = accepted_kwargs(signature, kwargs)
        try:
            if signature is not None:
                signature.bind(**kwargs)
        except TypeError as err:
            raise FlagError(f"reward function {spec.name!r} cannot be called with the rows' columns "
                            f"({', '.join(sorted(batch.columns())) or 'none'}) and prompts/completions/"
                            f"completion_ids: {err}") from err
        try:
            values = fn(**kwargs)
        except DschatError:
            raise
        except Exception as err:
            raise RewardFunctionError(f"reward function {spec.name!r} raised {type(err).__name__}: {err} "
                                      f"{self._failing_row(fn, kwargs, len(batch.completions))}") from err
        return check_values(spec.name, values, len(batch.completions))

    @staticmethod
    def _failing_row(fn: Any, kwargs: dict[str, Any], n: int) -> str:
        """Which row makes `fn` raise (each row called alone), for the error message."""
        for i in range(n):
            one = {k: v[i: i + 1] if isinstance(v, list) and len(v) == n else v for k, v in kwargs.items()}
            try:
                fn(**one)
            except Exception:
                prompt = str(kwargs.get("prompts", ["?"] * n)[i])
                return f"on the row with prompt {prompt[:120]!r} (completion {str(kwargs['completions'][i])[:80]!r})"
        return f"on a batch of {n} rows (no single row fails alone)"

    def __call__(self, batch: RewardBatch) -> RewardResult:
        """Every reward's values and the weighted total; a reward with None for a row leaves it out of that
        row's sum. Model rewards run first on every rank, so a failing user function never leaves a collective
        unmatched; all ranks then learn whether any rank failed."""
        values: dict[str, list[float | None]] = {}
        error: Exception | None = None
        order = sorted(range(len(self.specs)), key=lambda i: not self.specs[i].needs_tokens)
        for i in order:
            try:
                values[self.specs[i].name] = self._call(self.specs[i], self.fns[i], batch)
            except DschatError as err:
                error = err
                break
        failed = dist.all_reduce_sum(torch.tensor([1.0 if error else 0.0], dtype=torch.float64)).item()
        if error is not None:
            raise error
        if failed:
            raise RewardFunctionError("a reward function failed on another rank (its error line is in that rank's output)")
        n = len(batch.completions)
        total = [sum(w * v[r] for w, v in ((w, values[s.name]) for s, w in zip(self.specs, self.weights))
                     if v[r] is not None) for r in range(n)]
        return RewardResult({s.name: values[s.name] for s in self.specs}, torch.tensor(total, dtype=torch.float32))


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(n: int) -> list[int]:
    """The k reported for n samples per prompt: 1, then powers of two below n, then n itself."""
    ks = [1]
    while ks[-1] * 2 < n:
        ks.append(ks[-1] * 2)
    return ks + ([n] if n > 1 else [])
