"""Loading models and tokenizers (HF directories, hub names, GGUF files) and saving plain HF outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from dschat.models.builtin import resolve_model_name
from dschat.runtime.errors import ModelPathError


def split_model_path(path: str) -> tuple[str, dict[str, Any]]:
    """Resolve aliases and GGUF files: returns (directory or hub name, extra from_pretrained kwargs)."""
    path = resolve_model_name(path)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ModelPathError(f"GGUF file not found: {path}")
        return str(Path(path).resolve().parent), {"gguf_file": Path(path).name}
    if os.path.isdir(path):
        if not (Path(path) / "config.json").exists():
            inside = [d.name for d in sorted(Path(path).iterdir()) if (d / "config.json").exists()]
            hint = f"; it holds the model folders {', '.join(inside)} (a step-3 output?): pass {Path(path) / inside[0]}" \
                if inside else ""
            raise ModelPathError(f"{path} is a folder but holds no config.json: not a Hugging Face model directory{hint}")
        return path, {}
    if os.path.exists(path) or path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path:
        raise ModelPathError(f"model path not found or not a model directory: {path}")
    # A hub name ("org/model"). Without a reachable hub, use the local hub cache only: huggingface_hub
    # would otherwise retry for ~25 s per file before failing.
    if hub_reachable():
        return path, {}
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return path, {"local_files_only": True}
    raise ModelPathError(f"model '{path}' is neither a local folder or file nor cached, and the Hugging Face Hub "
                         f"is not reachable; pass a local model folder (or 'builtin')")


_HUB_REACHABLE: bool | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connect (False when HF_HUB_OFFLINE is set); cached."""
    global _HUB_REACHABLE
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if _HUB_REACHABLE is None:
        import socket
        from urllib.parse import urlparse

        url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
    return _HUB_REACHABLE


def load_tokenizer(path: str, trust_remote_code: bool = False, padding_side: str = "right"):
    """The model's own tokenizer with a pad token distinct from EOS where possible."""
    from transformers import AutoTokenizer

    directory, extra = split_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as err:
        raise ModelPathError(f"cannot load a tokenizer from {path}: {err}") from err
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # A pad distinct from EOS keeps "last non-pad token" (what HF's sequence classifiers score) on
        # the answer's EOS rather than before it.
        if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = padding_side
    return tokenizer


def model_config(path: str, trust_remote_code: bool = False):
    """The AutoConfig of a model path (a clear error when it is not a model)."""
    from transformers import AutoConfig

    directory, extra = split_model_path(path)
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as err:
        raise ModelPathError(f"cannot read a model config from {path}: {err}") from err


def dense_gguf_kwargs() -> dict[str, Any]:
    """from_pretrained kwargs that unpack a GGUF file into a plain dense model (trainable and saveable).

    transformers 5 otherwise keeps the quantizer attached (or the weights in GGUF blocks where it has a
    kernel), and save_pretrained then refuses the model as "quantized with gguf and not serializable".
    """
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4.x dequantises GGUF files and attaches no quantizer
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_model(model_class, path: str, tokenizer=None, dropout: float | None = None,
               dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               config_updates: dict[str, Any] | None = None, **kwargs):
    """`model_class.from_pretrained(path)` with dropout override and embeddings sized to the tokenizer."""
    directory, extra = split_model_path(path)
    config = model_config(path, trust_remote_code)
    archs = getattr(config, "architectures", None) or []
    if model_class.__name__.endswith("ForCausalLM") and archs and \
            all(a.endswith(("ForSequenceClassification", "ForTokenClassification")) for a in archs):
        raise ModelPathError(f"{path} holds a {archs[0]} (a reward/critic model), but a causal LM is needed here "
                             f"(a pretrained model or a step-1/step-3 actor output)")
    for key, value in (config_updates or {}).items():  # e.g. num_labels=1 for a reward model
        setattr(config, key, value)
    if dropout is not None:
        for key in ("dropout", "attention_dropout", "hidden_dropout", "activation_dropout",
                    "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout_prob"):
            if hasattr(config, key):
                setattr(config, key, dropout)
    if tokenizer is not None:
        config.pad_token_id = tokenizer.pad_token_id
    if "gguf_file" in extra:
        extra = extra | dense_gguf_kwargs()
    try:
        model = model_class.from_pretrained(directory, config=config, dtype=dtype,
                                            trust_remote_code=trust_remote_code, **extra, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelPathError(f"cannot load {model_class.__name__} from {path}: {err}") from err
    if tokenizer is not None:
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON file's content, or {} when it is absent."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


def create_hf_model(model_class, path: str, tokenizer, ds_config: dict, dtype: torch.dtype,
                    dropout: float | None = None, gradient_checkpointing: bool = False,
                    trust_remote_code: bool = False, config_updates: dict[str, Any] | None = None):
    """Load a model for a DeepSpeed engine; under ZeRO-3 it is partitioned while loading (zero.Init)."""
    zero3_guard = None
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        zero3_guard = HfDeepSpeedConfig(ds_config)  # noqa: F841 (must stay alive during from_pretrained)
    model = load_model(model_class, path, tokenizer, dropout, dtype, trust_remote_code, config_updates)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    del zero3_guard
    return model
