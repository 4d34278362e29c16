"""Phase splits, tokenisation and the on-disk cache of tokenised phase datasets.

`--data_split 2,4,4` has DeepSpeed-Chat's meaning: every dataset's train and eval rows are permuted with
the seed and cut into three disjoint shares; phase p (1 SFT, 2 reward, 3 PPO) uses share p. Tokenised
results are Arrow datasets (`datasets.map` + `save_to_disk`, no pickles) in a folder of
`--data_output_path` named by a hash of everything that changes them; the folder appears by rename,
so no rank ever reads a half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dschat.data.prompts import PromptFormat
from dschat.data.sources import Row, load_raw
from dschat.runtime import dist
from dschat.runtime.errors import DatasetError, describe_errno, write_errno

CACHE_VERSION = 5  # 4: phase-3 prompts as JSON (text or messages), conversational rows; 5: tie pairs dropped
SPLITS = ("train", "eval")
BUILTIN_NAMES = ("dschat/builtin", "builtin")


@dataclass(frozen=True)
class DataSettings:
    """Everything that decides one phase's tokenised data (and so its cache key)."""

    data_path: tuple[str, ...]
    data_split: str
    phase: int
    seed: int
    sft_only_data_path: tuple[str, ...] = ()
    max_seq_len: int = 512  # steps 1-2: longest prompt + answer
    max_prompt_len: int = 256  # step 3: longest prompt
    train_on_prompt: bool = False
    last_turn_only: bool = False  # step 1 on `messages` conversations: loss on the last assistant turn only
    prompt_format: str = "dschat"  # resolved: "dschat" or "chat_template" (data/prompts.py)

    def key(self) -> dict[str, Any]:
        """The settings as a JSON-able dict (lists for tuples)."""
        out = asdict(self)
        return out | {"data_path": list(self.data_path), "sft_only_data_path": list(self.sft_only_data_path)}

    @property
    def uses_builtin(self) -> bool:
        """Whether the builtin task is among the datasets (then the judge can score answers)."""
        return uses_builtin_data(self.data_path)


def uses_builtin_data(data_path: list[str] | tuple[str, ...]) -> bool:
    """Whether the builtin task is among `data_path` (then the judge can score answers)."""
    return any(p in BUILTIN_NAMES for p in data_path)


def parse_split(data_split: str) -> list[float]:
    """"2,4,4" -> [0.2, 0.4, 0.4] (any number of non-negative parts with a positive sum)."""
    try:
        parts = [float(s) for s in data_split.split(",")]
    except ValueError as err:
        raise DatasetError(f"--data_split '{data_split}': expected comma-separated numbers like 2,4,4") from err
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise DatasetError(f"--data_split '{data_split}': expected three non-negative numbers with a positive sum")
    return [p / sum(parts) for p in parts]


def phase_indices(n: int, shares: list[float], phase: int, seed: int) -> np.ndarray:
    """Indices of phase `phase` (1-based): a seeded permutation of range(n) cut by cumulative shares."""
    order = np.random.RandomState(seed).permutation(n)
    bounds = [0] + [int(round(sum(shares[: i + 1]) * n)) for i in range(len(shares))]
    bounds[-1] = n
    return order[bounds[phase - 1]: bounds[phase]]


def phase_rows(data_paths: list[str], data_split: str, phase: int, seed: int,
               sft_only_paths: list[str] = ()) -> dict[str, list[Row]]:
    """The raw rows phase `phase` gets from every dataset (SFT-only ones feed phase 1 entirely)."""
    shares = parse_split(data_split)
    out: dict[str, list[Row]] = {s: [] for s in SPLITS}
    sources = [(p, shares) for p in data_paths] + ([(p, [1.0, 0.0, 0.0]) for p in sft_only_paths])
    for path, path_shares in sources:
        raw = load_raw(path, seed)
        for split in SPLITS:
            rows = raw[split]
            idx = phase_indices(len(rows), path_shares, phase, seed)
            if path_shares[phase - 1] > 0:  # every row of a source this phase reads must suit it, not only its share
                check_rows_fit_phase(path, split, rows, phase, path_shares is not shares)
            out[split].extend(rows[i] for i in idx)
    return out


