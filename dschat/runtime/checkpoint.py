"""Resumable checkpoints: DeepSpeed engine state (model, optimizer, scheduler) per engine, tensors of other
stateful objects (the actor's EMA) as one safetensors file per rank, plus our own state (data position, RNG,
KL controller) as JSON. Loading never unpickles arbitrary objects: DeepSpeed's files are read with
`torch.load(weights_only=True)`.

Layout: <output_dir>/checkpoints/step<N>/{<engine name>/..., <extra name>/rank<R>.safetensors, state.json};
`latest` names the newest.
A checkpoint folder counts only once `state.json` exists, which is written last, so a kill while saving
leaves the previous checkpoint as the one `--resume` uses.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dschat.runtime import dist
from dschat.runtime.errors import CheckpointError, WriteError, describe_errno, write_errno


def _deepspeed_types() -> list[Any]:
    """The plain DeepSpeed types (and builtins) its checkpoints pickle besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address, set]


def _safe_load(path: str, map_location=None) -> Any:
    """torch.load with weights_only=True (DeepSpeed's own loader allows arbitrary pickles)."""
    try:
        with torch.serialization.safe_globals(_deepspeed_types()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # an unsafe pickle, a truncated file: say which file and why, in one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        why = "refused to unpickle a type that is not allowed" if "weights_only" in str(err) else "cannot load"
        raise CheckpointError(f"{path}: {why}: {first}") from err


def _use_safe_loader(engine) -> None:
    engine.checkpoint_engine.load = _safe_load


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": repr(random.getstate()), "numpy": [int(x) for x in keys], "numpy_pos": int(pos),
             "numpy_gauss": [int(has_gauss), float(gauss)], "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    has_gauss, gauss = state.get("numpy_gauss", [0, 0.0])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def check_compatible(state: dict[str, Any], expected: dict[str, Any], folder: Path | str = "") -> None:
    """Raise CheckpointError when settings saved in `state["resume_key"]` differ from `expected` (compared as JSON:
    tuples are lists there); a setting an older checkpoint did not record is not compared."""
    saved = state.get("resume_key", {})
    if not isinstance(saved, dict):
        raise CheckpointError(f"{folder}/state.json: field 'resume_key' is corrupt (a {type(saved).__name__}, not an "
                              f"object); start a new --output_dir or --overwrite_checkpoints")
    expected = json.loads(json.dumps(expected))
    diff = [f"{k}: checkpoint {saved[k]!r}, now {v!r}" for k, v in expected.items() if k in saved and saved[k] != v]
    if diff:
        raise CheckpointError(f"--resume: checkpoint {folder} was written with other settings ({'; '.join(diff)}); "
                              f"resume with the same settings or start a new --output_dir")


def save(output_dir: str, engines: dict[str, Any], state: dict[str, Any], extras: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint of `engines`, `extras` (objects with state_dict() -> {name: tensor}, this rank's part) and
    `state` (JSON-able) for step state["step"]; all ranks call it."""
    root = Path(output_dir) / "checkpoints"
    folder = root / f"step{state['step']}"
    if dist.is_rank0() and folder.exists():
        shutil.rmtree(folder)
    dist.barrier()
    try:
        _write(root, folder, engines, state, extras)
    except Exception as err:  # a full disk or quota: remove the partial checkpoint (it would keep the disk full)
        number = write_errno(err, str(root) if root.is_dir() else None)
        if number is None:
            raise
        if dist.is_rank0():
            shutil.rmtree(folder, ignore_errors=True)
        before = latest(output_dir)
        raise WriteError(f"cannot write checkpoint {folder}: {describe_errno(number)}; the partial checkpoint was "
                         f"removed" + (f", the previous one ({before}) is intact" if before else "")) from err
    return folder


def _write(root: Path, folder: Path, engines: dict[str, Any], state: dict[str, Any],
           extras: dict[str, Any] | None) -> None:
    """save()'s writes: engines, extras, then state.json and `latest` (rank 0), then older checkpoints removed."""
    for name, engine in engines.items():
        engine.save_checkpoint(str(folder / name), tag="state", save_latest=False)
    for name, obj in (extras or {}).items():
        from safetensors.torch import save_file

        (folder / name).mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in obj.state_dict().items()}
        save_file(tensors, str(folder / name / f"rank{dist.rank()}.safetensors"))
    rngs = dist.all_gather_object(_rng_state())
    if dist.is_rank0():
        tmp = folder / "state.json.tmp"
        tmp.write_text(json.dumps({**state, "world_size": dist.world_size(), "rng": rngs}))
        tmp.replace(folder / "state.json")
        (root / "latest.tmp").write_text(folder.name)
        (root / "latest.tmp").replace(root / "latest")
        for old in root.glob("step*"):  # keep only the newest complete checkpoint
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def latest(output_dir: str) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    root = Path(output_dir) / "checkpoints"
    name = (root / "latest").read_text().strip() if (root / "latest").exists() else None
    if name and (root / name / "state.json").exists():
        return root / name
    done = sorted((p for p in root.glob("step*") if (p / "state.json").exists()),
                  key=lambda p: int(p.name[4:]))
    return done[-1] if done else None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_state(folder: Path) -> dict[str, Any]:
    """The checkpoint's state.json, checked: readable JSON object with the position counters and one RNG state per
    rank; a missing or corrupt field is one CheckpointError line naming the file and the field."""
    path = folder / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read: {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: corrupt: a JSON {type(state).__name__}, not an object")
    problems = [f"'{k}' {'missing' if k not in state else f'is {state[k]!r}, not a count'}"
                for k in ("epoch", "batch", "step") if not _is_count(state.get(k))]
    rng = state.get("rng")
    if not isinstance(rng, list) or not rng or not all(isinstance(r, dict) for r in rng):
        problems.append("'rng' missing" if rng is None else "'rng' is not a list of per-rank RNG states")
    elif "world_size" in state and state["world_size"] != len(rng):
        problems.append(f"'rng' holds {len(rng)} rank(s) but 'world_size' is {state['world_size']!r}")
    if problems:
        raise CheckpointError(f"{path}: corrupt checkpoint state ({'; '.join(problems)}); --resume cannot continue "
                              f"from it: start over with --overwrite_checkpoints or a new --output_dir")
    return state


def check_resume(output_dir: str | None, expected: dict[str, Any]) -> Path | None:
    """Before any engine is built: the checkpoint --resume would load (None: there is none), its state.json read
    and checked and its settings compared with `expected`; a CheckpointError otherwise."""
    if not output_dir:
        raise CheckpointError("--resume needs --output_dir (checkpoints live in <output_dir>/checkpoints)")
    folder = latest(output_dir)
    if folder is not None:
        check_compatible(read_state(folder), expected, folder)
    return folder


def _load_engine(folder: Path, name: str, engine) -> None:
    """engine.load_checkpoint of `folder/name`, its model-shape errors (LoRA added or dropped, another model) as one
    CheckpointError line."""
    _use_safe_loader(engine)
    try:
        path, _ = engine.load_checkpoint(str(folder / name), tag="state")
    except RuntimeError as err:
        if "state_dict" not in str(err):
            raise
        text = str(err)
        first = " ".join(text.split())[:300]
        lora = "LoRA adapters (lora_A/lora_B weights) differ between the checkpoint and this run (--lora_dim " \
               "added, dropped or changed); " if "lora_" in text else ""
        raise CheckpointError(f"--resume: checkpoint {folder / name} holds another model than this run builds: "
                              f"{lora}{first}; resume with the flags it was written with or start a new "
                              f"--output_dir") from err
    if path is None:
        raise CheckpointError(f"checkpoint {folder / name} could not be loaded")


def load(folder: Path, engines: dict[str, Any], extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore `engines`, then `extras` (load_state_dict of this rank's tensors), and this rank's RNG from `folder`;
    returns the saved state."""
    state = read_state(folder)
    saved_world = state.get("world_size", len(state["rng"]))
    if saved_world != dist.world_size():
        raise CheckpointError(f"--resume: checkpoint {folder} was written by {saved_world} rank(s), this run has "
                              f"{dist.world_size()}; resume with the same number of ranks")
    for name, engine in engines.items():
        _load_engine(folder, name, engine)
    for name, obj in (extras or {}).items():
        from safetensors.torch import load_file

        path = folder / name / f"rank{dist.rank()}.safetensors"
        if not path.exists():
            raise CheckpointError(f"--resume: checkpoint {folder} holds no {name} state ({path.name} missing): it was "
                                  f"written without it (e.g. without --enable_ema) or by an older version; resume "
                                  f"with the flags it was written with or start a new --output_dir")
        try:
            obj.load_state_dict(load_file(str(path)))
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from err
    try:
        _set_rng_state(state["rng"][dist.rank()])
    except (KeyError, TypeError, ValueError, SyntaxError) as err:
        raise CheckpointError(f"{folder}/state.json: corrupt RNG state of rank {dist.rank()} "
                              f"({type(err).__name__}: {err}); start over with --overwrite_checkpoints") from err
    return state


def resume_state(output_dir: str | None, engines: dict[str, Any], expected: dict[str, Any],
                 extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """With --resume: load the latest checkpoint under `output_dir` (or say there is none); `extras` as in load().

    `expected` holds the settings that fix the data position; a checkpoint written with others is refused.
    """
    if not output_dir:
        raise CheckpointError("--resume needs --output_dir (checkpoints live in <output_dir>/checkpoints)")
    # Compare settings before loading engines: a mismatch must not leave half-restored engines behind.
    folder = check_resume(output_dir, expected)
    if folder is None:
        dist.print_rank0(f"--resume: no checkpoint in {output_dir}/checkpoints; starting from scratch")
        return {"epoch": 0, "batch": 0, "step": 0}
    dist.print_rank0(f"resuming from {folder}")
    return load(folder, engines, extras)
