"""Dataset adapters: every source becomes rows {"prompt", "chosen", "rejected"} in "train"/"eval" splits.

One registry maps a `--data_path` name to a loader; local files and folders are recognised by path, other
hub names go through `datasets.load_dataset`. A row's type is detected from its columns (TRL's dataset
types, each standard (text) or conversational (lists of {"role", "content"} messages)):

- preference: `prompt`, `chosen`, `rejected`;
- implicit-prompt preference: `chosen`, `rejected` (the prompt is their longest shared start, cut at a message
  boundary for conversations; Anthropic-HH text dialogues are cut at their last "\n\nAssistant:");
- prompt-completion: `prompt`, `completion` (or `response`, or `chosen` alone); `rejected` is None;
- prompt-only: `prompt` (step-3 data); `chosen` and `rejected` are None;
- language modelling: `messages` (prompt = the turns before the last assistant turn, chosen = that turn,
  "conversation": True: step 1 puts its loss on every assistant turn) or `text` (prompt None, "text": the text).

Messages stay messages (lists of dicts) until `data/prompts.PromptFormat` renders them; text prompts follow
DeepSpeed-Chat's contract ("Human: ... Assistant:"), text responses start with a space. A row's other columns
(a reference answer, ...) are kept in `fields`.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dschat.runtime.errors import DatasetError

Row = dict[str, Any]
Splits = dict[str, list[Row]]
Message = dict[str, Any]
HH_ASSISTANT = "\n\nAssistant:"
ROLES = ("system", "user", "assistant")
# Columns a row type reads; the others become its "fields" (to step 3's rewards).
ROW_KEYS = ("prompt", "chosen", "rejected", "response", "completion", "messages", "text")
ANSWER_KEYS = ("chosen", "completion", "response")  # the (first) answer of a prompt row, in this order


def _hh_split(dialogue: str, where: str) -> tuple[str, str]:
    """Split an Anthropic-HH dialogue at its last "\\n\\nAssistant:" into (prompt, response)."""
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DatasetError(f"{where}: HH-format dialogue has no '\\n\\nAssistant:' turn")
    cut += len(HH_ASSISTANT)
    return dialogue[:cut], dialogue[cut:]


def is_conversation(value: Any) -> bool:
    """Whether a prompt or answer is a list of messages (a conversational row) rather than text."""
    return isinstance(value, list)


def messages_of(value: Any, field: str, where: str, answer: bool = False) -> list[Message]:
    """`value` checked as a non-empty list of {"role", "content"} messages; `answer`: it must start with an
    assistant message whose content is not blank. Errors name the field and the message."""
    if not isinstance(value, list):
        raise DatasetError(f"{where}: field '{field}' must be a list of messages, got {type(value).__name__}")
    if not value:
        raise DatasetError(f"{where}: field '{field}' is an empty conversation")
    out = []
    for i, m in enumerate(value):
        at = f"{where}: field '{field}' message {i}"
        if not isinstance(m, dict):
            raise DatasetError(f"{at}: expected an object with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m:
            raise DatasetError(f"{at}: missing 'role' (keys present: {sorted(m)})")
        if m["role"] not in ROLES:
            raise DatasetError(f"{at}: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m.get("content"), str):
            got = "missing" if "content" not in m else f"a {type(m['content']).__name__}"
            raise DatasetError(f"{at}: 'content' must be a string ({got})")
        out.append(dict(m))
    if answer:
        if out[0]["role"] != "assistant":
            raise DatasetError(f"{where}: field '{field}' must start with an assistant message (got role "
                               f"{out[0]['role']!r})")
        if not out[0]["content"].strip():
            raise DatasetError(f"{where}: field '{field}' message 0: the assistant's 'content' is empty")
    return out


def _answer(value: Any, field: str, where: str, conversational: bool) -> Any:
    """An answer column checked against the row's kind (a text prompt takes text answers; a conversation takes
    assistant messages, a plain string becoming one assistant message)."""
    if value is None:
        return None
    if not conversational:
        if is_conversation(value):
            raise DatasetError(f"{where}: field '{field}' is a list of messages but 'prompt' is text; give both "
                               f"as messages or both as text")
        return _text({field: value}, field, where)
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    return messages_of(value, field, where, answer=True)


def _shared_text_start(chosen: str, rejected: str) -> int:
    """Length of the longest common start of two texts, not ending in a space (TRL's extract_prompt: the
    answers keep their leading space)."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if n < min(len(chosen), len(rejected)) and n > 0 and chosen[n - 1] == " ":
        n -= 1
    return n


