"""Step 2: reward-model losses, end positions under every padding, the plain-HF checkpoint, and real runs
(1 rank on the builtin task, 2 ranks ZeRO-3 through the deepspeed launcher, the Anthropic HH data)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dschat.algos.losses import divergence_loss, divergence_span, pairwise_accuracy, pairwise_loss  # noqa: E402
from dschat.algos.masked import end_index, end_scores  # noqa: E402
from dschat.data.collators import pad_sequences  # noqa: E402
from dschat.data.phases import phase_rows, tokenize_row  # noqa: E402
from dschat.data.prompts import PromptFormat  # noqa: E402
from dschat.models.builtin import BUILTIN_MODEL_DIR  # noqa: E402
from dschat.models.heads import create_reward_model, head_name, token_values  # noqa: E402
from dschat.models.loading import load_tokenizer  # noqa: E402
from tests.helpers import DEEPSPEED, env, free_port  # noqa: E402

STEP2 = REPO / "training" / "step2_reward_model_finetuning"
HH_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"


def run_step2(args: list[str], launcher: list[str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run step 2's main.py (plain python, or under `launcher`) from the repo root; fail with its output."""
    cmd = (launcher or [sys.executable]) + [str(STEP2 / "main.py"), *args]
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(BUILTIN_MODEL_DIR)


@pytest.fixture(scope="module")
def reward_model(tokenizer):
    torch.manual_seed(0)
    return create_reward_model(BUILTIN_MODEL_DIR, tokenizer, {}, torch.float32).eval()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_files"))


# ------------------------------------------------------------------------------------------------ losses
def test_pairwise_loss_and_margin():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([0.0, 1.0])
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(0.5))) / 2
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    with_margin = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.5))) / 2
    assert pairwise_loss(chosen, rejected, margin=1.0).item() == pytest.approx(with_margin, rel=1e-6)
    # gradient pushes chosen up and rejected down
    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    pairwise_loss(c, r).backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()


def test_pairwise_accuracy_counts_ties_as_wrong():
    acc = pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 3.0, 3.0, -1.0]))
    assert acc.item() == pytest.approx(0.5)


def test_divergence_span_and_loss_on_a_hand_example():
    # prompt 5 6 | chosen answer 7 8 EOS(2) | rejected answer 9 EOS ; pad 0, right padding
    c_ids = torch.tensor([[5, 6, 7, 8, 2, 0, 0]])
    c_mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    r_ids = torch.tensor([[5, 6, 9, 2, 0, 0, 0]])
    r_mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    span = divergence_span(c_ids, r_ids, c_mask, r_mask)
    assert span.int().tolist() == [[0, 0, 1, 1, 1, 0, 0]]  # first difference (2) .. longer end (4)
    c_val = torch.tensor([[9.0, 9.0, 1.0, 2.0, 3.0, 9.0, 9.0]])
    r_val = torch.tensor([[-9.0, -9.0, 0.0, 0.0, 1.0, 5.0, 5.0]])
    expected = sum(math.log1p(math.exp(-d)) for d in (1.0, 2.0, 2.0)) / 3
    assert divergence_loss(c_val, r_val, c_ids, r_ids, c_mask, r_mask).item() == pytest.approx(expected, rel=1e-6)


def test_divergence_span_prefix_and_identical_pairs():
    # rejected = chosen + more tokens: diverges where chosen ends
    c_ids, c_mask = torch.tensor([[5, 6, 2, 0]]), torch.tensor([[1, 1, 1, 0]])
    r_ids, r_mask = torch.tensor([[5, 6, 2, 7]]), torch.tensor([[1, 1, 1, 1]])
    assert divergence_span(c_ids, r_ids, c_mask, r_mask).int().tolist() == [[0, 0, 0, 1]]
    # identical pair: only the last real token
    same, same_mask = torch.tensor([[5, 6, 2, 0]]), torch.tensor([[1, 1, 1, 0]])
    assert divergence_span(same, same, same_mask, same_mask).int().tolist() == [[0, 0, 1, 0]]


