"""Saving plain Hugging Face model directories from training engines, at every ZeRO stage, atomically.

A save never leaves a half-written model at the output path: the model is written to a hidden sibling
folder `.<name>.tmp-*`, which then takes the output's place in one atomic rename (Linux: renameat2
RENAME_EXCHANGE; elsewhere two renames). Entries of the old folder that are not model files (the
`training.log` the training scripts write there, `checkpoints/`, TensorBoard folders, a user's notes.json)
move into the new folder; only the files a model loader reads (weights, shards and their index, adapters,
config, tokenizer and chat-template files, our markers) do not, so no stale shard or adapter survives
(a folder that held no model keeps everything the new model does not overwrite).

Killed at any instant, a save loses nothing: before the swap the old folder is untouched and the
`.<name>.tmp-<pid>-*` sibling holds only the new model (it carries a `SAVE_MARKER` file saying so); after
the swap the output is the new model, whole, and the sibling holds the old folder. An exception (SIGTERM,
Ctrl-C, a failed rename) after the swap still finishes the carry-over before it propagates; after a SIGKILL,
`recover` (called when a run takes its output folder, and before every save) moves the user's entries of a
dead process's old folder back into the output before anything is removed; a name taken there since is kept
as `<name>.recovered`.

Test hooks: `DSCHAT_TEST_SLOW_SAVE=<seconds>` sleeps after the model is written and before the rename,
so tests can kill a run in the middle of a save; `FAULT_HOOK` (a module attribute, set by tests) is called
with a description before every file operation of a save or a recovery, so a test can fail each in turn.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from dschat.data.prompts import carry_template
from dschat.models.lora import merge_lora_state_dict
from dschat.runtime import dist
from dschat.runtime.errors import FlagError, WriteError, describe_errno, write_errno

DONE_MARKER = "dschat_complete.json"
SLOW_SAVE_ENV = "DSCHAT_TEST_SLOW_SAVE"
# Written first into a save's temporary folder: a temp sibling holding it is a new model that never took the
# output's place (removed when stale); one without it is the old folder after the swap (its entries go back).
SAVE_MARKER = ".dschat-new-save"
FAULT_HOOK: Callable[[str], None] | None = None
# Files a model loader reads from a model directory (transformers, peft, our markers): a new save replaces
# the model as a whole, so none of the old folder's is kept (a stale shard, adapter or chat template would
# silently change the new model). Any other file (notes.json, settings, logs) moves into the new folder.
MODEL_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf",
               "*.safetensors.index.json", "*.bin.index.json", "config.json", "generation_config.json",
               "adapter_*", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.*",
               "preprocessor_config.json", "processor_config.json", "*.model", "*.tiktoken", "vocab.*",
               "merges.txt", DONE_MARKER, "dschat_metrics.json", "reward_stats.json", SAVE_MARKER,
               ".*.gguf.tmp-*")  # the last: a GGUF export (models/gguf_export.py) killed while writing
CARD_MARK = "<!-- dschat model card -->"  # first line of the README.md every save writes (models/card.py)
CARD_ASIDE = "README.dschat.md"  # where the card goes when the output folder holds a README.md of the user's


def is_card(path: Path) -> bool:
    """Whether `path` is absent or a model card an earlier save wrote (so a new save may replace it)."""
    try:
        with open(path) as f:
            return f.readline().strip() == CARD_MARK
    except FileNotFoundError:
        return True
    except (OSError, UnicodeDecodeError):
        return False


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "adapter_*")


def _owner_alive(path: Path) -> bool:
    """Whether the process named in a `.<name>.tmp-<pid>-*` / `.<name>.old-<pid>` folder still runs."""
    tail = path.name.rsplit(".tmp-", 1)[-1] if ".tmp-" in path.name else path.name.rsplit(".old-", 1)[-1]
    pid = tail.split("-", 1)[0]
    if not pid.isdigit():  # no pid in the name: treat as alive only if younger than a minute
        return time.time() - path.stat().st_mtime < 60
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_model_file(name: str, patterns: tuple[str, ...] = MODEL_FILES) -> bool:
    """Whether a file name belongs to a saved model (weights, config, tokenizer, our markers)."""
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def is_model_dir(path: Path) -> bool:
    """Whether a folder holds a saved model (a config.json or our completion marker)."""
    return (path / "config.json").exists() or (path / DONE_MARKER).exists()


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its nearest existing ancestor (what creating it would write into)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(folder: Path, out_dir: str) -> None:
    """Create and remove a probe folder in `folder` (permissions, read-only mounts, immutable folders, root)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dschat-write-probe-", dir=folder))
    except OSError as err:
        raise FlagError(f"--output_dir {out_dir}: cannot write in {folder} ({err.strerror or err}); the trained "
                        f"model could not be saved there: use a folder you can write") from err


