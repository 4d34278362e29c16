"""A step's hold on its --output_dir for the whole run: the lock (one run per folder), then the repairs and
deletions that are safe only under it (files of an interrupted save put back, --overwrite_checkpoints).

    with claim_output_dir(args):        # in each step's main(), around the run object's set-up and run_step
        run_step(SFTRun(args))
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from dschat.models.export import recover
from dschat.runtime import checkpoint, dist
from dschat.runtime.lock import output_lock

# The model folders a step saves under --output_dir ("" = the folder itself); step 3 is told by its actor flag.
STEP3_MODEL_DIRS = ("actor", "critic", "actor_ema", "best_actor")


def model_dirs_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The folders under --output_dir that this step saves models into."""
    return STEP3_MODEL_DIRS if hasattr(args, "actor_model_name_or_path") else ("",)


@contextlib.contextmanager
def claim_output_dir(args: argparse.Namespace, model_dirs: tuple[str, ...] | None = None) -> Iterator[None]:
    """Hold --output_dir's lock (rank 0) for the block; first recover interrupted saves of `model_dirs` (default:
    the step's, from its flags) under it and, with --overwrite_checkpoints, delete the earlier run's checkpoints."""
    out = getattr(args, "output_dir", None)
    with output_lock(out):
        if out and dist.rank() == 0:
            for sub in model_dirs if model_dirs is not None else model_dirs_of(args):
                recover((Path(out) / sub).resolve())
            found = checkpoint.latest(out)
            if getattr(args, "overwrite_checkpoints", False) and (Path(out) / "checkpoints").is_dir():
                shutil.rmtree(Path(out) / "checkpoints")
                dist.print_rank0(f"--overwrite_checkpoints: deleted {out}/checkpoints"
                                 f"{f' (the earlier run reached {found.name})' if found else ''}")
        yield
