"""The reward registry: names -> factories of reward functions, and loading a user's own function."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dschat.runtime.errors import FlagError

RewardFn = Callable[..., Any]  # fn(prompts, completions, **row_fields) -> list[float | None]


@dataclass
class RewardContext:
    """What a reward factory may need: step 3's lengths and, for `reward_model`, the model and its settings."""

    max_answer_seq_len: int = 64
    overlong_buffer_len: int | None = None
    reward_model: Any = None  # an engine or module with a one-label score head
    reward_stats: dict[str, float] = field(default_factory=dict)
    normalize_reward: bool = True
    clip_reward_value: float | None = None
    padding_free: bool = False  # the reward model's forward packed (--padding_free)


@dataclass(frozen=True)
class RewardSpec:
    """A reward by name: `make(context)` gives the function.

    binary: its values are 0 or 1, so pass@k is reported for it (None for a user's function: decided from the
    values of each evaluation); needs_model: step 3 must build a reward model;
    needs_tokens: it is also given the rollout's `seq` and `attention_mask` tensors.
    """

    name: str
    make: Callable[[RewardContext], RewardFn]
    binary: bool | None = False
    needs_model: bool = False
    needs_tokens: bool = False


REWARDS: dict[str, RewardSpec] = {}


def register_reward(name: str, *, binary: bool = False, needs_model: bool = False, needs_tokens: bool = False,
                    factory: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: register a reward function (or, with factory=True, a function of the RewardContext that
    returns one) under `name`, the value `--reward_fn` takes."""
    def wrap(fn: Callable) -> Callable:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is registered twice")
        make = fn if factory else (lambda _ctx: fn)
        REWARDS[name] = RewardSpec(name, make, binary, needs_model, needs_tokens)
        return fn
    return wrap


def is_user_function(spec: str) -> bool:
    """Whether a --reward_fn value names a user's function (`file.py:name` or `module:name`), not a registered one."""
    return ":" in spec


def load_user_function(spec: str) -> RewardFn:
    """The function `spec` names: `path/to/file.py:name` or `package.module:name` (FlagError naming it otherwise)."""
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        raise FlagError(f"--reward_fn {spec!r}: expected a registered name ({', '.join(sorted(REWARDS))}), "
                        f"path/to/file.py:function or package.module:function")
    try:
        if where.endswith(".py") or Path(where).is_file():
            path = Path(where).expanduser().resolve()
            if not path.is_file():
                raise FlagError(f"--reward_fn {spec!r}: no such file {where}")
            module_name = f"dschat_user_reward_{abs(hash(str(path)))}"
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except FlagError:
        raise
    except Exception as err:  # the user's module failed to import: say which and why, not a traceback
        raise FlagError(f"--reward_fn {spec!r}: importing {where} failed: {type(err).__name__}: {err}") from err
    fn = getattr(module, name, None)
    if fn is None:
        raise FlagError(f"--reward_fn {spec!r}: {where} has no attribute {name!r}")
    if not callable(fn):
        raise FlagError(f"--reward_fn {spec!r}: {name} is a {type(fn).__name__}, not a function")
    return fn


def accepted_kwargs(signature: inspect.Signature | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments a function of this `signature` accepts (all of them when it takes **kwargs, or has
    no signature), as TRL's calling convention passes every column; a required parameter missing from `kwargs` is
    left for the call to report."""
    if signature is None:  # builtins and some callables have no signature: pass everything
        return kwargs
    params = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}
