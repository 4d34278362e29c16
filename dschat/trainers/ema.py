"""An exponential moving average of the actor (--enable_ema): an fp32 shadow of each trainable parameter.

The shadow lives on the CPU and holds what this rank stores of each parameter (its ZeRO-3 partition, else the
whole tensor), so under ZeRO-3 it is sharded like the actor and an update needs no gather. It is updated once
per optimizer step of the actor, not per micro-batch: a step of beta per micro-batch would be beta^GAS per
step (and twice that with PTX). Lerping in fp32 keeps the small (1 - beta) x (actor - ema) moves that a bf16
lerp rounds away (below half a bf16 step of the weight). Frozen parameters (a LoRA actor's base) never move,
so the EMA model is the actor with its trainable parameters replaced by the shadow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dschat.models.export import unwrap
from dschat.runtime import dist
from dschat.runtime.engine import local_tensor

EMA_BETA = 0.992  # DeepSpeed-Chat's


class ActorEMA:
    """fp32 CPU shadow of the actor engine's trainable parameters (this rank's part), one update per optimizer step."""

    def __init__(self, actor, beta: float = EMA_BETA):
        self.actor, self.beta = actor, beta
        self.params = {n: p for n, p in unwrap(actor).named_parameters() if p.requires_grad}
        self.shadow = {n: local_tensor(p).detach().to("cpu", dtype=torch.float32, copy=True)
                       for n, p in self.params.items()}
        self.seen_steps = int(getattr(actor, "global_steps", 0))
        self.updates = 0

    @torch.no_grad()
    def update(self) -> bool:
        """ema <- beta * ema + (1 - beta) * actor in fp32, when the actor took an optimizer step since the last call."""
        steps = int(self.actor.global_steps)
        if steps == self.seen_steps:
            return False
        self.seen_steps = steps
        for name, param in self.params.items():
            self.shadow[name].lerp_(local_tensor(param).detach().to("cpu").float(), 1.0 - self.beta)
        self.updates += 1
        return True

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within: the actor's trainable parameters hold the EMA (in their own dtype), e.g. to save it as a model;
        they are restored exactly afterwards. Every rank must enter it (each swaps its own part)."""
        saved = {}
        with torch.no_grad():
            for name, param in self.params.items():
                part = local_tensor(param)
                saved[name] = part.detach().to("cpu", copy=True)
                part.copy_(self.shadow[name])
            dist.regather_from_partitions(self.params.values())  # ZeRO-3's small always-whole parameters
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    local_tensor(param).copy_(saved[name])
                dist.regather_from_partitions(self.params.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's shadow and update count, as tensors (a checkpoint stores one file per rank)."""
        return {**{f"shadow.{n}": t for n, t in self.shadow.items()}, "updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore state_dict()'s tensors; the actor (restored first) gives the optimizer step count."""
        missing = [n for n in self.shadow if f"shadow.{n}" not in state]
        if missing or len(state) != len(self.shadow) + 1:
            raise ValueError(f"EMA state does not match the actor's trainable parameters (missing: {missing[:3]})")
        for name, tensor in self.shadow.items():
            saved = state[f"shadow.{name}"]
            if saved.shape != tensor.shape:
                raise ValueError(f"EMA state of {name}: shape {tuple(saved.shape)}, the actor's {tuple(tensor.shape)}")
            tensor.copy_(saved)
        self.updates = int(state["updates"])
        self.seen_steps = int(getattr(self.actor, "global_steps", 0))
