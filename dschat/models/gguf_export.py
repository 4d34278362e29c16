"""Writing a saved Llama-family model folder as one GGUF file (llama.cpp, Ollama): `--export_gguf f32|f16|bf16`.

The reverse of loading a .gguf (models/loading.py hands those to transformers' GGUF loader): llama.cpp's
tensor names (`LLAMA_TENSOR_NAMES`), its architecture keys, the Q and K projections permuted as llama.cpp's
convert_hf_to_gguf.py does for Llama (transformers' loader un-permutes them), the byte-level BPE tokenizer
(tokenizer.ggml.model "gpt2": tokens, token types, merges, special ids) and the chat template. Weights
are read from the folder's safetensors, so a save at any ZeRO stage or with LoRA (merged) exports the same
way. Only what this writer can state exactly is accepted: `export_refusal` names anything else (another
family, biases, scaled RoPE, a tokenizer that is not byte-level BPE) in one line, which the steps check
before training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dschat.runtime.errors import ModelPathError

GGUF_TYPES = ("f32", "f16", "bf16")
# Hugging Face Llama names (the part without "model.layers.N." and ".weight") -> llama.cpp's names.
LLAMA_TENSOR_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
# llama.cpp's names of the byte-level pre-tokenizers this writer recognises (tokenizer.ggml.pre).
GPT2_PRE, SMOLLM_PRE = "gpt-2", "smollm"


def gguf_file_name(gguf_type: str) -> str:
    """The file an export of this type writes into the model folder: model-<type>.gguf."""
    return f"model-{gguf_type}.gguf"


def gguf_tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name of a Hugging Face Llama weight (None for a name outside the table)."""
    if not hf_name.endswith(".weight"):
        return None
    stem = hf_name.removesuffix(".weight")
    parts = stem.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        leaf = LLAMA_TENSOR_NAMES.get(".".join(parts[3:]))
        return f"blk.{parts[2]}.{leaf}.weight" if leaf else None
    leaf = LLAMA_TENSOR_NAMES.get(stem)
    return f"{leaf}.weight" if leaf else None


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Q or K rows reordered from Hugging Face's rotary layout (halves) to llama.cpp's (pairs), per head."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def rope_settings(config: Any) -> tuple[str | None, float]:
    """(rope type, rope theta) of a Llama config (transformers 5's rope_parameters or 4's rope_theta/rope_scaling)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type"))
    return kind, float(theta)


def pre_tokenizer_name(backend: dict[str, Any]) -> str | None:
    """llama.cpp's pre-tokenizer name of a byte-level BPE tokenizer.json (None when this writer knows no match)."""
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]

    def byte_level(step: dict[str, Any]) -> bool:
        return step.get("type") == "ByteLevel" and step.get("use_regex", True) and not step.get("add_prefix_space")

    if backend.get("normalizer") is not None:
        return None
    if len(steps) == 1 and byte_level(steps[0]):
        return GPT2_PRE
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and byte_level(steps[1]):
        return SMOLLM_PRE
    return None