def check_output_dir(out_dir: str) -> None:
    """Refuse an output path that is a file, lies under a file, cannot be written, or holds weights but no model."""
    # Saving there would mix those weights with the new model, or fail after training. Cheap: the steps call
    # it before anything is loaded. A save writes a sibling folder and renames it, so the parent is probed too.
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FlagError(f"--output_dir {out_dir} exists and is not a folder")
    resolved = out.resolve()
    base = nearest_existing(resolved.parent)
    if not base.is_dir():
        raise FlagError(f"--output_dir {out_dir}: {base} is a file, so no folder can be created under it")
    for folder in dict.fromkeys([base, *([resolved] if resolved.is_dir() else [])]):
        _check_writable(folder, out_dir)
    if not out.is_dir() or is_model_dir(out):
        return
    weights = sorted(p.name for p in out.iterdir() if p.is_file() and is_model_file(p.name, WEIGHT_FILES))
    if weights:
        raise FlagError(f"--output_dir {out_dir} holds weight files but no model ({', '.join(weights[:5])}"
                        f"{', ...' if len(weights) > 5 else ''}); use a new or empty folder")


def _op(what: str) -> None:
    """Announce one file operation of a save or recovery to the test hook (which may raise to fail it)."""
    if FAULT_HOOK is not None:
        FAULT_HOOK(what)


def recover(out: Path) -> list[Path]:
    """Put back what saves killed into `out` left in dead processes' temp siblings, then remove those; returns them.

    A missing `out` gets its old folder back (killed between the two renames of the fallback swap); the user's
    entries of an old folder parked beside `out` after a swap move back into it before that folder is removed.
    """
    out = Path(out)

    def stale(pattern: str) -> list[Path]:
        return sorted(p for p in out.parent.glob(pattern) if p.is_dir() and not _owner_alive(p))

    # Killed between the two renames of the fallback swap: the old model comes back (into a folder a rerun's
    # script has since created for its log, too: then that folder's entries are carried into the old one).
    olds = sorted(stale(f".{out.name}.old-*"), key=lambda p: (is_model_dir(p), p.stat().st_mtime))
    if olds and not is_model_dir(out) and is_model_dir(olds[-1]):
        if not out.exists():
            _op(f"rename {olds[-1]} -> {out}")
            os.replace(olds[-1], out)
        else:
            _op(f"swap {olds[-1]} <-> {out}")
            if not _exchange(olds[-1], out):
                parked = out.parent / f".{out.name}.old-{os.getpid()}-rerun"
                os.replace(out, parked)
                _op(f"rename {olds[-1]} -> {out}")
                os.replace(olds[-1], out)
                _carry_over(parked, out, recovering=True)
                _op(f"remove {parked}")
                shutil.rmtree(parked, ignore_errors=True)
    removed = []
    for path in stale(f".{out.name}.tmp-*") + stale(f".{out.name}.old-*"):
        if out.is_dir() and not (path / SAVE_MARKER).exists():  # the old folder of a swap that happened
            _carry_over(path, out, recovering=True)
        _op(f"remove {path}")
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if (out / SAVE_MARKER).exists() and not any(p.is_dir() for p in out.parent.glob(f".{out.name}.tmp-*")):
        _op(f"remove {out / SAVE_MARKER}")  # killed right after a swap, before the marker was dropped
        (out / SAVE_MARKER).unlink(missing_ok=True)
    return removed


