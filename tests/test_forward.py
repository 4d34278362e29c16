"""Forwards that project onto the vocabulary only at the tokens a loss reads equal the full forward's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dschat.algos.losses import logprobs_from_logits, row_sums, sequence_logprobs
from dschat.models import forward
from dschat.models.builtin import BUILTIN_MODEL_DIR


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(BUILTIN_MODEL_DIR).eval()


def batch() -> dict[str, torch.Tensor]:
    """Right-padded rows with -100 labels on prompts of different lengths and on padding."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100
    labels[1, :2] = -100
    labels[2, :3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("mode", ["mask", "index", "none"])
def test_label_logits_equal_the_full_forward(model, monkeypatch, mode):
    b = batch()
    with torch.no_grad():
        full = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        if mode == "mask":
            assert forward.keep_mode(model) == "mask"  # the Llama class of this transformers release
        monkeypatch.setattr(forward, "keep_mode", lambda m: mode)
        logits, targets, rows = forward.label_logits(model, b)
    labels = b["labels"][:, 1:]
    n = int((labels != -100).sum())
    assert logits.shape == (n, full.shape[-1]) and targets.shape == rows.shape == (n,)
    assert torch.equal(targets, labels[labels != -100])
    assert rows.tolist() == [0] * 5 + [1] * 5 + [2] * 2
    torch.testing.assert_close(logits, full[:, :-1][labels != -100], rtol=1e-5, atol=1e-5)
    # SFT's loss and DPO's summed log-probs are what the full logits give
    ce_full = torch.nn.functional.cross_entropy(full[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(torch.nn.functional.cross_entropy(logits, targets), ce_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(row_sums(logprobs_from_logits(logits, targets), rows, 3),
                               sequence_logprobs(full, b["labels"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["mask", "index", "none"])
def test_answer_logits_equal_the_full_forward_slice(model, monkeypatch, mode):
    seq = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(seq)
    mask[0, :2] = 0  # left padding of the prompt
    monkeypatch.setattr(forward, "keep_mode", lambda m: mode)
    with torch.no_grad():
        full = model(input_ids=seq, attention_mask=mask).logits[:, 5:-1]
        out = forward.answer_logits(model, seq, mask, prompt_len=6)
    assert out.shape == (2, 4, full.shape[-1])
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_the_kept_logits(model):
    m = AutoModelForCausalLM.from_pretrained(BUILTIN_MODEL_DIR)
    logits, targets, _ = forward.label_logits(m, batch())
    torch.nn.functional.cross_entropy(logits, targets).backward()
    assert m.lm_head.weight.grad is not None and m.lm_head.weight.grad.abs().sum() > 0


def test_a_model_without_logits_to_keep_gets_full_logits():
    class Plain(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, use_cache=None):
            raise AssertionError

    assert forward.keep_mode(Plain()) == "none"
    engine = type("Engine", (), {"module": Plain()})()
    assert forward.keep_mode(engine) == "none"


def test_sampling_logprobs_equal_a_forward_over_the_rollout(model):
    """--logprobs_from_generation: the sampling pass's log-probs (logits / T) are the experience forward's."""
    from dschat.algos.losses import logprobs_from_logits
    from dschat.data.prompts import PromptFormat
    from dschat.models.loading import load_tokenizer
    from dschat.trainers.rollout import encode_prompts, generate_rollout

    fmt = PromptFormat(load_tokenizer("builtin", padding_side="left"))
    prompt, mask = encode_prompts(fmt, ["Name some fruits.", "Which tools are there? Name three."],
                                  torch.device("cpu"))
    torch.manual_seed(3)
    r = generate_rollout(model, fmt, prompt, mask, with_logprobs=True, do_sample=True, top_k=0,
                         temperature=0.7, max_new_tokens=12)
    torch.manual_seed(3)
    plain = generate_rollout(model, fmt, prompt, mask, do_sample=True, top_k=0, temperature=0.7, max_new_tokens=12)
    assert torch.equal(r.seq, plain.seq) and plain.logprobs is None  # keeping logits does not change sampling
    with torch.no_grad():
        ref = logprobs_from_logits(forward.answer_logits(model, r.seq, r.attention_mask, r.prompt_len) / 0.7,
                                   r.seq[:, r.prompt_len:])
    m = r.action_mask.bool()
    assert m.sum() > 4
    torch.testing.assert_close(r.logprobs[m], ref[m], rtol=1e-4, atol=1e-4)  # at the sampling temperature
