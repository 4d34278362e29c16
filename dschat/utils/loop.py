"""The epoch loop of steps 1 and 2: forward, backward, step, NaN guard, periodic eval and checkpoints."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from dschat.utils import checkpoint, dist
from dschat.utils.training import Logger, to_device


class NonFiniteLossError(RuntimeError):
    """Too many consecutive updates with a NaN/inf loss."""


class NanGuard:
    """Counts non-finite losses (agreed across ranks) and stops after `limit` in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def ok(self, *values: torch.Tensor) -> bool:
        """True when every value is finite on every rank; otherwise count it (and raise at the limit)."""
        bad = torch.stack([(~torch.isfinite(v.detach().float())).any() for v in values]).any().float()
        if dist.all_reduce_sum(bad).item() == 0:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(f"{self.in_a_row} updates in a row had a NaN/inf loss; stopping "
                                     f"(the last saved checkpoint is intact). Try a lower learning rate.")
        return False


def train_epochs(engine, loader, loss_fn: Callable[[Any, dict], tuple[torch.Tensor, dict[str, float]]],
                 evaluate: Callable[[str], None], args: argparse.Namespace, logger: Logger,
                 dev: torch.device, shown: tuple[str, ...] = ("loss",)) -> dict[str, Any]:
    """Run `args.num_train_epochs` epochs; `loss_fn(engine, batch)` gives (loss, scalars to log)."""
    guard = NanGuard(args.max_bad_steps)
    state = checkpoint.resume_state(args, {"train": engine}) if args.resume else {"epoch": 0, "batch": 0}
    step = engine.global_steps
    for epoch in range(state["epoch"], args.num_train_epochs):
        loader.sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if epoch == state["epoch"] and i < state["batch"]:
                continue  # resumed run: these batches were trained before the checkpoint
            loss, scalars = loss_fn(engine, to_device(batch, dev))
            if not guard.ok(loss):
                logger.write(f"skipped update: non-finite loss (epoch {epoch}, batch {i})")
                continue
            engine.backward(loss)
            engine.step()
            if engine.global_steps == step:  # inside a gradient-accumulation window
                continue
            step = engine.global_steps
            scalars |= {"loss": loss.item(), "lr": engine.get_lr()[0]}
            logger.step(step, {f"train/{k}": v for k, v in scalars.items()}, tuple(f"train/{k}" for k in shown))
            if args.eval_interval and step % args.eval_interval == 0:
                evaluate(f"step {step}")
            if args.save_interval and args.output_dir and step % args.save_interval == 0:
                checkpoint.save(args.output_dir, {"train": engine}, {"epoch": epoch, "batch": i + 1, "step": step})
        evaluate(f"epoch {epoch + 1}")
    return {"skipped_updates": guard.total, "steps": step}
