"""Training engines: skipping DeepSpeed's one-rank gradient all-reduce changes nothing but the time."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from dschat.models.builtin import BUILTIN_MODEL_DIR
from dschat.runtime.ds_config import get_train_ds_config
from dschat.runtime.engine import build_engine


def train_three_steps(allreduce: bool | None) -> tuple[bool, dict[str, torch.Tensor]]:
    """(the engine's backward all-reduce setting, weights) after 3 AdamW steps on fixed random batches."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(BUILTIN_MODEL_DIR)
    cfg = get_train_ds_config(stage=0, dtype="fp32", micro_batch=2, world_size=1)
    engine = build_engine(model, cfg, 1e-3, 0.0, 1e-3, "constant", 0, 10)
    default = engine.enable_backward_allreduce
    if allreduce is not None:
        engine.enable_backward_allreduce = allreduce
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(3, 200, (2, 12), generator=g)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    return default, {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def test_one_rank_zero0_skips_the_identity_allreduce_with_equal_results(world_of_one):
    default, skipped = train_three_steps(None)
    assert default is False  # one rank, ZeRO 0: no all-reduce
    _, reduced = train_three_steps(True)
    assert all(torch.equal(skipped[k], reduced[k]) for k in skipped)
    assert not torch.equal(skipped["lm_head.weight"], AutoModelForCausalLM.from_pretrained(BUILTIN_MODEL_DIR)
                           .state_dict()["lm_head.weight"])  # it trained


def test_adamw_is_fused_on_cpu_and_steps_like_the_default():
    from dschat.runtime.engine import make_adamw

    torch.manual_seed(0)
    start = [torch.randn(7, 5), torch.randn(5)]
    grads = [torch.randn_like(t) for t in start]
    results = []
    for fused in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        groups = [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]
        opt = make_adamw(groups, 1e-2) if fused else torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95))
        assert bool(opt.defaults["fused"]) == fused
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        results.append(params)
    for a, b, s in zip(*results, start):
        assert not torch.equal(a, s)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
