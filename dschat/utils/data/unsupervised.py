"""Unsupervised text for the PTX loss: blocks of plain text with labels equal to the inputs."""

from __future__ import annotations

import argparse
import os

from torch.utils.data import DataLoader

from dschat.utils.data.raw_datasets import DatasetError
from dschat.utils.training import make_loader


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


def unsupervised_loader(args: argparse.Namespace, tokenizer) -> DataLoader:
    """Blocks of max_prompt_seq_len + max_answer_seq_len tokens, labels = input ids (DeepSpeed-Chat's PTX)."""
    from datasets import Dataset

    block = args.max_prompt_seq_len + args.max_answer_seq_len
    ids = [t for text in _texts(args.unsupervised_dataset_name, args.unsupervised_dataset_config_name)
           for t in tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]]
    blocks = [ids[i:i + block] for i in range(0, len(ids) - block + 1, block)]
    if not blocks:
        raise DatasetError(f"--unsupervised_dataset_name '{args.unsupervised_dataset_name}': fewer than {block} "
                           f"tokens of text, not one training block")
    data = Dataset.from_dict({"input_ids": blocks, "labels": blocks}).with_format("torch")
    return make_loader(data, None, args.per_device_training_batch_size, True, args.seed)
