"""DPO: the loss math by hand, the collator, the flag checks, one real 1-rank run on the builtin model, and
e2e_rlhf.py --algo dpo (script choice, outputs, summary, chat hint) with a fake step runner."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import time

import pytest
import torch

import e2e_rlhf
from dschat.algos.losses import dpo_loss, sequence_logprobs
from dschat.cli import e2e
from dschat.data.collators import DPOCollator
from dschat.runtime.errors import FlagError
from tests.helpers import REPO, metrics, run
from tests.test_e2e import S1, FakeRunner, fake_done

DPO_DIR = REPO / "training" / "step2_dpo_finetuning"
DPO_MAIN = DPO_DIR / "main.py"
DPO_SCRIPTS = DPO_DIR / "training_scripts"


def close(actual, expected, tol: float = 1e-6) -> None:
    """Scalar (or list) equality within `tol`."""
    actual = torch.as_tensor(actual, dtype=torch.float64).flatten().tolist()
    expected = torch.as_tensor(expected, dtype=torch.float64).flatten().tolist()
    assert len(actual) == len(expected) and all(abs(a - b) <= tol for a, b in zip(actual, expected)), \
        (actual, expected)


# ---------------------------------------------------------------- pure functions, by hand

def test_sequence_logprobs_sums_shifted_label_tokens():
    ln3 = math.log(3.0)
    # V = 2. Position t predicts label t+1. Logits [ln 3, 0] give p = (3/4, 1/4); [0, 0] give (1/2, 1/2).
    logits = torch.tensor([[[ln3, 0.0], [0.0, 0.0], [5.0, -5.0]],
                           [[0.0, ln3], [ln3, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 0, 1],        # log p(0 | pos 0) + log p(1 | pos 1) = log 3/4 + log 1/2
                           [-100, -100, 0]])    # only log p(0 | pos 1) = log 3/4; the last logits are unused
    out = sequence_logprobs(logits, labels)
    assert out.shape == (2,)
    close(out, [math.log(0.75) + math.log(0.5), math.log(0.75)])
    # A row with no label tokens sums to 0, and -100 never reaches gather as an index.
    close(sequence_logprobs(logits[:1], torch.full((1, 3), -100)), [0.0])


def test_dpo_sigmoid_loss_and_stats_by_hand():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    beta = 0.5
    # log-ratios: chosen (1, 0), rejected (-1, 1); h = (2, -1); -logsigmoid(x) = log1p(exp(-x))
    loss, stats = dpo_loss(pc, pr, rc, rr, beta)
    close(loss, (math.log1p(math.exp(-beta * 2)) + math.log1p(math.exp(-beta * -1))) / 2)
    close(stats["chosen_rewards"], [0.5, 0.0])
    close(stats["rejected_rewards"], [-0.5, 0.5])
    close(stats["margin"], ((0.5 + 0.5) + (0.0 - 0.5)) / 2)  # 0.25
    close(stats["accuracy"], 0.5)  # pair 1 right, pair 2 wrong


def test_dpo_ipo_loss_by_hand():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    beta = 0.5  # target h = 1 / (2 beta) = 1; h = (2, -1): squared errors 1 and 4
    loss, stats = dpo_loss(pc, pr, rc, rr, beta, kind="ipo")
    close(loss, (1.0 + 4.0) / 2)
    close(stats["margin"], 0.25)
    with pytest.raises(ValueError, match="unknown DPO loss kind"):
        dpo_loss(pc, pr, rc, rr, beta, kind="hinge")


def test_dpo_loss_at_the_reference_and_its_gradient():
    """Policy == reference: loss log 2, zero rewards, ties are not counted as correct; the gradient raises
    the chosen log-prob and lowers the rejected one, each by beta * sigmoid(-beta * h) / B."""
    lp = torch.tensor([-4.0, -6.0])
    loss, stats = dpo_loss(lp, lp, lp, lp, 0.1)
    close(loss, math.log(2.0))
    close(stats["margin"], 0.0)
    close(stats["accuracy"], 0.0)
    pc, pr = torch.tensor([-1.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    loss, _ = dpo_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    loss.backward()
    sig = 1 / (1 + math.exp(0.5 * 2))  # sigmoid(-beta * h), h = 1 - (-1) = 2
    close(pc.grad, [-0.5 * sig])
    close(pr.grad, [0.5 * sig])
    assert not stats["chosen_rewards"].requires_grad


def test_dpo_collator_labels_only_answer_tokens():
    rows = [{"chosen_ids": [1, 5, 6, 2], "rejected_ids": [1, 5, 2], "prompt_len": 2},
            {"chosen_ids": [1, 7, 2], "rejected_ids": [1, 8, 9, 9, 2], "prompt_len": 1}]
    batch = DPOCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2, 0], [1, 7, 2, 0, 0], [1, 5, 2, 0, 0], [1, 8, 9, 9, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"].tolist() == [[-100, -100, 6, 2, -100], [-100, 7, 2, -100, -100],
                                        [-100, -100, 2, -100, -100], [-100, 8, 9, 9, 2]]


# ---------------------------------------------------------------- flags

def load_dpo_parse_args():
    spec = importlib.util.spec_from_file_location("dpo_main", DPO_MAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


def test_dpo_flags():
    parse_args = load_dpo_parse_args()
    args = parse_args([])
    assert (args.beta, args.loss_type, args.learning_rate, args.tensorboard_path) == \
        (0.1, "sigmoid", 5e-4, "step2_dpo_tensorboard")
    assert parse_args(["--loss_type", "ipo", "--beta", "0.5"]).loss_type == "ipo"
    for bad in ("0", "-0.1", "nan", "inf"):
        with pytest.raises(FlagError, match="--beta must be a finite number > 0"):
            parse_args(["--beta", bad])
    with pytest.raises(FlagError, match="--num_train_epochs must be at least 1"):
        parse_args(["--num_train_epochs", "0"])


def test_dpo_scripts_parse():
    for script in sorted(DPO_SCRIPTS.rglob("*.sh")):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
    assert {p.name for p in DPO_SCRIPTS.glob("*.sh")} >= {"run_tiny_cpu.sh", "run_generic.sh"}


# ---------------------------------------------------------------- one real run

def test_two_rank_zero3_dpo_run_moves_implicit_rewards_and_saves_causal_lm(tmp_path):
    """From the builtin model, policy and frozen reference both ZeRO-3-partitioned over 2 ranks (22 updates
    of 2 x 16 pairs): policy == reference at the start (rewards exactly 0), then chosen answers' implicit
    rewards pull ahead of the rejected ones, in training and on the eval split; the saved policy is whole."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "dpo"
    proc = run([DPO_MAIN, "--output_dir", out, "--data_output_path", tmp_path / "data", "--data_split", "1,6,93",
                "--max_seq_len", "64", "--eval_iters", "4", "--num_judge_prompts", "8", "--max_new_tokens", "12",
                "--zero_stage", "3"], ranks=2)
    assert "step 2 (DPO, sigmoid, beta 0.1) done" in proc.stdout
    assert "judge score on 8 held-out prompts: start" in proc.stdout
    saved = metrics(out)
    assert saved["step"] == 2 and saved["steps"] > 0 and saved["skipped_updates"] == 0
    first, last = saved["evals"][0], saved["evals"][-1]
    assert first["when"] == "start" and last["when"] == "epoch 1"
    assert first["reward_margin"] == 0.0 and first["reward_accuracy"] == 0.0
    assert abs(first["dpo_loss"] - math.log(2)) < 1e-5
    assert "train_accuracy" not in first
    assert last["train_accuracy"] > 0.55 and last["train_margin"] > 0.1
    assert last["reward_accuracy"] > 0.55 and last["reward_margin"] > 0.1 and last["dpo_loss"] < math.log(2)
    assert 0.0 <= last["judge"] <= 1.0
    assert (out / "model.safetensors").exists() and (out / e2e.DONE_MARKER).exists()
    assert all(t.numel() > 0 for t in load_file(str(out / "model.safetensors")).values())
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Human: Name some fruits. Assistant:", return_tensors="pt")
    with torch.no_grad():
        assert model(**ids).logits.shape[-1] == model.config.vocab_size


