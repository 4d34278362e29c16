"""Loading models and tokenizers (HF directories, hub names, GGUF files) and saving plain HF outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from dschat.models.builtin import resolve_model_name
from dschat.runtime.errors import DschatError, ModelPathError

# Files any of which a Hugging Face tokenizer loads from (fast, SentencePiece, BPE, WordPiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "merges.txt", "tiktoken.model", "sentencepiece.bpe.model")


def adapter_only_message(path: str) -> str:
    """The error of a folder that holds a LoRA adapter (adapter_config.json) but no model of its own."""
    try:
        base = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    of = f" (its base: {base})" if base else ""
    return (f"{path} holds a LoRA adapter only{of}, not a model: merge it into its base model (peft: "
            f"PeftModel.from_pretrained(base, '{path}').merge_and_unload().save_pretrained(out), with the base's "
            f"tokenizer) and pass that folder, or pass its base {base or 'model'} itself")


def split_model_path(path: str) -> tuple[str, dict[str, Any]]:
    """Resolve aliases and GGUF files: returns (directory or hub name, extra from_pretrained kwargs)."""
    path = resolve_model_name(path)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ModelPathError(f"GGUF file not found: {path}")
        return str(Path(path).resolve().parent), {"gguf_file": Path(path).name}
    if os.path.isdir(path):
        if not (Path(path) / "config.json").exists() and (Path(path) / "adapter_config.json").exists():
            raise ModelPathError(adapter_only_message(path))
        if not (Path(path) / "config.json").exists():
            inside = [d.name for d in sorted(Path(path).iterdir()) if (d / "config.json").exists()]
            hint = f"; it holds the model folders {', '.join(inside)} (a step-3 output?): pass {Path(path) / inside[0]}" \
                if inside else ""
            raise ModelPathError(f"{path} is a folder but holds no config.json: not a Hugging Face model directory{hint}")
        check_config_json(Path(path) / "config.json")
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


def check_config_json(file: Path) -> None:
    """A config.json that is not a JSON object is named before transformers reads it."""
    try:
        content = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ModelPathError(f"cannot read {file}: {err}") from err
    except json.JSONDecodeError as err:
        raise ModelPathError(f"{file} is not a valid JSON file ({err.msg} at line {err.lineno} column "
                             f"{err.colno}); re-save or re-download the model") from err
    if not isinstance(content, dict):
        raise ModelPathError(f"{file} holds a JSON {type(content).__name__}, not the object of a model config")


def is_file_error(err: BaseException) -> bool:
    """Whether a loader's exception comes from the model's files (corrupt, wrong types), not memory or our checks."""
    return isinstance(err, Exception) and not isinstance(err, (DschatError, MemoryError, torch.OutOfMemoryError))


def where(path: str, name: str) -> str:
    """`name` inside a local model folder (what a message about that file shows), else the path itself."""
    directory, _ = split_model_path(path)
    return str(Path(directory) / name) if os.path.isdir(directory) else path


def load_tokenizer(path: str, trust_remote_code: bool = False, padding_side: str = "right"):
    """The model's own tokenizer with a pad token distinct from EOS where possible."""
    from transformers import AutoTokenizer

    directory, extra = split_model_path(path)
    if os.path.isdir(directory) and "gguf_file" not in extra and \
            not any((Path(directory) / name).exists() for name in TOKENIZER_FILES):
        raise ModelPathError(f"{path} holds no tokenizer files (none of tokenizer.json, tokenizer_config.json, "
                             f"tokenizer.model, vocab.json, ...): copy them from the model it was made from (its "
                             f"tokenizer.save_pretrained into this folder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code, **extra)
    except Exception as err:  # a corrupt or mistyped file can raise anything
        if not is_file_error(err):
            raise
        model_config(path, trust_remote_code)  # a broken config.json (tokenizers read it too) is named as such
        raise ModelPathError(f"cannot load a tokenizer from {path}: {type(err).__name__}: {err}") from err
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
    except Exception as err:  # wrong types raise transformers' validation errors, others TypeError, ...
        if not is_file_error(err):
            raise
        raise ModelPathError(f"cannot read a model config from {path}: {where(path, 'config.json')}: "
                             f"{type(err).__name__}: {err}") from err


def check_weight_files(directory: str) -> None:
    """Read the header of every .safetensors file of a local model folder; a truncated or garbage one is named."""
    from safetensors import safe_open

    if not os.path.isdir(directory):
        return
    for file in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own SafetensorError (not an OSError)
            if not is_file_error(err):
                raise
            raise ModelPathError(f"{file} is not a readable safetensors file (truncated or corrupt: {err}); "
                                 f"re-save or re-download the model") from err


def check_loading_info(info: dict[str, Any], path: str, model: torch.nn.Module, allow_fresh_head: bool) -> None:
    """Refuse weights from_pretrained had to initialise afresh (missing or mis-shaped), or a config that does
    not match the file's weights; a fresh sequence-classification head only where `allow_fresh_head`."""
    missing = sorted(info.get("missing_keys") or [])
    name = type(model).__name__
    # A classifier's head is what lies outside its base model ("score" of Llama, "classifier" of BERT, ...).
    prefix = getattr(model, "base_model_prefix", "")
    head = [k for k in missing if prefix and not k.startswith(prefix + ".")] \
        if name.endswith(("ForSequenceClassification", "ForTokenClassification")) else []
    other = [k for k in missing if k not in head]
    if other:
        raise ModelPathError(f"{path}: weights missing from its files would be initialised at random in {name}: "
                             f"{', '.join(other[:5])}{', ...' if len(other) > 5 else ''} ({len(other)} in all); "
                             f"the folder is incomplete or its config.json does not match its weights")
    if head and not allow_fresh_head:
        raise ModelPathError(f"{path} has no trained {head[0].split('.')[0]} head ({', '.join(head)} would be "
                             f"initialised at random): it is not a reward model (a causal LM?); train one with "
                             f"step 2 and pass its --output_dir")
    mismatched = sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys") or [])
    if mismatched:
        raise ModelPathError(f"{path}: weights whose shapes do not match its config.json: {', '.join(mismatched[:5])}")
    # Weights of the file the model has no place for: another task's head is fine (a causal LM's lm_head in a
    # reward model), the base model's own weights are not (a config with fewer layers than the file).
    unused = sorted(k for k in info.get("unexpected_keys") or []
                    if prefix and k.startswith(prefix + ".") and k.endswith((".weight", ".bias")))
    if unused:
        raise ModelPathError(f"{path}: {len(unused)} weights of its files have no place in {name} "
                             f"({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''}); its config.json "
                             f"does not describe these weights")


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
               config_updates: dict[str, Any] | None = None, allow_fresh_head: bool = False, **kwargs):
    """`model_class.from_pretrained(path)` with dropout override and embeddings sized to the tokenizer.

    Every weight must come from the files: a weight from_pretrained would initialise at random is a
    ModelPathError, except a sequence classifier's head when `allow_fresh_head` (step 2 starting a reward
    model from a causal LM).
    """
    directory, extra = split_model_path(path)
    check_weight_files(directory)
    config = model_config(path, trust_remote_code)
    archs = getattr(config, "architectures", None) or []
    if model_class.__name__.endswith("ForCausalLM") and archs and \
            all(a.endswith(("ForSequenceClassification", "ForTokenClassification")) for a in archs):
        raise ModelPathError(f"{path} holds a {archs[0]} (a reward/critic model), but a causal LM is needed here "
                             f"(a pretrained model or a step-1/step-3 actor output)")
    for key, value in (config_updates or {}).items():  # e.g. num_labels=1 for a reward model
        setattr(config, key, value)
    if dropout is not None:
        # Every dropout rate the config has (GPT-2 also carries summary_first_dropout), as heads.has_dropout reads them.
        numeric = [k for k, v in config.to_dict().items() if ("dropout" in k or "pdrop" in k)
                   and isinstance(v, (int, float)) and not isinstance(v, bool)]
        for key in ("dropout", "attention_dropout", "hidden_dropout", "activation_dropout",
                    "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout_prob", *numeric):
            if hasattr(config, key):
                setattr(config, key, dropout)
    if tokenizer is not None:
        config.pad_token_id = tokenizer.pad_token_id
    if "gguf_file" in extra:
        extra = extra | dense_gguf_kwargs()
    try:
        model, info = model_class.from_pretrained(directory, config=config, dtype=dtype, output_loading_info=True,
                                                  trust_remote_code=trust_remote_code, **extra, **kwargs)
    except Exception as err:  # corrupt weights raise OSError, RuntimeError, SafetensorError, ...
        if not is_file_error(err):
            raise
        raise ModelPathError(f"cannot load {model_class.__name__} from {path}: {type(err).__name__}: {err}") from err
    check_loading_info(info, path, model, allow_fresh_head)
    if tokenizer is not None:
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON file's object, or {} when it is absent; unreadable, invalid or non-object content names the file."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelPathError(f"{path} is not a readable JSON file ({err}); fix or remove it") from err
    if not isinstance(content, dict):
        raise ModelPathError(f"{path} holds a JSON {type(content).__name__}, not an object; fix or remove it")
    return content


def create_hf_model(model_class, path: str, tokenizer, ds_config: dict, dtype: torch.dtype,
                    dropout: float | None = None, gradient_checkpointing: bool = False,
                    trust_remote_code: bool = False, config_updates: dict[str, Any] | None = None,
                    allow_fresh_head: bool = False, default_dropout: float | None = None):
    """Load a model for a DeepSpeed engine; under ZeRO-3 it is partitioned while loading (zero.Init).

    `dropout` None means `default_dropout`, and that None keeps the model config's rates. A trained policy whose
    log-probs are compared with a dropout-free reference or old policy (DPO, the PPO actor) passes 0.0 here,
    so its default is no dropout (OPT and GPT-2 configs carry 0.1); an explicit `dropout` still wins.
    """
    if dropout is None:
        dropout = default_dropout
    zero3_guard = None
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        zero3_guard = HfDeepSpeedConfig(ds_config)  # noqa: F841 (must stay alive during from_pretrained)
    model = load_model(model_class, path, tokenizer, dropout, dtype, trust_remote_code, config_updates,
                       allow_fresh_head)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    del zero3_guard
    return model
