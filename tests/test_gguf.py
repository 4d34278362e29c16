"""--export_gguf (issue 29 item 6): the GGUF written from a saved builtin model loads back with transformers' GGUF
loader to the same logits and the same token ids; the flag reaches the writer and refuses non-Llama models
before training."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dschat.cli import steps
from dschat.models import gguf_export
from dschat.models.builtin import BUILTIN_MODEL_DIR
from dschat.models.export import export_gguf, save_hf_model
from dschat.models.loading import load_tokenizer
from dschat.runtime.errors import FlagError

PROMPTS = ["Human: Name three birds. Assistant:", "Some birds are owl, crow and swan.",
           "A pear belongs to the fruits 123!  x\n\ny </s>"]
ROUNDING = {"f16": torch.float16, "bf16": torch.bfloat16}


def loaded_back(gguf_file: Path, folder: Path):
    """The model and tokenizer transformers' GGUF loader makes of `gguf_file` alone (a folder holding only it:
    beside a tokenizer.json, AutoTokenizer would read that instead)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.mkdir()
    os.link(gguf_file, folder / gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file.name)


def rounded(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` with its matrices rounded to `dtype` (norms kept f32, as the GGUF stores them)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.copy_(param.to(dtype).float())
    return model


def test_gguf_round_trip_gives_the_same_logits_and_token_ids(tmp_path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(BUILTIN_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(BUILTIN_MODEL_DIR, dtype=torch.float32)
    out = tmp_path / "sft"
    save_hf_model(model, tokenizer, str(out), gguf_type="f32")  # the steps' save: the model, then its GGUF
    saved_tok = load_tokenizer(str(out))
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = [saved_tok(p, return_tensors="pt").input_ids for p in PROMPTS]
    for gguf_type in gguf_export.GGUF_TYPES:
        file = out / f"model-{gguf_type}.gguf"
        if gguf_type != "f32":
            assert export_gguf(str(out), gguf_type) == file
        reader = GGUFReader(file)
        names = {t.name for t in reader.tensors}
        assert {"token_embd.weight", "output_norm.weight", "blk.3.attn_q.weight", "blk.0.ffn_gate.weight",
                "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "blk.0.attn_output.weight"} <= names
        assert "output.weight" not in names and len(names) == 2 + 9 * 4  # tied embeddings: no output tensor
        assert reader.fields["llama.block_count"].contents() == 4
        assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
        back, back_tok = loaded_back(file, tmp_path / f"alone-{gguf_type}")
        expected = reference if gguf_type == "f32" else \
            rounded(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), ROUNDING[gguf_type])
        with torch.no_grad():
            for prompt, prompt_ids in zip(PROMPTS, ids):
                assert back_tok(prompt, return_tensors="pt").input_ids.tolist() == prompt_ids.tolist(), prompt
                logits = back(prompt_ids).logits
                assert (logits - expected(prompt_ids).logits).abs().max().item() < 1e-5, gguf_type
                if gguf_type != "f32":  # and within its rounding of the f32 model
                    assert (logits - reference(prompt_ids).logits).abs().max().item() < 1.0, gguf_type
        assert back_tok.chat_template == saved_tok.chat_template and back_tok.chat_template  # the dschat template
        assert (back_tok.bos_token_id, back_tok.eos_token_id, back_tok.pad_token_id) == \
            (saved_tok.bos_token_id, saved_tok.eos_token_id, saved_tok.pad_token_id)


def test_export_gguf_flag_on_steps_1_3_and_dpo_refuses_other_families_before_training(tmp_path, capsys):
    from transformers import GPT2Config

    assert steps.parse_sft_args(["--export_gguf", "bf16"]).export_gguf == "bf16"
    assert steps.parse_dpo_args(["--export_gguf", "f16"]).export_gguf == "f16"
    assert steps.parse_ppo_args(["--actor_model_name_or_path", "builtin", "--export_gguf", "f32"]).export_gguf == "f32"
    with pytest.raises(SystemExit):  # step 2 trains a reward model, not a causal LM: no such flag
        steps.parse_rm_args(["--export_gguf", "f32"])
    assert "--export_gguf" in capsys.readouterr().err
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16).save_pretrained(gpt2)
    for parse, flag in ((steps.parse_sft_args, "--model_name_or_path"), (steps.parse_dpo_args, "--model_name_or_path"),
                        (steps.parse_ppo_args, "--actor_model_name_or_path")):
        with pytest.raises(FlagError, match=f"^--export_gguf f16: .*{flag} {gpt2} is model_type 'gpt2'") as err:
            parse([flag, str(gpt2), "--export_gguf", "f16", "--output_dir", str(tmp_path / "out")])
        assert "\n" not in str(err.value)


def test_gguf_round_trip_of_grouped_query_attention_and_an_untied_head(tmp_path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(BUILTIN_MODEL_DIR)
    torch.manual_seed(0)  # K is permuted per KV head (2 here, 4 query heads), as SmolLM2's 3 of 9
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, rope_theta=50000.0, rms_norm_eps=1e-5)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "gqa")
    tokenizer.save_pretrained(tmp_path / "gqa")
    file = gguf_export.write_gguf(tmp_path / "gqa", "f32")
    reader = GGUFReader(file)
    assert "output.weight" in {t.name for t in reader.tensors}
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    assert reader.fields["llama.rope.freq_base"].contents() == 50000.0
    back, _ = loaded_back(file, tmp_path / "alone")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "gqa", dtype=torch.float32).eval()
    ids = tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        assert (back(ids).logits - reference(ids).logits).abs().max().item() < 1e-5