def test_lora_only_dpo_uses_the_policy_without_adapters_as_reference(tmp_path):
    """--lora_dim with --only_optimize_lora: no reference copy, and training is what a copy would give."""
    from safetensors.torch import load_file

    outs = {}
    for name, extra in (("shared", []), ("copy", ["--no_shared_base"])):
        outs[name] = tmp_path / name
        proc = run([DPO_MAIN, "--output_dir", outs[name], "--data_output_path", tmp_path / "data",
                    "--data_split", "1,1,98", "--max_seq_len", "64", "--eval_iters", "2", "--num_judge_prompts", "0",
                    "--lora_dim", "4", "--only_optimize_lora", "--lora_learning_rate", "5e-3", *extra])
        assert ("adapters off" in proc.stdout) == (name == "shared")
    a, b = (load_file(str(outs[n] / "model.safetensors")) for n in ("shared", "copy"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    first, last = metrics(outs["shared"])["evals"][0], metrics(outs["shared"])["evals"][-1]
    assert first["reward_margin"] == 0.0 and last["reward_margin"] != 0.0  # the reference stayed the start model
    assert abs(last["dpo_loss"] - metrics(outs["copy"])["evals"][-1]["dpo_loss"]) < 1e-5


# ---------------------------------------------------------------- e2e_rlhf.py --algo dpo (fake steps)

def test_e2e_dpo_runs_sft_then_dpo(tmp_path, monkeypatch, capsys):
    runner = FakeRunner()
    monkeypatch.setattr(e2e, "run_with_progress", runner)
    out = tmp_path / "out"
    sft, dpo = out / "actor-models/builtin", out / "dpo-models/builtin"
    assert e2e_rlhf.main(["--algo", "dpo", "--output-dir", str(out), "--actor-zero-stage", "2"]) == 0
    assert runner.calls == [
        ["bash", str(S1 / "run_tiny_cpu.sh"), str(sft), "2"],
        ["bash", str(DPO_SCRIPTS / "run_tiny_cpu.sh"), str(dpo), "2", str(sft)]]  # from the SFT model
    assert not (out / "reward-models").exists() and not (out / "step3-models").exists()
    text = capsys.readouterr().out
    assert "Running Step 2 (DPO)" in text and "2 DPO" in text and "start: SFT model, end: DPO" in text
    assert f"Chat with the DPO model: python chat.py --path {dpo}\n" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algo"] == "dpo" and summary["reward_model"] is None
    assert sorted(summary["steps"]) == ["1", "2"] and summary["steps"]["2"]["output"] == str(dpo)
    assert summary["steps"]["2"]["metrics"]["evals"] and summary["chat_command"] == f"python chat.py --path {dpo}"

    # both done: skipped; a newer SFT model makes the DPO output stale, so DPO alone re-runs
    runner.calls.clear()
    assert e2e_rlhf.main(["--algo", "dpo", "--output-dir", str(out)]) == 0
    assert runner.calls == []
    time.sleep(0.05)
    fake_done(1, sft)
    assert e2e_rlhf.main(["--algo", "dpo", "--output-dir", str(out)]) == 0
    assert [c[1] for c in runner.calls] == [str(DPO_SCRIPTS / "run_tiny_cpu.sh")]
    assert "DPO output at" in capsys.readouterr().out


def test_e2e_dpo_needs_step1_and_has_no_step3(tmp_path, monkeypatch, capsys):
    runner = FakeRunner()
    monkeypatch.setattr(e2e, "run_with_progress", runner)
    out = tmp_path / "out"
    assert e2e_rlhf.main(["--algo", "dpo", "--step", "2", "--output-dir", str(out)]) == 1
    assert "Step 1 model has not been trained" in capsys.readouterr().err and runner.calls == []
    with pytest.raises(SystemExit) as stop:
        e2e_rlhf.main(["--algo", "dpo", "--step", "1", "2", "3", "--output-dir", str(out)])
    assert stop.value.code == 2 and "--algo dpo has no step 3" in capsys.readouterr().err
    assert e2e_rlhf.parse_args([]).step == [1, 2, 3] and e2e_rlhf.parse_args([]).algo == "ppo"
    # any other actor goes through DPO's run_generic.sh, again from the SFT output
    spec = e2e.resolve_model("org/my-model")
    assert e2e.pick_dpo_script(spec, out / "actor-models/my-model", "single_gpu") == \
        (DPO_SCRIPTS / "run_generic.sh", [str(out / "actor-models/my-model")])
