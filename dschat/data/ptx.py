"""Unsupervised text for the PTX loss: blocks of plain text with labels equal to the inputs."""

from __future__ import annotations

import os

from torch.utils.data import DataLoader

from dschat.data.loaders import make_loader
from dschat.runtime.errors import DatasetError


def _texts(name: str, config: str | None) -> list[str]:
    """Lines of a local .txt file, "text" fields of a local JSON/JSONL file, or a hub dataset's train split."""
    if os.path.isfile(name):
        if name.endswith((".json", ".jsonl")):
            import json

            lines = [json.loads(line) for line in open(name, encoding="utf-8") if line.strip()]
            missing = next((i for i, r in enumerate(lines, 1) if "text" not in r), None)
            if missing is not None:
                raise DatasetError(f"{name}:{missing}: missing field 'text'")
            return [r["text"] for r in lines]
        return [line for line in open(name, encoding="utf-8").read().splitlines() if line.strip()]
    from datasets import load_dataset

    try:
        return list(load_dataset(name, config, split="train")["text"])
    except Exception as err:  # offline: say what works instead
        raise DatasetError(f"--unsupervised_dataset_name '{name}': cannot load ({type(err).__name__}: {err}); "
                           f"pass a local .txt or .jsonl file") from err


def unsupervised_loader(name: str, config: str | None, tokenizer, block: int, batch_size: int,
                        seed: int) -> DataLoader:
    """Blocks of `block` tokens of text `name`, labels = input ids (DeepSpeed-Chat's PTX data)."""
    from datasets import Dataset

    ids = [t for text in _texts(name, config)
           for t in tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]]
    blocks = [ids[i:i + block] for i in range(0, len(ids) - block + 1, block)]
    if not blocks:
        raise DatasetError(f"--unsupervised_dataset_name '{name}': fewer than {block} tokens of text, not one "
                           f"training block")
    data = Dataset.from_dict({"input_ids": blocks, "labels": blocks}).with_format("torch")
    return make_loader(data, None, batch_size, True, seed)
