"""Resumable checkpoints: DeepSpeed engine state (model, optimizer, scheduler) per engine, plus our own
state (data position, RNG, KL controller) as JSON. Loading never unpickles arbitrary objects: DeepSpeed's
files are read with `torch.load(weights_only=True)`.

Layout: <output_dir>/checkpoints/step<N>/{<engine name>/..., state.json}; `latest` names the newest.
A checkpoint folder counts only once `state.json` exists, which is written last, so a kill while saving
leaves the previous checkpoint as the one `--resume` uses.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dschat.utils import dist


def _safe_load(path: str, map_location=None) -> Any:
    """torch.load with weights_only=True (DeepSpeed's own loader allows arbitrary pickles)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def _allow_deepspeed_types() -> None:
    """Let weights_only loading accept the few plain DeepSpeed types its checkpoints contain."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.serialization.add_safe_globals([ZeroStageEnum, LossScaler, fragment_address, set])


def _use_safe_loader(engine) -> None:
    _allow_deepspeed_types()
    engine.checkpoint_engine.load = _safe_load


def _rng_state() -> dict[str, Any]:
    return {"python": repr(random.getstate()), "numpy": [int(x) for x in np.random.get_state()[1]],
            "numpy_pos": int(np.random.get_state()[2]), "torch": torch.get_rng_state().tolist()}


def _set_rng_state(state: dict[str, Any]) -> None:
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save(output_dir: str, engines: dict[str, Any], state: dict[str, Any]) -> Path:
    """Write a checkpoint of `engines` and `state` (JSON-able) for step state["step"]; all ranks call it."""
    root = Path(output_dir) / "checkpoints"
    folder = root / f"step{state['step']}"
    if dist.is_rank0() and folder.exists():
        shutil.rmtree(folder)
    dist.barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(folder / name), tag="state", save_latest=False)
    rngs = dist.all_gather_object(_rng_state())
    if dist.is_rank0():
        tmp = folder / "state.json.tmp"
        tmp.write_text(json.dumps({**state, "rng": rngs}))
        tmp.replace(folder / "state.json")
        (root / "latest.tmp").write_text(folder.name)
        (root / "latest.tmp").replace(root / "latest")
        for old in root.glob("step*"):  # keep only the newest complete checkpoint
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return folder


def latest(output_dir: str) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    root = Path(output_dir) / "checkpoints"
    name = (root / "latest").read_text().strip() if (root / "latest").exists() else None
    if name and (root / name / "state.json").exists():
        return root / name
    done = sorted((p for p in root.glob("step*") if (p / "state.json").exists()),
                  key=lambda p: int(p.name[4:]))
    return done[-1] if done else None


def load(folder: Path, engines: dict[str, Any]) -> dict[str, Any]:
    """Restore `engines` and this rank's RNG from `folder`; returns the saved state."""
    for name, engine in engines.items():
        _use_safe_loader(engine)
        path, _ = engine.load_checkpoint(str(folder / name), tag="state")
        if path is None:
            raise RuntimeError(f"checkpoint {folder / name} could not be loaded")
    state = json.loads((folder / "state.json").read_text())
    _set_rng_state(state["rng"][dist.rank()] if len(state["rng"]) > dist.rank() else state["rng"][0])
    return state


def resume_state(args: argparse.Namespace, engines: dict[str, Any]) -> dict[str, Any]:
    """With --resume: load the latest checkpoint under --output_dir (or say there is none)."""
    if not args.output_dir:
        raise ValueError("--resume needs --output_dir (checkpoints live in <output_dir>/checkpoints)")
    folder = latest(args.output_dir)
    if folder is None:
        dist.print_rank0(f"--resume: no checkpoint in {args.output_dir}/checkpoints; starting from scratch")
        return {"epoch": 0, "batch": 0, "step": 0}
    dist.print_rank0(f"resuming from {folder}")
    return load(folder, engines)