def _implicit_pair(raw: dict, where: str) -> Row | None:
    """prompt/chosen/rejected of a pair given as two whole dialogues (HH text, plain text or messages)."""
    chosen, rejected = raw["chosen"], raw["rejected"]
    if is_conversation(chosen) or is_conversation(rejected):
        chosen, rejected = messages_of(chosen, "chosen", where), messages_of(rejected, "rejected", where)
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise DatasetError(f"{where}: 'chosen' and 'rejected' have nothing in common (an implicit-prompt pair's "
                               f"prompt is the messages they share at the start)")
        for field, rest in (("chosen", chosen[n:]), ("rejected", rejected[n:])):
            if not rest:
                raise DatasetError(f"{where}: field '{field}' has no message after the prompt the pair shares")
            if rest[0]["role"] != "assistant":
                raise DatasetError(f"{where}: the prompts of 'chosen' and 'rejected' differ: they part at message "
                                   f"{n}, a {rest[0]['role']} message (an implicit-prompt pair must part at an "
                                   f"assistant message)")
        return {"prompt": chosen[:n], "chosen": messages_of(chosen[n:], "chosen", where, answer=True),
                "rejected": messages_of(rejected[n:], "rejected", where, answer=True)}
    chosen, rejected = _text(raw, "chosen", where), _text(raw, "rejected", where)
    if HH_ASSISTANT in chosen and HH_ASSISTANT in rejected:  # Anthropic HH: whole dialogues
        prompt, chosen_answer = _hh_split(chosen, where)
        # The prompt is the chosen dialogue's; in the public data a few rejected dialogues differ earlier.
        _, rejected_answer = _hh_split(rejected, where)
        if not chosen_answer.strip() or not rejected_answer.strip():
            return None
        return {"prompt": prompt, "chosen": chosen_answer, "rejected": rejected_answer}
    n = _shared_text_start(chosen, rejected)
    if not chosen[:n].strip():
        raise DatasetError(f"{where}: 'chosen' and 'rejected' have nothing in common (an implicit-prompt pair's "
                           f"prompt is the text they share at the start)")
    for field, rest in (("chosen", chosen[n:]), ("rejected", rejected[n:])):
        if not rest.strip():
            raise DatasetError(f"{where}: field '{field}' has no text after the prompt the pair shares")
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def _language_modelling(raw: dict, where: str) -> Row:
    """A `messages` conversation (prompt: the turns before its last assistant turn) or a `text` row."""
    if "messages" in raw:
        messages = messages_of(raw["messages"], "messages", where)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise DatasetError(f"{where}: field 'messages' has no assistant message (nothing to learn)")
        if not messages[last]["content"].strip():
            raise DatasetError(f"{where}: field 'messages' message {last}: the assistant's 'content' is empty")
        return {"prompt": messages[:last], "chosen": [messages[last]], "rejected": None, "conversation": True}
    return {"prompt": None, "chosen": None, "rejected": None, "text": _text(raw, "text", where)}


def normalize_row(raw: Any, where: str) -> Row | None:
    """A prompt/chosen/rejected row from one raw record, its type detected from its columns (see the module doc).

    None for an HH record whose final answer is empty (the public HH data has a few); explicit
    prompt/chosen/rejected fields must not be empty.
    """
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if "prompt" in raw:
        conversational = is_conversation(raw["prompt"])
        if conversational:
            prompt = messages_of(raw["prompt"], "prompt", where)
        else:
            prompt = _text(raw, "prompt", where)
        key = next((k for k in ANSWER_KEYS if k in raw), "chosen")
        row = {"prompt": prompt, "chosen": _answer(raw.get(key), key, where, conversational),
               "rejected": _answer(raw.get("rejected"), "rejected", where, conversational)}
        if row["chosen"] is None and row["rejected"] is not None:
            raise DatasetError(f"{where}: missing field 'chosen' (a row with 'rejected' needs one)")
    elif "chosen" in raw and "rejected" in raw:
        row = _implicit_pair(raw, where)
        if row is None:
            return None
    elif "messages" in raw or "text" in raw:
        row = _language_modelling(raw, where)
    else:
        raise DatasetError(f"{where}: missing field 'prompt' (or 'messages', 'text', or 'chosen'/'rejected' "
                           f"dialogues); fields present: {sorted(raw)}")
    extra = {k: v for k, v in raw.items() if k not in ROW_KEYS}
    if extra:  # other columns (a reference answer, ...) travel with the row to step 3's rewards
        row["fields"] = extra
    return row


