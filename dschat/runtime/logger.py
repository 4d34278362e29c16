"""Rank-0 progress bar and TensorBoard scalars for the training loops."""

from __future__ import annotations

import time

from dschat.runtime import dist


class Logger:
    """Rank-0 progress bar (tqdm) and TensorBoard scalars; silent on other ranks."""

    def __init__(self, total: int, desc: str, tb_dir: str | None = None, initial: int = 0):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True,
                        disable=not dist.is_rank0(), mininterval=1.0)
        self.writer = None
        if tb_dir and dist.is_rank0():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tb_dir)
        self.start = time.time()

    def step(self, step: int, scalars: dict[str, float], shown: tuple[str, ...] = ()) -> None:
        """Advance the bar one step, show `shown` scalars on it and log all of them to TensorBoard."""
        self.bar.update(1)
        if shown:
            self.bar.set_postfix({k: f"{scalars[k]:.4g}" for k in shown if k in scalars}, refresh=False)
        self.scalars(step, scalars)

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Log scalars to TensorBoard at `step`."""
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)

    def write(self, msg: str) -> None:
        """Print a line on rank 0 without breaking the progress bar."""
        if dist.is_rank0():
            self.bar.write(msg)

    def close(self) -> None:
        """Close the bar and flush TensorBoard."""
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
