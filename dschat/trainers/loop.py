"""The epoch loop of steps 1 and 2 (and DPO): forward, NaN guard, backward, step, eval and checkpoints.

Test hooks (environment variables, for tests/test_robustness.py; unset in real runs):
  DSCHAT_TEST_NAN_AT_STEPS=3,4,5   make the loss of these micro-batches (1-based count in this process) NaN
  DSCHAT_TEST_KILL_AFTER_STEP=N    SIGKILL this process right after optimizer step N (and its checkpoint)
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from dschat.data.loaders import LengthGroupedSampler
from dschat.runtime import checkpoint, dist
from dschat.runtime.engine import to_device
from dschat.runtime.errors import NonFiniteLossError
from dschat.runtime.logger import Logger

NAN_ENV, KILL_ENV = "DSCHAT_TEST_NAN_AT_STEPS", "DSCHAT_TEST_KILL_AFTER_STEP"


@dataclass(frozen=True)
class LoopSettings:
    """The flags the shared loop reads (DeepSpeed-Chat names)."""

    num_train_epochs: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    seed: int
    max_bad_steps: int = 5
    eval_interval: int = 0
    save_interval: int = 0
    output_dir: str | None = None
    resume: bool = False
    print_loss: bool = False
    run_key: dict[str, Any] = field(default_factory=dict, hash=False)  # what the run trains (resume_key's settings)


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
            raise NonFiniteLossError(f"{self.in_a_row} updates in a row had a NaN/inf loss (--max_bad_steps "
                                     f"{self.limit}); stopping. None of them was applied; the last checkpoint, if "
                                     f"any, is intact (--resume continues from it). Try a lower learning rate.")
        return False


def resume_key(loader: DataLoader, **settings: Any) -> dict[str, Any]:
    """Settings that must not change between a run and its resumption: those that fix the data position (ranks,
    seed, batches per epoch, length grouping) and the step's own `settings` (batch sizes, accumulation)."""
    return {"world_size": dist.world_size(), **settings, "batches_per_epoch": len(loader),
            "group_by_length": isinstance(loader.sampler, LengthGroupedSampler)}


def loop_key(loader: DataLoader, loop: LoopSettings) -> dict[str, Any]:
    """The resume key of the shared loop: the data position's settings and `loop.run_key` (data, LoRA)."""
    return resume_key(loader, per_device_train_batch_size=loop.per_device_train_batch_size,
                      gradient_accumulation_steps=loop.gradient_accumulation_steps, seed=loop.seed, **loop.run_key)


def check_resume(output_dir: str | None, key: dict[str, Any]) -> None:
    """With --resume, before any engine is built: refuse a corrupt checkpoint or one another run wrote."""
    checkpoint.check_resume(output_dir, key)


def resume(output_dir: str | None, engines: dict[str, Any], key: dict[str, Any], history: list[dict[str, Any]],
           extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore the newest checkpoint of `output_dir` into `engines` (and `extras`) after checking `key`; the
    first run's evaluations replace `history` in place (so a resumed run's summary still starts from the model
    the first run started from). Returns the saved state: "epoch" and "batch" say where training goes on."""
    state = checkpoint.resume_state(output_dir, engines, key, extras)
    history[:] = state.get("history", history)
    return state


def save_checkpoint(output_dir: str, engines: dict[str, Any], position: dict[str, Any], key: dict[str, Any],
                    history: list[dict[str, Any]], extras: dict[str, Any] | None = None) -> None:
    """A resumable checkpoint: `position` ("epoch", "batch" trained so far in it, "step" and the step's own
    counters), the resume key and the evaluation history beside the engines' state."""
    checkpoint.save(output_dir, engines, {**position, "resume_key": key, "history": history}, extras)


def untrained_batches(loader: DataLoader, epoch: int, state: dict[str, Any]) -> Iterator[tuple[int, Any]]:
    """(index, batch) of one epoch of `loader` (its sampler set to `epoch`), without the batches a resumed run
    trained before its checkpoint."""
    loader.sampler.set_epoch(epoch)
    for i, batch in enumerate(loader):
        if epoch == state["epoch"] and i < state["batch"]:
            continue
        yield i, batch


def train_epochs(engine, loader, loss_fn: Callable[[Any, dict], tuple[torch.Tensor, dict[str, float]]],
                 evaluate: Callable[[str], None], loop: LoopSettings, logger: Logger,
                 dev: torch.device, shown: tuple[str, ...] = ("loss",),
                 history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run `loop.num_train_epochs` epochs; `loss_fn(engine, batch)` gives (loss, scalars to log).

    `history` (the run's eval results) goes into every checkpoint and is restored in place on --resume, so a
    resumed run's summary still starts from the model the first run started from.
    """
    history = [] if history is None else history
    guard = NanGuard(loop.max_bad_steps)
    key = loop_key(loader, loop)
    nan_at = {int(x) for x in os.environ.get(NAN_ENV, "").split(",") if x.strip()}
    kill_after = int(os.environ.get(KILL_ENV, 0))
    state = {"epoch": 0, "batch": 0}
    if loop.resume:
        state = resume(loop.output_dir, {"train": engine}, key, history)
    step, micro, applied = engine.global_steps, 0, 0
    if step:
        logger.bar.update(step)
    for epoch in range(state["epoch"], loop.num_train_epochs):
        for i, batch in untrained_batches(loader, epoch, state):
            loss, scalars = loss_fn(engine, to_device(batch, dev))
            micro += 1
            if micro in nan_at:
                loss = loss * float("nan")
            if not guard.ok(loss):
                logger.write(f"skipped update: non-finite loss (epoch {epoch}, batch {i}; "
                             f"{guard.in_a_row} in a row, {guard.total} in all)")
                continue
            engine.backward(loss)
            engine.step()
            applied += 1
            if engine.global_steps == step:  # inside a gradient-accumulation window
                continue
            step = engine.global_steps
            scalars |= {"loss": loss.item(), "lr": engine.get_lr()[0]}
            if loop.print_loss:
                logger.write(f"Epoch: {epoch}, Step: {step}, Rank: {dist.rank()}, loss = {scalars['loss']:.6f}")
            logger.step(step, {f"train/{k}": v for k, v in scalars.items()}, tuple(f"train/{k}" for k in shown))
            if loop.eval_interval and step % loop.eval_interval == 0:
                evaluate(f"step {step}")
            if loop.save_interval and loop.output_dir and step % loop.save_interval == 0:
                save_checkpoint(loop.output_dir, {"train": engine}, {"epoch": epoch, "batch": i + 1, "step": step},
                                key, history)
            if step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        evaluate(f"epoch {epoch + 1}")
    return {"skipped_updates": guard.total, "steps": step, "applied_micro_batches": applied}