def deepspeed_chat_divergence_loss(c_ids, r_ids, c_val, r_val, pad_id: int) -> torch.Tensor:
    """DeepSpeed-Chat's RewardModel.forward loss loop (num_padding_at_beginning=0), written out for comparison."""
    total, seq_len = 0.0, c_ids.shape[1]
    for i in range(c_ids.shape[0]):
        c_inds = (c_ids[i] == pad_id).nonzero()
        c_ind = c_inds[0].item() if len(c_inds) > 0 else seq_len
        diverge = (c_ids[i] != r_ids[i]).nonzero()
        r_inds = (r_ids[i] == pad_id).nonzero()
        r_ind = r_inds[0].item() if len(r_inds) > 0 else seq_len
        end, div = max(c_ind, r_ind), diverge[0].item()
        total += -F.logsigmoid(c_val[i, div:end] - r_val[i, div:end]).mean()
    return total / c_ids.shape[0]


def test_divergence_loss_matches_deepspeed_chat_on_random_pairs():
    gen = torch.Generator().manual_seed(0)
    pad, batch, length = 0, 16, 12
    c_rows, r_rows = [], []
    for _ in range(batch):
        prompt = torch.randint(3, 50, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist()
        a = torch.randint(3, 50, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
        b = torch.randint(3, 50, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
        if a == b:
            b = b + [7]
        c_rows.append(prompt + a + [2])
        r_rows.append(prompt + b + [2])
    c_ids = pad_sequences([r + [pad] * (length - len(r)) for r in c_rows], pad)
    r_ids = pad_sequences([r + [pad] * (length - len(r)) for r in r_rows], pad)
    c_mask, r_mask = (c_ids != pad).long(), (r_ids != pad).long()
    c_val, r_val = torch.randn(batch, length, generator=gen), torch.randn(batch, length, generator=gen)
    ours = divergence_loss(c_val, r_val, c_ids, r_ids, c_mask, r_mask)
    theirs = deepspeed_chat_divergence_loss(c_ids, r_ids, c_val, r_val, pad)
    assert ours.item() == pytest.approx(float(theirs), rel=1e-5)


# ------------------------------------------------------------------------------------------------ padding
def test_end_index_left_right_and_opt_style_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    assert end_index(right).tolist() == [2, 4]
    assert end_index(left).tolist() == [4, 4]
    # OPT style: BOS id == pad id (2). The mask, not the ids, decides; DeepSpeed-Chat needed
    # --num_padding_at_beginning 1 to skip the leading "pad".
    ids = torch.tensor([[2, 10, 11, 12, 3, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    assert end_index(mask).tolist() == [4]
    assert (ids[0] == 2).nonzero()[0].item() == 0  # the first "pad" is the BOS, not the end
    values = torch.arange(7.0).unsqueeze(0)
    assert end_scores(values, mask).tolist() == [4.0]


def test_end_scores_match_hf_pooling_on_right_padded_batch(reward_model, tokenizer):
    texts = ["Human: Name some fruits. Assistant: apple, pear.", "Human: Hi. Assistant: I do not know.",
             "Human: What are some colors? Assistant: red."]
    seqs = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    ids = pad_sequences(seqs, tokenizer.pad_token_id)
    mask = pad_sequences([[1] * len(s) for s in seqs], 0)
    with torch.no_grad():
        ours = end_scores(token_values(reward_model, ids, mask), mask)
        hf = reward_model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        single = torch.stack([reward_model(input_ids=torch.tensor([s])).logits[0, 0] for s in seqs])
    torch.testing.assert_close(ours, hf)
    torch.testing.assert_close(ours, single, atol=1e-4, rtol=1e-4)
    # left padding gives the same end scores (RoPE is relative; padded keys are masked)
    left_ids = pad_sequences(seqs, tokenizer.pad_token_id, left=True)
    left_mask = pad_sequences([[1] * len(s) for s in seqs], 0, left=True)
    with torch.no_grad():
        left = end_scores(token_values(reward_model, left_ids, left_mask), left_mask)
    torch.testing.assert_close(left, single, atol=1e-4, rtol=1e-4)


def test_opt_reward_model_with_bos_equal_to_pad():
    from transformers import OPTConfig, OPTForSequenceClassification

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       max_position_embeddings=32, word_embed_proj_dim=16, pad_token_id=2, bos_token_id=2,
                       eos_token_id=3, num_labels=1)
    model = OPTForSequenceClassification(config).eval()
    assert head_name(model) == "score"
    seqs = [[2, 10, 11, 12, 3], [2, 20, 3]]  # each starts with BOS == pad id
    with torch.no_grad():
        single = torch.stack([model(input_ids=torch.tensor([s])).logits[0, 0] for s in seqs])
        for left in (False, True):
            ids = pad_sequences(seqs, 2, left=left)
            mask = pad_sequences([[1] * len(s) for s in seqs], 0, left=left)
            ours = end_scores(token_values(model, ids, mask), mask)
            torch.testing.assert_close(ours, single, atol=1e-5, rtol=1e-5)
            if not left:  # HF pools at the rightmost non-pad id: the same token here
                torch.testing.assert_close(ours, model(input_ids=ids, attention_mask=mask).logits.squeeze(-1))


# ------------------------------------------------------------------------------------------- checkpoints
def test_reward_model_has_one_label_and_pad_id(reward_model, tokenizer):
    assert reward_model.config.num_labels == 1
    assert reward_model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert head_name(reward_model) == "score"


@pytest.mark.parametrize("lora", [False, True])
def test_save_load_round_trip_with_plain_transformers(tmp_path, tokenizer, lora):
    from transformers import AutoModelForSequenceClassification

    from dschat.models.export import save_hf_model
    from dschat.models.lora import apply_lora

    torch.manual_seed(1)
    model = create_reward_model(BUILTIN_MODEL_DIR, tokenizer, {}, torch.float32)
    if lora:
        model = apply_lora(model, 4, "layers.", only_optimize_lora=True, keep_trainable=(head_name(model),))
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any("score" in n for n in trainable) and all("lora_" in n or "score" in n for n in trainable)
        with torch.no_grad():  # make the LoRA update and the head copy matter
            for name, param in model.named_parameters():
                if "lora_B" in name or "modules_to_save" in name:
                    param.normal_(0, 0.1)
    model.eval()
    seqs = [tokenizer("Human: Name some birds. Assistant: owl, crow.")["input_ids"] + [tokenizer.eos_token_id],
            tokenizer("Human: Hi. Assistant: no.")["input_ids"] + [tokenizer.eos_token_id]]
    ids = pad_sequences(seqs, tokenizer.pad_token_id)
    mask = pad_sequences([[1] * len(s) for s in seqs], 0)
    with torch.no_grad():
        ours = end_scores(token_values(model, ids, mask), mask)
    save_hf_model(model, tokenizer, str(tmp_path / "rm"))
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert loaded.config.num_labels == 1
    with torch.no_grad():
        theirs = loaded(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- runs
def test_one_rank_run_on_builtin_data_raises_accuracy(tmp_path, data_dir):
    out = tmp_path / "rm"
    result = run_step2(["--output_dir", str(out), "--data_output_path", data_dir, "--data_split", "2,1,7",
                        "--max_seq_len", "64", "--per_device_train_batch_size", "16", "--num_train_epochs", "2",
                        "--eval_iters", "8"])
    metrics = json.loads((out / "dschat_metrics.json").read_text())
    first, last = metrics["evals"][0], metrics["evals"][-1]
    assert last["accuracy"] >= first["accuracy"] + 0.1, metrics["evals"]
    assert last["chosen_mean"] > last["rejected_mean"]
    assert last["judge_spearman"] is not None and last["judge_spearman"] > 0.3
    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["std"] > 0 and math.isfinite(stats["mean"])
    assert "pairwise accuracy" in result.stdout and "Spearman" in result.stdout
    # rw_eval loads the saved head and scores the builtin examples; chosen beats rejected on most
    rw = subprocess.run([sys.executable, str(STEP2 / "rw_eval.py"), "--model_name_or_path", str(out),
                         "--num_examples", "2"], cwd=REPO, env=env(), capture_output=True, text=True,
                        timeout=120)
    assert rw.returncode == 0, rw.stderr
    assert rw.stdout.count("good_ans score") == 2 and rw.stdout.count("bad_ans score") == 2
    # The longer-answer baseline is a property of the eval pairs, so it is the same at every evaluation.
    assert len({e["longer_answer_accuracy"] for e in metrics["evals"]}) == 1
    assert 0.0 <= last["longer_answer_accuracy"] <= 1.0 and "the longer answer wins" in result.stdout
    # rw_eval --data_path: accuracy on a data set's held-out split, beside the same baselines step 2 reports
    # (the trained head beats the untrained one on the same 40 pairs).
    accuracies = []
    for extra in (["--model_name_or_path", str(out)], ["--model_name_or_path", BUILTIN_MODEL_DIR, "--untrained_head"]):
        rw = subprocess.run([sys.executable, str(STEP2 / "rw_eval.py"), *extra, "--data_path", "dschat/builtin",
                             "--max_pairs", "40"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
        assert rw.returncode == 0, rw.stderr
        line = next(x for x in rw.stdout.splitlines() if "pairwise accuracy" in x)
        assert "on 40 pairs of dschat/builtin ('eval' split)" in line and "the longer answer wins" in line
        accuracies.append(float(line.split("pairwise accuracy ")[1].split()[0]))
    assert accuracies[0] > accuracies[1], accuracies


def test_longer_answer_baseline_on_a_hand_batch():
    from dschat.trainers.reward import longer_answer_wins

    # pairs: chosen longer (right), chosen shorter (wrong), a tie (half)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0],
                         [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    assert longer_answer_wins(mask).item() == 1.5


def test_rw_eval_refuses_a_causal_lm():
    rw = subprocess.run([sys.executable, str(STEP2 / "rw_eval.py"), "--model_name_or_path", BUILTIN_MODEL_DIR],
                        cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert rw.returncode == 2 and rw.stderr.startswith("error:") and "no reward model" in rw.stderr


def test_two_rank_zero3_run_saves_a_plain_hf_reward_model(tmp_path, data_dir):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm_z3"
    run_step2(["--zero_stage", "3", "--output_dir", str(out), "--data_output_path", data_dir,
               "--data_split", "2,0.5,7.5", "--max_seq_len", "64", "--per_device_train_batch_size", "8",
               "--num_train_epochs", "1", "--eval_iters", "2"],
              launcher=[DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port())], timeout=400)
    last = json.loads((out / "dschat_metrics.json").read_text())["evals"][-1]
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = load_tokenizer(str(out))
    assert model.config.num_labels == 1 and head_name(model) == "score"
    # The saved model, loaded by transformers alone, reproduces the engine's final evaluation.
    rows = phase_rows(["dschat/builtin"], "2,0.5,7.5", 2, 1234)["eval"]
    assert last["eval_pairs"] == len(rows) > 0
    with torch.no_grad():
        scores = [[model(input_ids=torch.tensor([enc[key]])).logits[0, 0].item() for key in ("chosen_ids", "rejected_ids")]
                  for enc in (tokenize_row(r, PromptFormat(tokenizer), 2, 64, 256, False) for r in rows)]
    chosen, rejected = torch.tensor(scores).T
    assert pairwise_accuracy(chosen, rejected).item() == pytest.approx(last["accuracy"])
    assert chosen.mean().item() == pytest.approx(last["chosen_mean"], abs=1e-4)
    assert rejected.mean().item() == pytest.approx(last["rejected_mean"], abs=1e-4)


def test_run_on_anthropic_hh_data(tmp_path, data_dir):
    if not HH_DATA.exists():
        pytest.skip(f"HH data not present at {HH_DATA}")
    out = tmp_path / "rm_hh"
    result = run_step2(["--data_path", "../shared/data/hh-rlhf-harmless-test.jsonl.gz", "--data_split", "6,2,2",
                        "--max_seq_len", "128", "--output_dir", str(out), "--data_output_path", data_dir,
                        "--num_train_epochs", "1", "--eval_iters", "4"])
    metrics = json.loads((out / "dschat_metrics.json").read_text())
    last = metrics["evals"][-1]
    assert 0.0 <= last["accuracy"] <= 1.0 and last["eval_pairs"] > 0
    assert "judge_spearman" not in last  # no ground-truth judge for real data
    assert "acc (higher is better)" in result.stdout


def test_rw_eval_scores_every_pair_of_a_conversational_file_with_split_all(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Name {i} fruits."}],
                                     "chosen": [{"role": "assistant", "content": "apple, pear."}],
                                     "rejected": [{"role": "assistant", "content": "dog."}]}) + "\n"
                         for i in range(23)))
    counts = {}
    for split in ("all", "eval"):
        rw = subprocess.run([sys.executable, str(STEP2 / "rw_eval.py"), "--model_name_or_path", BUILTIN_MODEL_DIR,
                             "--untrained_head", "--data_path", str(f), "--split", split], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=120)
        assert rw.returncode == 0, rw.stderr
        line = next(x for x in rw.stdout.splitlines() if "pairwise accuracy" in x)
        counts[split] = int(line.split(" pairs of ")[0].rsplit(" ", 1)[1])
        assert f"('{split}' split)" in line
    assert counts == {"all": 23, "eval": 2}
