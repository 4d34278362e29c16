"""Step 1 end to end: 1 rank (ZeRO 0, LoRA) and 2 ranks (ZeRO 3) on the builtin model and task."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import QUICK_STEP1, REPO, STEP1, metrics, run

PROMPT_EVAL = REPO / "training" / "step1_supervised_finetuning" / "prompt_eval.py"


def _loads_and_generates(path) -> None:
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tok("Human: Name some fruits. Assistant:", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_one_rank_lowers_eval_loss_and_saves_plain_hf(tmp_path):
    out = tmp_path / "sft"
    proc = run([STEP1, "--output_dir", out, "--data_output_path", tmp_path / "data", *QUICK_STEP1])
    evals = metrics(out)["evals"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert "judge score on 8 held-out prompts: untrained" in proc.stdout
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    assert (out / "dschat_complete.json").exists()
    _loads_and_generates(out)
    # Runs you can see (issue 29): metrics.jsonl, the plot and TensorBoard (on by default) survive the atomic save;
    # the model card names the base model and the held-out metrics.
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    assert [x["step"] for x in train] == list(range(1, len(train) + 1)) and all("loss" in x and "lr" in x for x in train)
    assert [x["step"] for x in lines if x["kind"] == "eval"] == [0, train[-1]["step"]]
    assert (out / "training_curves.png").stat().st_size > 10_000 and list(out.glob("step1_tensorboard/events.*"))
    card = (out / "README.md").read_text()
    assert all(k in card for k in ("builtin", "supervised fine-tuning", "| perplexity |", "| judge |", "--seed",
                                   " train rows; "))
    # prompt_eval compares the base model with the result on held-out prompts, judge scores included.
    proc = run([PROMPT_EVAL, "--model_name_or_path_finetune", out, "--num_prompts", "2", "--max_new_tokens", "8"])
    assert proc.stdout.count("==========baseline:") == 2 and proc.stdout.count("==========finetune:") == 2
    assert "mean judge over 2 held-out prompts: baseline" in proc.stdout
    assert "per answer, finetune: items " in proc.stdout and "outside " in proc.stdout


def test_lora_is_merged_on_save(tmp_path):
    out = tmp_path / "lora"
    run([STEP1, "--output_dir", out, "--data_output_path", tmp_path / "data", "--lora_dim", "4",
         "--only_optimize_lora", "--lora_learning_rate", "1e-2", *QUICK_STEP1])
    state = load_file(str(out / "model.safetensors"))
    assert not [k for k in state if "lora" in k]
    from dschat.models.builtin import BUILTIN_MODEL_DIR

    original = load_file(f"{BUILTIN_MODEL_DIR}/model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[q], original[q])  # the LoRA delta was folded in
    assert torch.equal(state["model.norm.weight"], original["model.norm.weight"])  # frozen, not LoRA
    _loads_and_generates(out)


def test_two_ranks_zero3_saves_loadable_model(tmp_path):
    out = tmp_path / "z3"
    run([STEP1, "--output_dir", out, "--data_output_path", tmp_path / "data", "--zero_stage", "3", *QUICK_STEP1],
        ranks=2)
    evals = metrics(out)["evals"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    state = load_file(str(out / "model.safetensors"))
    assert all(t.numel() > 0 for t in state.values())  # gathered, not ZeRO-3 placeholders
    _loads_and_generates(out)


def test_bf16_with_length_grouped_batches_lowers_eval_loss(tmp_path):
    out = tmp_path / "bf16"
    run([STEP1, "--output_dir", out, "--data_output_path", tmp_path / "data", *QUICK_STEP1, "--dtype", "bf16",
         "--group_by_length"])
    evals = metrics(out)["evals"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    state = load_file(str(out / "model.safetensors"))
    assert all(t.dtype in (torch.bfloat16, torch.float32) and torch.isfinite(t.float()).all() for t in state.values())
    _loads_and_generates(out)