def _text(row: dict, field: str, where: str) -> str:
    """`row[field]` as a non-empty string, or a DatasetError naming the field."""
    value = row.get(field)
    if value is None:
        raise DatasetError(f"{where}: missing field '{field}'")
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DatasetError(f"{where}: field '{field}' is empty")
    return value


def _whole_json(text: str) -> Any:
    """The text parsed as one JSON value, or None when it is not one (JSON Lines, or broken)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _unsupported_shape(path: str, value: Any) -> DatasetError:
    """The error of a file that is valid JSON but not rows: a single object (maybe wrapping a list), a scalar."""
    if isinstance(value, dict):
        inner = next((k for k, v in value.items() if isinstance(v, list) and v and isinstance(v[0], dict)), None)
        hint = f"; its '{inner}' key holds a list of {len(value[inner])} objects: save that list alone" if inner else ""
        return DatasetError(f"{path}: valid JSON, but one object (keys {sorted(value)[:8]}), not rows: expected a list "
                            f"of row objects [{{...}}, ...] (.json) or one object per line (.jsonl){hint}")
    return DatasetError(f"{path}: valid JSON, but a {type(value).__name__}, not rows: expected a list of row objects "
                        f"(.json) or one object per line (.jsonl)")


def _rows_of_list(path: str, records: list) -> list[Row]:
    """Rows of a JSON list of records (None ones dropped)."""
    rows = [normalize_row(r, f"{path}: item {i}") for i, r in enumerate(records)]
    return [r for r in rows if r is not None]


def read_json_rows(path: str) -> list[Row]:
    """Rows of a .json (list of objects) or .jsonl file, optionally gzipped, validated line by line; a UTF-8 BOM is
    read past, and a pretty-printed list is read whatever the suffix says."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read: {err}") from err
    if not text.strip():
        raise DatasetError(f"{path}: file is empty")
    stem = path[:-3] if path.endswith(".gz") else path
    if stem.endswith(".json") and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from err
        if not isinstance(records, list):
            raise _unsupported_shape(path, records)
        return _rows_of_list(path, records)
    rows = []
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    for lineno, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            whole = _whole_json(text)
            if isinstance(whole, list):  # a pretty-printed list (in a .jsonl, or a .json starting otherwise)
                return _rows_of_list(path, whole)
            if whole is not None:
                raise _unsupported_shape(path, whole) from err
            raise DatasetError(f"{path}:{lineno}: invalid JSON: {err.msg} (a .jsonl file holds one complete JSON "
                               f"object per line)") from err
        if len(lines) == 1 and isinstance(record, list):
            return _rows_of_list(path, record)  # a list on one line
        if len(lines) == 1 and (not isinstance(record, dict) or (not set(record) & set(ROW_KEYS) and any(
                isinstance(v, list) and v and isinstance(v[0], dict) for v in record.values()))):
            raise _unsupported_shape(path, record)  # a scalar, or an object wrapping the rows
        row = normalize_row(record, f"{path}:{lineno}")
        if row is not None:
            rows.append(row)
    return rows


