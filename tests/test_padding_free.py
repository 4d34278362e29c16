"""Padding-free forwards (--padding_free): a batch's rows packed end to end give the padded forward's logits and
gradients up to float rounding, on the model families we ship (Llama-style and GPT-2-style)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from dschat.data.packing import pack_rows, unpack_rows
from dschat.models import forward, heads
from dschat.models.builtin import BUILTIN_MODEL_DIR


def test_pack_rows_lays_rows_end_to_end_first_fit_decreasing():
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 8, 9, 1], [2, 3, 0, 0, 0], [4, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    packed = pack_rows(ids, mask, pad_token_id=0)
    # widths 3, 3, 2, 1 into rows of width 3: [row0], [row1], [row2, row3]
    assert packed.input_ids.tolist() == [[5, 6, 7], [8, 9, 1], [2, 3, 4]]
    assert packed.position_ids.tolist() == [[0, 1, 2], [0, 1, 2], [0, 1, 0]]
    assert packed.index.tolist() == list(range(9))
    back = unpack_rows(packed.input_ids[..., None], packed, fill=-1)[..., 0]
    assert back.tolist() == ids.masked_fill(mask == 0, -1).tolist()


def test_pack_rows_numbers_padding_tails_from_zero_and_skips_empty_rows():
    ids = torch.tensor([[1, 2, 3, 4], [5, 0, 0, 0], [0, 0, 0, 0], [6, 7, 0, 0], [8, 0, 0, 0]])
    mask = (ids != 0).long()
    packed = pack_rows(ids, mask, pad_token_id=9)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4], [6, 7, 5, 8]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    mask2 = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])  # narrower rows; a padding tail is a sequence from 0
    tail = pack_rows(torch.tensor([[1, 2, 3, 0], [4, 0, 0, 0]]), mask2, pad_token_id=9)
    assert tail.input_ids.tolist() == [[1, 2, 3], [4, 9, 9]] and tail.position_ids.tolist() == [[0, 1, 2], [0, 0, 1]]


def test_pack_rows_returns_none_when_nothing_is_saved():
    ids = torch.arange(1, 9).view(2, 4)
    assert pack_rows(ids, torch.ones_like(ids)) is None
    assert pack_rows(ids, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])) is None  # 3 + 4 > 4: still two rows


def _models() -> list[tuple[str, torch.nn.Module]]:
    torch.manual_seed(0)
    llama = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    gpt2 = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    out = [("builtin", AutoModelForCausalLM.from_pretrained(BUILTIN_MODEL_DIR))]
    for attn in ("sdpa", "eager"):
        out.append((f"llama-{attn}", AutoModelForCausalLM.from_config(llama, attn_implementation=attn)))
        out.append((f"gpt2-{attn}", AutoModelForCausalLM.from_config(gpt2, attn_implementation=attn)))
    return [(name, m.eval().float()) for name, m in out]


MODELS = _models()


def _right_padded(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    lengths = [11, 4, 7, 3, 9, 2]
    ids = torch.randint(1, vocab, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a two-token prompt
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}


def _vocab(model: torch.nn.Module) -> int:
    return min(model.config.vocab_size, 200)


@pytest.mark.parametrize("name,model", MODELS, ids=[n for n, _ in MODELS])
def test_label_logits_and_grads_equal_the_padded_forward(name, model):
    assert forward.packable(model)
    b = _right_padded(_vocab(model))
    assert pack_rows(b["input_ids"], b["attention_mask"]) is not None  # the batch does pack (fewer positions)
    results = []
    for padding_free in (False, True):
        model.zero_grad()
        logits, targets, rows = forward.label_logits(model, b, padding_free)
        torch.nn.functional.cross_entropy(logits.float(), targets).backward()
        results.append((logits.detach(), targets, rows, [p.grad.clone() for p in model.parameters()]))
    (a, ta, ra, ga), (p, tp, rp, gp) = results
    assert torch.equal(ta, tp) and torch.equal(ra, rp)
    torch.testing.assert_close(p, a, atol=1e-5, rtol=1e-4)
    for x, y in zip(ga, gp):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,model", MODELS, ids=[n for n, _ in MODELS])
def test_answer_logits_of_left_padded_rollouts_equal_the_padded_forward(name, model):
    g = torch.Generator().manual_seed(4)
    prompt_len, answer = 6, 5
    seq = torch.randint(1, _vocab(model), (5, prompt_len + answer), generator=g)
    mask = torch.ones_like(seq)
    for i, (left, right) in enumerate([(0, 0), (3, 2), (4, 4), (5, 1), (2, 3)]):  # prompt padding, answer padding
        mask[i, :left] = 0
        mask[i, prompt_len + answer - right:] = 0
    assert pack_rows(seq, mask) is not None
    padded = forward.answer_logits(model, seq, mask, prompt_len)
    packed = forward.answer_logits(model, seq, mask, prompt_len, padding_free=True)
    predicts = mask[:, prompt_len - 1: -1].bool()  # positions whose next token is real
    torch.testing.assert_close(packed[predicts], padded[predicts], atol=1e-5, rtol=1e-4)
    assert torch.count_nonzero(packed[~predicts]) == 0


def test_packed_rows_do_not_attend_across_rows():
    """The control: the same packed ids run as one long sequence (positions not restarting) give other logits,
    so the equality above comes from the model keeping each packed row's attention to itself."""
    _, model = MODELS[1]
    b = _right_padded(_vocab(model))
    packed = pack_rows(b["input_ids"], b["attention_mask"])
    keep = torch.ones_like(packed.input_ids, dtype=torch.bool)
    with torch.no_grad():
        separate = model(input_ids=packed.input_ids, position_ids=packed.position_ids).logits[keep]
        joined = model(input_ids=packed.input_ids).logits[keep]
    assert (separate - joined).abs().max() > 1e-3