def check_rows_fit_phase(path: str, split: str, rows: list[Row], phase: int, sft_only: bool) -> None:
    """Phase 1 needs an answer (or a `text`), phase 2 chosen and rejected answers; phase 3 only a prompt."""
    if phase == 3:
        bad = next((r for r in rows if not r.get("prompt")), None)
        if bad is not None:
            raise DatasetError(f"{path}: a '{split}' row of phase 3 has no prompt (a language-modelling 'text' row, "
                               f"or a conversation that starts with the assistant, is step-1 data: give it to step "
                               f"1, e.g. with --data_split 1,0,0)")
        return
    needed = {1: ("chosen",), 2: ("chosen", "rejected")}[phase]
    for field in needed:
        missing = next((i for i, r in enumerate(rows) if r.get(field) is None and not (phase == 1 and r.get("text"))),
                       None)
        if missing is None:
            continue
        if rows[missing].get("text") or rows[missing].get("conversation"):
            raise DatasetError(f"{path}: a '{split}' row of phase {phase} is language-modelling data ('text' or "
                               f"'messages'), not a chosen/rejected pair: give it to step 1 (e.g. --data_split "
                               f"1,0,0 or --sft_only_data_path)")
        if field == "rejected" and not sft_only:
            raise DatasetError(f"{path}: a '{split}' row of phase {phase} has no 'rejected' answer; "
                               f"single-response data belongs in --sft_only_data_path")
        raise DatasetError(f"{path}: a '{split}' row of phase {phase} has no '{field}' answer (prompt-only rows "
                           f"are step-3 data: give them to step 3, e.g. with --data_split 0,0,1)")


def encode_row(row: Row, fmt: PromptFormat, answer: Any, last_turn_only: bool = False
               ) -> tuple[list[int], list[bool]]:
    """(ids, loss mask) of a row with one of its answers: a `text` row whole (BOS as the tokenizer adds it, the
    EOS after it, all of it loss-bearing); a `messages` conversation with the loss on every assistant turn
    (the last only with `last_turn_only`); otherwise the prompt and the answer, the loss on the answer."""
    if row.get("text"):
        ids = fmt.tokenizer(row["text"])["input_ids"] + [fmt.tokenizer.eos_token_id]
        return ids, [True] * len(ids)
    return fmt.encode(row["prompt"], answer, all_turns=bool(row.get("conversation")) and not last_turn_only)


def tokenize_row(row: Row, fmt: PromptFormat, phase: int, max_seq_len: int, max_prompt_len: int,
                 train_on_prompt: bool, last_turn_only: bool = False) -> dict[str, Any] | None:
    """Token ids for one row in phase `phase`; None when the row does not fit the length limits (phases 1-2: the
    tokens before the first loss-bearing one fill --max_seq_len; phase 3: the prompt is over --max_prompt_seq_len)."""
    if phase == 3:
        prompt = fmt.prompt_ids(row["prompt"])
        if len(prompt) > max_prompt_len:
            return None
        # The prompt (text or messages) and the row's other columns ride along to step 3's rewards as JSON
        # (Arrow needs one type per column).
        return {"prompt_ids": prompt, "prompt_json": json.dumps(row["prompt"]),
                "fields": json.dumps(row.get("fields") or {}, default=str, sort_keys=True)}
    chosen, loss = encode_row(row, fmt, row["chosen"], last_turn_only)
    start = loss.index(True) if True in loss else len(chosen)
    if start >= max_seq_len:
        return None
    chosen, loss = chosen[:max_seq_len], loss[:max_seq_len]
    if phase == 1:
        labels = list(chosen) if train_on_prompt else [t if on else -100 for t, on in zip(chosen, loss)]
        return {"input_ids": chosen, "labels": labels}
    rejected, _ = encode_row(row, fmt, row["rejected"])
    return {"chosen_ids": chosen, "rejected_ids": rejected[:max_seq_len], "prompt_len": start}


LOSS_OPEN, LOSS_CLOSE = "[[", "]]"  # --print_examples: around the tokens that carry the loss