def carve_eval(rows: list[Row], seed: int, fraction: float = 0.1) -> Splits:
    """Split one list of rows into train/eval (DeepSpeed-Chat's "9:1" for sources without an eval split)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(rows) * fraction)) if len(rows) > 1 else 0
    return {"train": [rows[i] for i in order[n_eval:]], "eval": [rows[i] for i in order[:n_eval]]}


def _from_hf(ds: Any, name: str, seed: int, convert: Callable[[dict], Row | None],
             where: Callable[[str, int], str] | None = None) -> Splits:
    """Rows from a `datasets` Dataset or DatasetDict, converted record by record (None skips a record); `where`
    names a record in errors (default: "<name> [<split> row <i>]")."""
    from datasets import DatasetDict

    def rows_of(split_ds: Any, split: str) -> list[Row]:
        out = []
        for i, record in enumerate(split_ds):
            row = convert(record)
            at = where(split, i) if where else f"{name} [{split} row {i}]"
            row = normalize_row(row, at) if row is not None else None
            if row is not None:
                out.append(row)
        return out

    if isinstance(ds, DatasetDict):
        train_key = "train" if "train" in ds else next(iter(ds))
        eval_key = next((k for k in ("test", "eval", "validation") if k in ds), None)
        if eval_key is None:
            return carve_eval(rows_of(ds[train_key], train_key), seed)
        return {"train": rows_of(ds[train_key], train_key), "eval": rows_of(ds[eval_key], eval_key)}
    return carve_eval(rows_of(ds, "train"), seed)


# Local formats `datasets.load_dataset` reads (beside our own JSON reader): suffix -> its builder.
TABLE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}


def _load_table(path: str, seed: int) -> Splits:
    """A local Parquet/CSV/Arrow file, read by `datasets.load_dataset` (no hub); rows are named by their line
    (CSV: the header is line 1) or row number in errors."""
    from datasets import load_dataset

    suffix = Path(path).suffix.lower()
    extra = {"delimiter": "\t"} if suffix == ".tsv" else {}
    try:
        ds = load_dataset(TABLE_FORMATS[suffix], data_files=path, split="train", **extra)
    except Exception as err:  # a corrupt file raises anything from arrow
        raise DatasetError(f"{path}: cannot read as {TABLE_FORMATS[suffix]}: {type(err).__name__}: {err}") from err
    line = (lambda split, i: f"{path}:{i + 2}") if suffix in (".csv", ".tsv") else (lambda split, i: f"{path}: row {i}")
    return _from_hf(ds, path, seed, lambda r: r, line)


def load_local(path: str, seed: int) -> Splits:
    """A local .json/.jsonl(.gz), .parquet, .csv/.tsv or .arrow file; a folder with train/eval JSON files; a
    save_to_disk folder; or any other folder `datasets.load_dataset` reads (data files, a data/ folder)."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() in TABLE_FORMATS:
            return _load_table(path, seed)
        return carve_eval(read_json_rows(path), seed)
    if (p / "dataset_dict.json").exists() or (p / "dataset_info.json").exists():
        from datasets import load_from_disk

        return _from_hf(load_from_disk(path), path, seed, lambda r: r)
    files = {split: next((p / f"{stem}{ext}" for stem in names for ext in (".json", ".jsonl", ".jsonl.gz")
                          if (p / f"{stem}{ext}").exists()), None)
             for split, names in (("train", ("train",)), ("eval", ("eval", "test", "validation")))}
    if files["train"] is None:
        return _load_folder(path, seed)
    train = read_json_rows(str(files["train"]))
    if files["eval"] is None:
        return carve_eval(train, seed)
    return {"train": train, "eval": read_json_rows(str(files["eval"]))}


def _load_folder(path: str, seed: int) -> Splits:
    """A data folder in a layout `datasets.load_dataset` knows (train/test files, data/train-*.parquet, ...)."""
    from datasets import load_dataset

    known = (".json", ".jsonl", ".gz", *TABLE_FORMATS)
    if not any(f.is_file() and f.suffix.lower() in known for f in Path(path).rglob("*")):
        raise DatasetError(f"{path}: folder has no train.json/train.jsonl, no data files (.json, .jsonl, .parquet, "
                           f".csv, .arrow) and is not a datasets save_to_disk folder")
    try:
        ds = load_dataset(path)
    except Exception as err:
        raise DatasetError(f"{path}: datasets.load_dataset cannot read this folder: {type(err).__name__}: "
                           f"{' '.join(str(err).split())[:300]}") from err
    return _from_hf(ds, path, seed, lambda r: r)


def _builtin(seed: int) -> Splits:
    """The builtin "name some <category>" task (see builtin_task.py)."""
    from dschat.data.builtin_task import builtin_dataset

    return builtin_dataset()


def _arith(seed: int) -> Splits:
    """The builtin arithmetic word problems (see arith_task.py): prompt-only rows with an "answer" column."""
    from dschat.data.arith_task import arith_dataset

    return {split: [normalize_row(r, f"dschat/arith [{split} row {i}]") for i, r in enumerate(rows)]
            for split, rows in arith_dataset().items()}


def _hub(name: str, convert: Callable[[dict], Row | None]) -> Callable[[int], Splits]:
    """A loader for a hub dataset with a field mapping."""

    def load(seed: int) -> Splits:
        from datasets import load_dataset

        try:
            ds = load_dataset(name)
        except Exception as err:  # offline machines fail deep inside datasets; say what to do instead
            raise DatasetError(f"cannot load hub dataset '{name}' ({type(err).__name__}: {err}); without a hub, "
                               f"pass a local .json/.jsonl file or a save_to_disk folder to --data_path") from err
        return _from_hf(ds, name, seed, convert)

    return load


def _pairwise(r: dict) -> Row:
    return {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}


def _rlhf_reward(r: dict) -> Row:
    return {"prompt": r["prompt"], "chosen": r["chosen"].split("Assistant:")[-1],
            "rejected": r["rejected"].split("Assistant:")[-1]}