def test_padding_free_is_skipped_for_a_model_that_cannot_take_it(monkeypatch):
    _, model = MODELS[1]
    b = _right_padded(_vocab(model))
    monkeypatch.setattr(forward, "packable", lambda m: False)
    monkeypatch.setattr(forward, "packed_logits", lambda *a: pytest.fail("packed although not packable"))
    forward.label_logits(model, b, padding_free=True)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_token_values_of_a_sequence_classifier_equal_the_padded_forward(family):
    from transformers import AutoModelForSequenceClassification

    from dschat.models.heads import token_values

    torch.manual_seed(0)
    cfg = (LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, num_labels=1, pad_token_id=0) if family == "llama" else
           GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, num_labels=1, pad_token_id=0))
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    seq = torch.randint(1, 64, (4, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(seq)
    for i, (left, right) in enumerate([(0, 1), (4, 3), (2, 5), (5, 2)]):
        mask[i, :left] = 0
        mask[i, 10 - right:] = 0
    with torch.no_grad():
        padded = token_values(model, seq, mask)
        packed = token_values(model, seq, mask, padding_free=True)
    assert pack_rows(seq, mask) is not None
    torch.testing.assert_close(packed[mask.bool()], padded[mask.bool()], atol=1e-5, rtol=1e-4)
    assert torch.count_nonzero(packed[~mask.bool()]) == 0



def test_models_whose_mask_ignores_position_ids_are_not_packed():
    """OPT's causal-mask call gets no position ids, so transformers cannot find packed rows: such a model must run
    padded (packed, its rows would attend across each other)."""
    from transformers import OPTConfig

    assert not heads.passes_position_ids("m = create_causal_mask(config=c, inputs_embeds=e, attention_mask=a)")
    assert heads.passes_position_ids("m = create_causal_mask(config=c, attention_mask=f(a), position_ids=p)")
    assert heads.passes_position_ids('k = {"position_ids": position_ids}\nm = create_causal_mask(**mask_kwargs)')
    assert not heads.passes_position_ids("no mask call here")
    torch.manual_seed(0)
    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                     num_attention_heads=4, max_position_embeddings=64,
                                                     word_embed_proj_dim=32)).eval()
    assert not forward.packable(opt)
    b = _right_padded(64)
    with torch.no_grad():
        a, _, _ = forward.label_logits(opt, b)
        p, _, _ = forward.label_logits(opt, b, padding_free=True)  # falls back to the padded forward
    torch.testing.assert_close(p, a)


def test_flash_attention_models_run_padded():
    """Flash-attention kernels keep packed rows apart only for a single row; dschat packs for sdpa and eager only."""
    _, model = MODELS[1]
    assert forward.packable(model)
    attention = model.config._attn_implementation
    try:
        model.config._attn_implementation = "flash_attention_2"
        assert not forward.packable(model)
    finally:
        model.config._attn_implementation = attention