def marked_text(tokenizer, ids: list[int], loss: list[bool]) -> str:
    """The ids decoded (special tokens shown) with each loss-bearing run between LOSS_OPEN and LOSS_CLOSE."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or loss[i] != loss[start]:
            text = tokenizer.decode(ids[start:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append(f"{LOSS_OPEN}{text}{LOSS_CLOSE}" if loss[start] else text)
            start = i
    return "".join(out)


def example_text(row: Row, fmt: PromptFormat, phase: int, max_seq_len: int, max_prompt_len: int,
                 train_on_prompt: bool = False, last_turn_only: bool = False) -> str:
    """One row of phase `phase` exactly as it is tokenised, the loss-bearing tokens marked (--print_examples):
    step 1 its labels, steps 2 and DPO each answer, step 3 the prompt and where the sampled answer goes."""
    enc = tokenize_row(row, fmt, phase, max_seq_len, max_prompt_len, train_on_prompt, last_turn_only)
    if enc is None:
        limit = f"--max_prompt_seq_len {max_prompt_len}" if phase == 3 else f"--max_seq_len {max_seq_len}"
        return f"(dropped: longer than {limit})"
    tok = fmt.tokenizer
    if phase == 1:
        ids = enc["input_ids"]
        loss = [label != -100 for label in enc["labels"]]
        return f"({len(ids)} tokens, {sum(loss)} with loss)\n{marked_text(tok, ids, loss)}"
    if phase == 2:
        n = enc["prompt_len"]
        return "\n".join(f"{side} ({len(ids)} tokens, answer {len(ids) - n}):\n"
                         f"{marked_text(tok, ids, [i >= n for i in range(len(ids))])}"
                         for side, ids in (("chosen", enc["chosen_ids"]), ("rejected", enc["rejected_ids"])))
    ids = enc["prompt_ids"]
    return (f"({len(ids)} prompt tokens; the sampled answer follows, ended by "
            f"{tok.convert_ids_to_tokens(fmt.eos_token_id)!r})\n{marked_text(tok, ids, [False] * len(ids))}"
            f"{LOSS_OPEN}<answer sampled here>{LOSS_CLOSE}")


def _source_stamps(settings: DataSettings) -> list[Any]:
    """What identifies each source's content: size and mtime of local files, the builtin task's code."""
    from dschat.data import arith_task, builtin_task

    stamps: list[Any] = []
    for path in list(settings.data_path) + list(settings.sft_only_data_path):
        if os.path.exists(path):
            files = [path] if os.path.isfile(path) else sorted(str(f) for f in Path(path).rglob("*") if f.is_file())
            stamps.append([(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files])
        elif path in BUILTIN_NAMES:
            stamps.append(hashlib.sha256(Path(builtin_task.__file__).read_bytes()).hexdigest())
        elif path == "dschat/arith":
            stamps.append(hashlib.sha256(Path(arith_task.__file__).read_bytes()).hexdigest())
    return stamps


def cache_key(settings: DataSettings, tokenizer) -> str:
    """A hash of everything that changes the tokenised result (settings, tokenizer vocabulary, version)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    identity = {**settings.key(), "tokenizer_class": type(tokenizer).__name__, "sources": _source_stamps(settings),
                "vocab_sha": hashlib.sha256(vocab.encode()).hexdigest(),
                "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
                "version": CACHE_VERSION}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def _build(folder: Path, settings: DataSettings, tokenizer) -> None:
    """Tokenise the phase rows and move the result into `folder` atomically."""
    from datasets import Dataset

    rows = phase_rows(list(settings.data_path), settings.data_split, settings.phase, settings.seed,
                      list(settings.sft_only_data_path))
    fmt = PromptFormat(tokenizer, settings.prompt_format)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        stats = {}
        for split in SPLITS:
            encoded = [tokenize_row(r, fmt, settings.phase, settings.max_seq_len, settings.max_prompt_len,
                                    settings.train_on_prompt, settings.last_turn_only)
                       for r in rows[split]]
            kept = [e for e in encoded if e is not None]
            ties = 0
            if settings.phase == 2:  # a pair whose answers are the same tokens (after truncation) teaches nothing
                untied = [e for e in kept if e["chosen_ids"] != e["rejected_ids"]]
                ties, kept = len(kept) - len(untied), untied
                if ties and not kept:
                    raise DatasetError(f"{', '.join(settings.data_path)}: no usable {split} pairs for phase 2: all "
                                       f"{ties} have chosen == rejected (identical tokens after truncation to "
                                       f"--max_seq_len={settings.max_seq_len}); a reward model or DPO would train "
                                       f"on nothing (loss ln 2 = 0.6931 throughout)")
            if not rows[split] and split == "train":
                raise DatasetError(f"{', '.join(settings.data_path) or '(no --data_path)'}: phase "
                                   f"{settings.phase} gets no training rows: its --data_split share "
                                   f"({settings.data_split}) is 0 or the datasets are empty")
            if not kept and rows[split] and not ties:
                phase3 = settings.phase == 3
                limit = "--max_prompt_seq_len" if phase3 else "--max_seq_len"
                value = settings.max_prompt_len if phase3 else settings.max_seq_len
                raise DatasetError(f"{', '.join(settings.data_path)}: no usable {split} rows for phase "
                                   f"{settings.phase}: {len(rows[split])} rows, all dropped for length "
                                   f"({limit}={value})")
            Dataset.from_list(kept).save_to_disk(str(tmp / split))
            stats[split] = {"rows": len(rows[split]), "dropped_for_length": sum(e is None for e in encoded),
                            "dropped_ties": ties}
        (tmp / "settings.json").write_text(json.dumps({"settings": settings.key(), "stats": stats}, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "settings.json").exists():
                raise
            shutil.rmtree(tmp)  # another job built the same cache meanwhile; theirs is identical
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_phase_data(settings: DataSettings, tokenizer, output_path: str) -> dict[str, Any]:
    """{"train": Dataset, "eval": Dataset, "stats": ...} for one phase, built once per node and cached."""
    from datasets import load_from_disk

    folder = Path(output_path) / f"phase{settings.phase}_{cache_key(settings, tokenizer)}"
    error = None
    if dist.local_rank() == 0 and not folder.exists():
        try:
            _build(folder, settings, tokenizer)
        except DatasetError as err:
            error = str(err)
        except Exception as err:  # a full disk, a read-only cache folder: one line, nothing of the cache kept
            number = write_errno(err, output_path if os.path.isdir(output_path) else None)
            if number is None:
                raise
            error = (f"--data_output_path {output_path}: cannot write the tokenised data cache {folder.name} there: "
                     f"{describe_errno(number)}; nothing of it was kept (free space, or give another "
                     f"--data_output_path)")
    # Every rank learns whether the builders succeeded, so a bad dataset stops all ranks at once.
    errors = [e for e in dist.all_gather_object(error) if e]
    if errors:
        raise DatasetError(errors[0])
    info = json.loads((folder / "settings.json").read_text())
    note = dropped_note(settings, info["stats"])
    if note:
        dist.print_rank0(note)
    # Phase 3 stores each prompt as JSON (text or messages); reading a row gives it back as "prompt".
    data = {split: load_from_disk(str(folder / split)) for split in SPLITS}
    if settings.phase == 3:
        data = {split: ds.with_transform(decode_prompts) for split, ds in data.items()}
    return data | {"stats": info["stats"], "folder": str(folder)}


def dropped_note(settings: DataSettings, stats: dict[str, dict[str, int]]) -> str | None:
    """The log line of a phase's rows dropped for length and tie pairs dropped, per split (None: none dropped)."""
    limit = f"--max_prompt_seq_len={settings.max_prompt_len}" if settings.phase == 3 \
        else f"--max_seq_len={settings.max_seq_len}"
    parts = []
    for split, s in stats.items():
        what = [f"{s['dropped_for_length']} dropped for length ({limit})"] if s.get("dropped_for_length") else []
        what += [f"{s['dropped_ties']} tie pairs dropped (chosen == rejected)"] if s.get("dropped_ties") else []
        if what:
            parts.append(f"{split}: {s['rows']} rows, {', '.join(what)}")
    return f"phase {settings.phase} data: {'; '.join(parts)}" if parts else None


def decode_prompts(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """A batch of cached phase-3 rows with each "prompt_json" decoded into "prompt" (a text or a message list)."""
    if "prompt_json" not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k != "prompt_json"}
    out["prompt"] = [json.loads(p) for p in batch["prompt_json"]]
    return out
