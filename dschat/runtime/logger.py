"""Rank-0 progress bar, metrics.jsonl, TensorBoard and wandb scalars for the training loops."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from dschat.runtime import dist
from dschat.runtime.errors import FlagError

METRICS_FILE = "metrics.jsonl"  # one JSON line per logged step in every step's --output_dir
REPORTERS = ("tensorboard", "wandb", "none")


def tensorboard_available() -> bool:
    """Whether TensorBoard's writer can be imported (it is in requirements, but may be missing)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_report_to(report_to: list[str] | None, enable_tensorboard: bool = False) -> list[str]:
    """--report_to's list: None means TensorBoard where importable; `none` alone turns both off;
    --enable_tensorboard adds TensorBoard. wandb asked for but not installed is a one-line FlagError."""
    if report_to is None:
        chosen = ["tensorboard"] if tensorboard_available() else []
    elif "none" in report_to:
        if len(report_to) > 1:
            raise FlagError(f"--report_to none cannot be combined with {' '.join(r for r in report_to if r != 'none')}")
        chosen = []
    else:
        chosen = list(dict.fromkeys(report_to))
    if enable_tensorboard and "tensorboard" not in chosen:
        chosen.append("tensorboard")
    if "wandb" in chosen:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise FlagError("--report_to wandb: the wandb package is not installed (pip install wandb; "
                            "WANDB_MODE=offline logs without a network)") from None
    if "tensorboard" in chosen and not tensorboard_available():
        raise FlagError("--report_to tensorboard: the tensorboard package is not installed (pip install tensorboard)")
    return chosen


def last_time(path: Path) -> float:
    """The largest time_s in a metrics.jsonl (0 when there is none)."""
    best = 0.0
    try:
        for raw in path.read_text().splitlines():
            try:
                best = max(best, float(json.loads(raw).get("time_s") or 0.0))
            except (ValueError, AttributeError, TypeError):
                continue
    except OSError:
        pass
    return best


class Logger:
    """Rank-0 progress bar (tqdm), metrics.jsonl lines, TensorBoard and wandb scalars; silent on other ranks."""

    def __init__(self, total: int, desc: str, tb_dir: str | None = None, initial: int = 0,
                 metrics_path: str | os.PathLike | None = None, append: bool = False,
                 wandb_dir: str | None = None, wandb_config: dict[str, Any] | None = None):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True,
                        disable=not dist.is_rank0(), mininterval=1.0)
        self.writer = None
        if tb_dir and dist.is_rank0():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tb_dir)
        self.wandb = None
        if wandb_dir is not None and dist.is_rank0():
            import wandb

            Path(wandb_dir).mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "dschat"), name=desc, dir=wandb_dir,
                                    config=wandb_config or {})
        self.metrics_path = Path(metrics_path) if metrics_path and dist.is_rank0() else None
        self._truncate = not append  # a fresh run starts the file over; --resume appends to it
        # time_s goes on from the run's earlier lines on --resume (time since the first run's start)
        self.start = time.time() - (last_time(self.metrics_path) if append and self.metrics_path else 0.0)

    def step(self, step: int, scalars: dict[str, float], shown: tuple[str, ...] = ()) -> None:
        """Advance the bar one step, show `shown` scalars on it and log all of them (a "train" line)."""
        self.bar.update(1)
        if shown:
            self.bar.set_postfix({k: f"{scalars[k]:.4g}" for k in shown if k in scalars}, refresh=False)
        self.scalars(step, scalars, kind="train")

    def scalars(self, step: int, scalars: dict[str, float], kind: str = "eval") -> None:
        """Log scalars at `step` to TensorBoard and wandb, and as one `kind` line of metrics.jsonl."""
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({**scalars, "global_step": step})
        self.json_line(step, scalars, kind)

    def json_line(self, step: int, scalars: dict[str, float], kind: str) -> None:
        """Append {"kind", "step", "time_s", scalars without their "<kind>/" prefix} to metrics.jsonl."""
        if self.metrics_path is None:
            return
        prefix = f"{kind}/"
        line: dict[str, Any] = {"kind": kind, "step": step, "time_s": round(time.time() - self.start, 3)}
        for k, v in scalars.items():
            v = float(v)
            line[k.removeprefix(prefix)] = v if math.isfinite(v) else None
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "w" if self._truncate else "a") as f:
            f.write(json.dumps(line) + "\n")
        self._truncate = False

    def write(self, msg: str) -> None:
        """Print a line on rank 0 without breaking the progress bar."""
        if dist.is_rank0():
            self.bar.write(msg)

    def close(self) -> None:
        """Close the bar and flush TensorBoard and wandb."""
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