def clean_stale_temps(out: Path) -> list[Path]:
    """Remove `.<name>.tmp-<pid>-*`/`.old-<pid>` siblings of `out` whose process is gone, after `recover` moved
    the user's entries in them back; returns them."""
    return recover(out)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2); False where the OS cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _carry_over(old: Path, new: Path, recovering: bool = False) -> None:
    """Move the old folder's non-model entries (logs, checkpoints/, TensorBoard) into the new one.

    From a folder that held no model, everything the new model does not overwrite moves. `recovering`: an entry
    whose name was taken in `new` since (a rerun's new training.log) is kept as `<name>.recovered` (-2, -3, ...).
    """
    model = is_model_dir(old)
    for entry in sorted(old.iterdir()):
        if entry.name == SAVE_MARKER or (model and entry.is_file() and is_model_file(entry.name)):
            continue
        target = new / entry.name
        if target.exists() or target.is_symlink():
            if not recovering or is_model_file(entry.name):
                continue
            target = new / f"{entry.name}.recovered"
            n = 1
            while target.exists() or target.is_symlink():
                n += 1
                target = new / f"{entry.name}.recovered-{n}"
        _op(f"rename {entry} -> {target}")
        os.replace(entry, target)


def _umask_permissions(folder: Path) -> None:
    """Give a saved folder the permissions a plain mkdir/open would (mkdtemp and some writers use 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_dir(out_dir: str) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out_dir` by rename, else it is removed."""
    out = Path(out_dir).resolve()
    _op(f"mkdir {out.parent}")
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    _op(f"mkdtemp in {out.parent}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    old: Path | None = None
    try:
        _op(f"write {tmp / SAVE_MARKER}")
        (tmp / SAVE_MARKER).write_text("a model being saved; removed when its process is gone\n")
        yield tmp
        _op(f"chmod {tmp}")
        _umask_permissions(tmp)
        if os.environ.get(SLOW_SAVE_ENV):
            time.sleep(float(os.environ[SLOW_SAVE_ENV]))
        _op(f"swap {tmp} <-> {out}")
        if not out.exists():
            os.replace(tmp, out)
        elif _exchange(tmp, out):  # one atomic step: `out` is the new model, `tmp` holds the old folder
            old = tmp
        else:
            parked = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, parked)
            old = parked
            _op(f"rename {tmp} -> {out}")
            os.replace(tmp, out)
        _finish(out, old)
    except BaseException:
        if old is not None and not out.exists():  # between the fallback's two renames: the old folder goes back
            os.replace(old, out)
            old = None
        if old is None:  # before the swap `tmp` is the unfinished new model
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # after it, the new model is in place: bring the user's entries over first
            _finish(out, old)
        raise