def _synthetic_gptj(r: dict) -> Row:
    return {"prompt": " Human: " + r["prompt"] + " Assistant:", "chosen": " " + r["chosen"],
            "rejected": " " + r["rejected"]}


def _webgpt(r: dict) -> Row | None:
    if r["score_0"] == r["score_1"]:
        return None
    strip = lambda s: re.sub(r" [\(\[].*?[\)\]]", "", s).strip()  # noqa: E731 (citations)
    better, worse = ("answer_0", "answer_1") if r["score_0"] > r["score_1"] else ("answer_1", "answer_0")
    return {"prompt": " Human: " + r["question"]["full_text"] + " Assistant:",
            "chosen": " " + strip(r[better]), "rejected": " " + strip(r[worse])}


def _shp(r: dict) -> Row:
    better, worse = ("human_ref_A", "human_ref_B") if r["labels"] == 1 else ("human_ref_B", "human_ref_A")
    return {"prompt": " Human: " + r["history"] + " Assistant:", "chosen": " " + r[better],
            "rejected": " " + r[worse]}


def _sharegpt_like(r: dict) -> Row:
    return {"prompt": r["prompt"], "chosen": r["label"], "rejected": None}


def _zhihu(r: dict) -> Row:
    return {"prompt": " Human: " + r["INSTRUCTION"] + " Assistant:", "chosen": " " + r["RESPONSE"],
            "rejected": None}


LOADERS: dict[str, Callable[[int], Splits]] = {
    "dschat/builtin": _builtin,
    "builtin": _builtin,
    "dschat/arith": _arith,
    "Dahoas/rm-static": _hub("Dahoas/rm-static", _pairwise),
    "Dahoas/full-hh-rlhf": _hub("Dahoas/full-hh-rlhf", _pairwise),
    "Dahoas/synthetic-instruct-gptj-pairwise": _hub("Dahoas/synthetic-instruct-gptj-pairwise", _synthetic_gptj),
    "yitingxie/rlhf-reward-datasets": _hub("yitingxie/rlhf-reward-datasets", _rlhf_reward),
    "openai/webgpt_comparisons": _hub("openai/webgpt_comparisons", _webgpt),
    "stanfordnlp/SHP": _hub("stanfordnlp/SHP", _shp),
    "pvduy/sharegpt_alpaca_oa_vicuna_format": _hub("pvduy/sharegpt_alpaca_oa_vicuna_format", _sharegpt_like),
    "wangrui6/Zhihu-KOL": _hub("wangrui6/Zhihu-KOL", _zhihu),
}


HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached now (offline mode, no route to it), or None (a quick probe, so an
    offline machine is told at once instead of after `datasets`' retries)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as err:
        return f"{url.hostname}: {err}"
    return None


def load_hub(name: str, seed: int) -> Splits:
    """A hub dataset that is not one of DeepSpeed-Chat's names, through `datasets.load_dataset`, its rows' type
    detected from the columns like a local file's."""
    from datasets import load_dataset

    try:
        ds = load_dataset(name)
    except Exception as err:
        raise DatasetError(f"cannot load hub dataset '{name}' ({type(err).__name__}: {' '.join(str(err).split())[:300]})"
                           f"; without a hub, pass a local file (.json/.jsonl/.parquet/.csv) or folder to "
                           f"--data_path") from err
    return _from_hf(ds, name, seed, lambda r: r)


def load_raw(name: str, seed: int) -> Splits:
    """The train/eval rows of one `--data_path` entry: a registered name, "local/jsonfile", a local file or folder,
    or another hub dataset name ("org/name", through `datasets.load_dataset`)."""
    if name in LOADERS:
        return LOADERS[name](seed)
    if name == "local/jsonfile":  # DeepSpeed-Chat's convention: ./data/{train,eval}.json
        return load_local("data", seed)
    if os.path.exists(name):
        return load_local(name, seed)
    known = f"not a registered name ({', '.join(LOADERS)}, local/jsonfile) and no such file or folder"
    if not HUB_NAME.match(name):
        raise DatasetError(f"unknown dataset '{name}' in --data_path: {known}")
    reason = hub_unreachable()
    if reason:
        raise DatasetError(f"unknown dataset '{name}' in --data_path: {known}, and the Hugging Face hub cannot be "
                           f"reached to load it ({reason}); without a hub, pass a local file (.json/.jsonl/.parquet/"
                           f".csv) or folder")
    return load_hub(name, seed)