def export_refusal(config: Any, tokenizer: Any, path: str) -> str | None:
    """Why the model at `path` (its config and tokenizer) cannot be written as GGUF here; None when it can."""
    model_type = getattr(config, "model_type", None)
    archs = getattr(config, "architectures", None) or []
    if model_type != "llama" or any(a != "LlamaForCausalLM" for a in archs):
        what = f"model_type '{model_type}'" + (f" ({archs[0]})" if archs else "")
        return (f"GGUF export writes Llama-family causal LMs only (LlamaForCausalLM, model_type 'llama'); "
                f"{path} is {what}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return f"{path} is a Llama with attention or MLP biases, which llama.cpp's Llama has no place for"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"{path} is a Llama with hidden_act '{config.hidden_act}'; llama.cpp's Llama uses silu"
    rope_type, _ = rope_settings(config)
    if rope_type not in (None, "default"):
        return f"{path} uses scaled RoPE ('{rope_type}'), which this GGUF writer does not write"
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model = backend.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or pre_tokenizer_name(backend) is None:
        kind = model.get("type") or type(tokenizer).__name__
        return (f"GGUF export writes byte-level BPE tokenizers (GPT-2 style, tokenizer.ggml.model gpt2) only; the "
                f"tokenizer of {path} is {kind}" + (" with byte fallback" if model.get("byte_fallback") else "")
                + ("" if model.get("type") != "BPE" or model.get("byte_fallback") else " with a pre-tokenizer "
                   "llama.cpp names differently"))
    return None


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model folder's safetensors files (shards included)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelPathError(f"{folder} holds no .safetensors weights to write as GGUF")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE tokenizer, padded with unused [PADn] tokens to the
    model's `vocab_size` (as llama.cpp's converter does)."""
    from gguf import TokenType

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    added = {t["id"]: t for t in backend.get("added_tokens", [])}
    tokens, types = [], []
    for index in range(vocab_size):
        token = tokenizer.backend_tokenizer.id_to_token(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(int(TokenType.UNUSED))
        else:
            tokens.append(token)
            kind = TokenType.NORMAL if index not in added else \
                TokenType.CONTROL if added[index].get("special") else TokenType.USER_DEFINED
            types.append(int(kind))
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"].get("merges", [])]
    return tokens, types, merges


def write_gguf(folder: str | os.PathLike, gguf_type: str, out_file: str | os.PathLike | None = None) -> Path:
    """Write the Llama model saved in `folder` as `<folder>/model-<type>.gguf` (or `out_file`), atomically."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type must be one of {GGUF_TYPES} (got {gguf_type})")
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reason = export_refusal(config, tokenizer, str(folder))
    if reason:
        raise ModelPathError(f"--export_gguf {gguf_type}: {reason}")
    out = Path(out_file) if out_file is not None else folder / gguf_file_name(gguf_type)
    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    state = read_state_dict(folder)
    vocab_size = state["model.embed_tokens.weight"].shape[0]
    if len(tokenizer) > vocab_size:
        raise ModelPathError(f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model's embeddings only "
                             f"{vocab_size} rows")
    tied = bool(getattr(config, "tie_word_embeddings", False)) or "lm_head.weight" not in state
    names = {k: gguf_tensor_name(k) for k in state if not (tied and k == "lm_head.weight")}
    unknown = sorted(k for k, v in names.items() if v is None)
    if unknown:
        raise ModelPathError(f"{folder}: weights with no llama.cpp Llama name: {', '.join(unknown[:5])}")

    file_type, wide = {"f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
                       "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
                       "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16)}[gguf_type]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(folder.resolve().name)
        writer.add_file_type(int(file_type))
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(int(config.num_hidden_layers))
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_head_count(int(n_head))
        writer.add_head_count_kv(int(n_kv))
        writer.add_rope_freq_base(rope_settings(config)[1])
        writer.add_rope_dimension_count(int(head_dim))
        if head_dim != config.hidden_size // n_head:
            writer.add_key_length(int(head_dim))
            writer.add_value_length(int(head_dim))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(int(vocab_size))
        add_tokenizer(writer, tokenizer, vocab_size)
        for hf_name, name in names.items():
            weight = state[hf_name].float()
            if name.endswith("attn_q.weight"):
                weight = permute_qk(weight, n_head)
            elif name.endswith("attn_k.weight"):
                weight = permute_qk(weight, n_kv)
            data = weight.numpy()
            if data.ndim == 1 or wide == gguf.GGMLQuantizationType.F32:  # norms stay f32, as llama.cpp writes them
                writer.add_tensor(name, data)
            elif wide == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(name, data.astype(np.float16))
            else:
                writer.add_tensor(name, gguf.quantize(data, wide), raw_dtype=wide)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """tokenizer.ggml.* (byte-level BPE: tokens, types, merges, special ids, BOS/EOS added or not) and the chat
    template."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens, types, merges = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    probe = tokenizer("a")["input_ids"]  # what the tokenizer adds around a text, as llama.cpp should
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
