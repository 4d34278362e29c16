"""Shared-prompt packing of reward pairs: hand-checked layout, and the same values as separate forwards."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from dschat.data.collators import RewardCollator
from dschat.data.packing import pack_pairs, shared_prefix_len, unpack_pairs
from dschat.models import heads
from dschat.models.builtin import BUILTIN_MODEL_DIR
from dschat.runtime.errors import FlagError

PAD = 0


def test_shared_prefix_leaves_each_side_a_token():
    t = torch.tensor
    assert shared_prefix_len(t([5, 6, 7, 8]), t([5, 6, 9])) == 2
    assert shared_prefix_len(t([5, 6]), t([5, 6, 7])) == 1  # chosen is a prefix of rejected: keep its last token
    assert shared_prefix_len(t([5, 6, 7]), t([5, 6, 7])) == 2  # identical
    assert shared_prefix_len(t([4, 6]), t([5, 6])) == 0


def test_pack_layout_by_hand():
    batch = RewardCollator(PAD)([{"chosen_ids": [1, 2, 3, 4], "rejected_ids": [1, 2, 5], "prompt_len": 2}])
    p = pack_pairs(batch["input_ids"], batch["attention_mask"], PAD, torch.float32)
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    allowed = (p.attention_mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 0],
                       [1, 1, 0, 0, 1]]  # the rejected tail sees the prompt and itself, not the chosen tail
    assert p.index.tolist() == [[0, 1, 2, 3], [0, 1, 4, 0]]
    out = unpack_pairs(torch.tensor([[10.0, 11, 12, 13, 14]]), p)
    assert out.tolist() == [[10, 11, 12, 13], [10, 11, 14, 0]]


def test_padding_free_pairs_share_a_row_by_hand():
    rows = [{"chosen_ids": [1, 2, 3, 4], "rejected_ids": [1, 2, 5], "prompt_len": 2},
            {"chosen_ids": [6, 7], "rejected_ids": [6, 8], "prompt_len": 1}]
    batch = RewardCollator(PAD)(rows)
    p = pack_pairs(batch["input_ids"], batch["attention_mask"], PAD, torch.float32, padding_free=True)
    # pair rows of 5 and 3 tokens: the second fits no row of width 5 beside the first, so two rows; add a third
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]]
    rows.append({"chosen_ids": [9], "rejected_ids": [10], "prompt_len": 0})
    batch = RewardCollator(PAD)(rows)
    p = pack_pairs(batch["input_ids"], batch["attention_mask"], PAD, torch.float32, padding_free=True)
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 0, 0]]
    allowed = (p.attention_mask[1, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [1, 0, 1, 0, 0],
                       [0, 0, 0, 1, 0],
                       [0, 0, 0, 0, 1]]  # pairs never see each other; each tail sees its prefix and itself
    out = unpack_pairs(torch.arange(10.0).view(2, 5), p)
    assert out.tolist() == [[0, 1, 2, 3], [5, 6, 0, 0], [8, 0, 0, 0], [0, 1, 4, 0], [5, 7, 0, 0], [9, 0, 0, 0]]


def pairs() -> dict[str, torch.Tensor]:
    """Pairs with different prompt lengths, a truncated pair, a prefix pair and an identical pair."""
    g = torch.Generator().manual_seed(0)

    def toks(n: int) -> list[int]:
        return torch.randint(3, 200, (n,), generator=g).tolist()

    rows = []
    for prompt_len, c_len, r_len in [(5, 3, 6), (9, 1, 2), (2, 7, 4)]:
        prompt = toks(prompt_len)
        rows.append({"chosen_ids": prompt + toks(c_len), "rejected_ids": prompt + toks(r_len), "prompt_len": prompt_len})
    same = toks(6)
    rows.append({"chosen_ids": same[:4], "rejected_ids": same, "prompt_len": 3})
    rows.append({"chosen_ids": same, "rejected_ids": list(same), "prompt_len": 3})
    return RewardCollator(PAD)(rows)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_values_equal_separate_forwards(attn):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(BUILTIN_MODEL_DIR, num_labels=1,
                                                               attn_implementation=attn).eval()
    b = pairs()
    with torch.no_grad():
        separate = heads.token_values(model, b["input_ids"], b["attention_mask"])
        shared = heads.pair_token_values(model, b["input_ids"], b["attention_mask"], PAD)
    valid = b["attention_mask"].bool()
    torch.testing.assert_close(shared[valid], separate[valid], rtol=1e-4, atol=1e-4)
    packed = pack_pairs(b["input_ids"], b["attention_mask"], PAD, torch.float32)
    assert packed.input_ids.numel() < b["input_ids"].numel()  # fewer tokens through the model
    with torch.no_grad():
        padding_free = heads.pair_token_values(model, b["input_ids"], b["attention_mask"], PAD, padding_free=True)
        rows_packed = heads.token_values(model, b["input_ids"], b["attention_mask"], padding_free=True)
    torch.testing.assert_close(padding_free[valid], separate[valid], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rows_packed[valid], separate[valid], rtol=1e-4, atol=1e-4)
    fewer = pack_pairs(b["input_ids"], b["attention_mask"], PAD, torch.float32, padding_free=True)
    assert fewer.input_ids.shape[0] < packed.input_ids.shape[0]  # pairs share rows: fewer positions again


def test_pair_values_check_falls_back_or_refuses(monkeypatch, capsys):
    model = AutoModelForSequenceClassification.from_pretrained(BUILTIN_MODEL_DIR, num_labels=1).train()
    b = pairs()
    auto = heads.PairValues("auto", PAD)
    auto(model, b["input_ids"], b["attention_mask"])
    assert auto.mode == "checked"  # agreed: shared from now on
    real = heads.pair_token_values
    monkeypatch.setattr(heads, "pair_token_values", lambda *a: real(*a) + 1.0)  # attention that ignores the mask
    broken = heads.PairValues("auto", PAD)
    out = broken(model, b["input_ids"], b["attention_mask"])
    assert broken.mode == "separate" and "using separate forwards" in capsys.readouterr().out
    torch.testing.assert_close(out, heads.token_values(model, b["input_ids"], b["attention_mask"]))
    with pytest.raises(FlagError, match="--pair_forward separate"):
        heads.PairValues("shared", PAD)(model, b["input_ids"], b["attention_mask"])
    assert model.training  # the check left the model as it found it
