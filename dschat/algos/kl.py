"""KL between actor and reference: per-token estimators from samples, the exact KL from logits, and the
coefficient controllers of the KL penalty (fixed, or Ziegler et al. 2019's adaptive one)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def _kl_k1(log_ratio: Tensor) -> Tensor:
    return log_ratio


def _kl_k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio.square()


def _kl_k3(log_ratio: Tensor) -> Tensor:
    # (p_ref/p - 1) - log(p_ref/p): unbiased and always >= 0 under samples from the actor
    return torch.expm1(-log_ratio) + log_ratio


KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token [B, T] estimate of KL(actor || ref) from actor samples (Schulman k1/k2/k3); unmasked."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid choices: {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logprobs.float() - ref_logprobs.float())


def exact_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Exact per-position KL(actor || ref) over the vocabulary from [B, T, V] logits; returns [B, T] (>= 0)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


class FixedKLController:
    """Constant KL coefficient; update() is a no-op."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient stays fixed."""

    def state_dict(self) -> dict[str, Any]:
        """Serializable state for resume."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state produced by state_dict()."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller steering the observed KL towards `target` over `horizon` steps."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """value *= 1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon."""
        # clipping the error bounds how fast the coefficient can move on a noisy KL estimate
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        """Serializable state for resume."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state produced by state_dict()."""
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = int(state.get("horizon", self.horizon))


def make_kl_controller(
    kl_ctl: float, target_kl: float | None, kl_horizon: int
) -> FixedKLController | AdaptiveKLController:
    """Adaptive controller starting at kl_ctl when target_kl is given, else a fixed one."""
    if target_kl is None:
        return FixedKLController(kl_ctl)
    return AdaptiveKLController(kl_ctl, target_kl, kl_horizon)