def _finish(out: Path, old: Path | None) -> None:
    """After the swap: drop the new model's marker, carry the old folder's entries over, remove what is left."""
    _op(f"remove {out / SAVE_MARKER}")
    (out / SAVE_MARKER).unlink(missing_ok=True)
    if old is not None and old.exists():
        _carry_over(old, out)
        _op(f"remove {old}")
        shutil.rmtree(old, ignore_errors=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def gathered_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict on rank 0 ({} elsewhere); ZeRO-3 partitions are gathered one parameter at a time."""
    module = unwrap(model)
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        with dist.gathered([param]):  # a no-op for a parameter that is not partitioned
            if dist.is_rank0():
                out[name] = param.data.detach().cpu().clone()
    if dist.is_rank0():
        keys = module.state_dict().keys()
        out.update({n: b.detach().cpu().clone() for n, b in module.named_buffers() if n in keys})
    return out


def save_hf_model(model: torch.nn.Module, tokenizer, out_dir: str, extra_json: dict[str, Any] | None = None,
                  gguf_type: str | None = None) -> None:
    """Write `model` (engine or module; LoRA merged in fp32, saved in the training dtype) with its tokenizer as a
    plain HF directory, atomically (then, with `gguf_type`, its model-<type>.gguf: export_gguf).

    Every rank must call this (ZeRO-3 gathers are collective); only rank 0 writes. `extra_json` maps file
    names to JSON content (a str is written as text: the README.md model card) stored beside the model. A
    completion marker is written last. The tokenizer is saved
    with the chat template of the format the model was trained in (DeepSpeed-Chat's when it has none).
    """
    module = unwrap(model)
    state = gathered_state_dict(module)
    if dist.is_rank0():
        base = module
        if hasattr(module, "peft_config"):
            rounding: dict[str, float] = {}
            state = merge_lora_state_dict(state, module.peft_config["default"], rounding)
            base = module.get_base_model()
            lost = (rounding.get("lost", 0.0) / rounding["update"]) ** 0.5 if rounding.get("update") else 0.0
            if lost > 0.01:  # Measured, not assumed: say when the saved model is not quite the trained one
                dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
                print(f"note: {out_dir}: LoRA merged in fp32, saved in {dtype}: rounding to {dtype} changed the "
                      f"adapters' update by {lost:.0%} of its norm (the part below {dtype}'s precision)", flush=True)
        existed = is_model_dir(Path(out_dir))
        try:
            _write_model(base, state, tokenizer, out_dir, extra_json)
        except Exception as err:  # a full disk, quota or read-only folder: one line; atomic_dir removed the partial
            number = write_errno(err, str(Path(out_dir).resolve().parent) if Path(out_dir).resolve().parent.is_dir()
                                 else None)
            if number is None:
                raise
            raise WriteError(f"cannot save the model to {out_dir}: {describe_errno(number)}; nothing half-written "
                             f"was kept" + ("; the previous model there is intact" if existed else "")) from err
        if gguf_type:
            export_gguf(out_dir, gguf_type)
    dist.barrier()


def export_gguf(out_dir: str, gguf_type: str) -> Path:
    """Write the model saved in `out_dir` as `<out_dir>/model-<type>.gguf` (rank 0 only; a full disk is one line)."""
    from dschat.models.gguf_export import gguf_file_name, write_gguf

    target = Path(out_dir) / gguf_file_name(gguf_type)
    try:
        out = write_gguf(out_dir, gguf_type)
    except Exception as err:
        number = write_errno(err, out_dir)
        if number is None:
            raise
        raise WriteError(f"cannot write {target}: {describe_errno(number)}; the model itself is saved in "
                         f"{out_dir}") from err
    print(f"--export_gguf {gguf_type}: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)", flush=True)
    return out


def _write_model(base: torch.nn.Module, state: dict[str, torch.Tensor], tokenizer, out_dir: str,
                 extra_json: dict[str, Any] | None) -> None:
    """save_hf_model's files, written into a temporary sibling that replaces `out_dir` only when whole."""
    with atomic_dir(out_dir) as tmp:
        base.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if not getattr(tokenizer, "chat_template", None):  # a model trained in DeepSpeed-Chat's text format
            carry_template(tokenizer, "dschat")
        tokenizer.save_pretrained(tmp)
        for name, content in (extra_json or {}).items():  # text as it is (README.md), anything else as JSON
            if name == "README.md" and not is_card(Path(out_dir) / name):  # a user's own README stays
                name = CARD_ASIDE
            (tmp / name).write_text(content if isinstance(content, str) else json.dumps(content, indent=1))
        (tmp / DONE_MARKER).write_text(json.dumps({"complete": True}))
