import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dschat.algos.advantages import compute_rewards, gae_advantages
from dschat.algos.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_penalty,
    make_kl_controller,
)
from dschat.algos.losses import entropy_from_logits, logprobs_from_logits, policy_loss, value_loss
from dschat.algos.masked import action_mask_from_tokens, masked_mean, masked_sum, masked_whiten


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        actual.float(), torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=0
    )


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize(
    "ids, expected",
    [
        ([5, 6, 2, 0, 0], [1, 1, 1, 0, 0]),  # EOS in the middle, then padding
        ([2, 7, 8], [1, 0, 0]),  # EOS at position 0: only the EOS action counts
        ([5, 6, 7], [1, 1, 1]),  # no EOS: every position
        ([5, 6, 0, 0], [1, 1, 0, 0]),  # no EOS but right-padded (pad != eos)
        ([5, 2, 6, 2], [1, 1, 0, 0]),  # only the first EOS terminates
    ],
)
def test_action_mask_from_tokens(ids, expected):
    mask = action_mask_from_tokens(torch.tensor([ids]), eos_token_id=2, pad_token_id=0)
    assert mask.dtype == torch.float32
    close(mask, [expected])


def test_action_mask_pad_equals_eos_batched():
    ids = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    mask = action_mask_from_tokens(ids, eos_token_id=2, pad_token_id=2)
    close(mask, [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])


def test_masked_sum_and_mean_accept_bool_masks():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    close(masked_sum(x, mask), 6.0)
    close(masked_mean(x, mask), 2.0)
    close(masked_mean(x, mask, dim=1), [1.5, 3.0])
    close(masked_mean(x, torch.zeros_like(x), dim=1), [0.0, 0.0])  # empty rows: 0, not NaN


# ---------------------------------------------------------------- KL and rewards


def test_kl_estimators_hand_values():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])  # log r = [0.5, -1.0]
    close(kl_penalty(logp, ref, "k1"), [[0.5, -1.0]])
    close(kl_penalty(logp, ref, "k2"), [[0.125, 0.5]])
    # k3 = exp(-log r) - 1 + log r
    close(kl_penalty(logp, ref, "k3"), [[math.exp(-0.5) - 0.5, math.e - 2.0]])
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_unknown_kl_estimator_raises():
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_compute_rewards_places_clipped_score_at_last_valid_token():
    log_ratio = torch.tensor([[0.5, -1.0, 0.2, 0.3], [0.4, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    logp = torch.zeros(3, 4)
    ref = -log_ratio
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    scores = torch.tensor([10.0, -0.5, 3.0])
    rewards, kl = compute_rewards(logp, ref, mask, scores, kl_coef=0.1, clip_reward_value=5.0)
    close(kl, [[0.5, -1.0, 0.2, 0.0], [0.4, 0.0, 0.0, 0.0], [0.0] * 4])
    # row 0: -0.1*kl, score 10 clipped to 5 at t=2; row 1: -0.04 - 0.5 at t=0; row 2: empty -> nothing
    close(rewards, [[-0.05, 0.1, -0.02 + 5.0, 0.0], [-0.54, 0.0, 0.0, 0.0], [0.0] * 4])


# ---------------------------------------------------------------- GAE


def test_gae_hand_worked_and_early_end():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3]])
    # gamma=1, lam=0.95:
    # t=2: delta = 1 + 0 - 0.3 = 0.7                      A2 = 0.7
    # t=1: delta = 0 + 0.3 - 0.4 = -0.1  A1 = -0.1 + 0.95*0.7   = 0.565
    # t=0: delta = 0 + 0.4 - 0.5 = -0.1  A0 = -0.1 + 0.95*0.565 = 0.43675
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.95)
    close(adv, [[0.43675, 0.565, 0.7]])
    close(ret, [[0.93675, 0.965, 1.0]])


def test_gae_batched_rows_with_different_lengths():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [1.0, 0.5, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # row 1, gamma=0.9, lam=0.5, padding (r=99, V=7) must be ignored:
    # t=1: delta = 2 + 0.9*0 - 0.5 = 1.5                 A1 = 1.5
    # t=0: delta = 0 + 0.9*0.5 - 1 = -0.55  A0 = -0.55 + 0.45*1.5 = 0.125
    adv, ret = gae_advantages(rewards, values, mask.bool(), gamma=0.9, lam=0.5)
    close(adv[1], [0.125, 1.5, 0.0])
    close(ret[1], [1.125, 2.0, 0.0])
    # row 0 with gamma=0.9, lam=0.5: A2 = 0.7, A1 = 0.27 - 0.4 + 0.45*0.7 = 0.185,
    # A0 = 0.36 - 0.5 + 0.45*0.185 = -0.05675
    close(adv[0], [-0.05675, 0.185, 0.7])


# ---------------------------------------------------------------- whitening


def test_masked_whiten_single_process():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 6.0, -100.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    out = masked_whiten(x, mask)
    # valid entries 1..6: mean 3.5, unbiased var 17.5/5 = 3.5
    expected = (torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) - 3.5) / math.sqrt(3.5 + 1e-8)
    close(out[:, :3].reshape(-1), expected)
    close(out[:, 3], [0.0, 0.0])
    valid = out[mask.bool()]
    close(valid.mean(), 0.0)
    close(valid.std(), 1.0, atol=1e-5)
    unshifted = masked_whiten(x, mask, shift_mean=False)
    close(unshifted[mask.bool()].mean(), 3.5, atol=1e-5)
    close(unshifted[:, 3], [0.0, 0.0])


def _whiten_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        x, mask = _shards()[rank]
        from dschat.runtime.dist import all_reduce_sum

        torch.save(masked_whiten(x, mask, reduce_sum=all_reduce_sum), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _shards():
    x0 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, 50.0]])
    m0 = torch.tensor([[1, 1, 1], [1, 0, 0]])
    x1 = torch.tensor([[10.0, 20.0, -7.0]])
    m1 = torch.tensor([[1, 1, 0]])
    return [(x0, m0), (x1, m1)]


def test_masked_whiten_across_two_ranks(tmp_path):
    mp.spawn(_whiten_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    (x0, m0), (x1, m1) = _shards()
    # whitening the concatenated rollout (padded to a common width) on one process
    full_x = torch.cat([x0, x1])
    full_m = torch.cat([m0, m1])
    full = masked_whiten(full_x, full_m)
    close(outs[0], full[:2])
    close(outs[1], full[2:])
    # and it is not what each rank would get by whitening alone
    assert not torch.allclose(outs[0], masked_whiten(x0, m0), atol=1e-3)
    assert not torch.allclose(outs[1], masked_whiten(x1, m1), atol=1e-3)


# ---------------------------------------------------------------- losses


def test_policy_loss_clipping_cases():
    c = 0.2
    ratios = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1, 3.0])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0, 50.0])
    mask = torch.tensor([1, 1, 1, 1, 1, 0])
    old = torch.zeros(1, 6)
    logp = ratios.log().unsqueeze(0).requires_grad_(True)
    loss, stats = policy_loss(logp, old, adv.unsqueeze(0), mask.unsqueeze(0), cliprange=c)
    # per token max(-A*r, -A*clip(r)):
    #   A=+1,r=1.5 -> max(-1.5,-1.2) = -1.2 (clipped)    A=+1,r=0.5 -> max(-0.5,-0.8) = -0.5
    #   A=-1,r=1.5 -> max( 1.5, 1.2) =  1.5              A=-1,r=0.5 -> max( 0.5, 0.8) =  0.8 (clipped)
    #   A=+2,r=1.1 -> -2.2 (inside range)                masked token ignored
    # loss = (-1.2 - 0.5 + 1.5 + 0.8 - 2.2) / 5 = -0.32
    close(loss, -0.32)
    close(stats["clipfrac"], 0.4)
    r = ratios[:5]
    close(stats["approx_kl"], ((r - 1) - r.log()).mean())
    loss.backward()
    # d/dlogp of -A*r is -A*r/5 on unclipped tokens, 0 on clipped and masked ones
    close(logp.grad, [[0.0, -0.1, 0.3, 0.0, -0.44, 0.0]])
    global_loss, _ = policy_loss(logp.detach(), old, adv.unsqueeze(0), mask.unsqueeze(0), c, token_count=10.0)
    close(global_loss, -0.16)


def test_value_loss_clipping():
    values = torch.tensor([[1.5, 1.5, 1.1, 9.0]])
    old = torch.ones(1, 4)
    returns = torch.tensor([[2.0, 1.0, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=0.2)
    # v=1.5,R=2: max(0.25, (1.2-2)^2=0.64) = 0.64 (clipped); v=1.5,R=1: max(0.25, 0.04) = 0.25
    # v=1.1,R=3: within range -> 3.61;  loss = 0.5 * (0.64 + 0.25 + 3.61) / 3 = 0.75
    close(loss, 0.75)
    close(stats["vf_clipfrac"], 1.0 / 3.0)
    loss_global, _ = value_loss(values, old, returns, mask, 0.2, token_count=6.0)
    close(loss_global, 0.375)


# ---------------------------------------------------------------- logits helpers


def test_entropy_and_logprobs_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, float("-inf"), float("-inf"), float("-inf")]]])
    close(entropy_from_logits(logits), [[math.log(4.0), 0.0]])
    logits2 = torch.tensor([[[0.0, math.log(3.0)], [5.0, 5.0]]], dtype=torch.bfloat16)
    lp = logprobs_from_logits(logits2, torch.tensor([[1, 0]]))
    assert lp.dtype == torch.float32
    close(lp, [[math.log(0.75), math.log(0.5)]], atol=1e-2)
    x = torch.randn(2, 3, 7)
    labels = torch.randint(0, 7, (2, 3))
    ref = torch.log_softmax(x, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(logprobs_from_logits(x, labels), ref, atol=1e-5)


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_updates():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)  # error 0.5 clipped to 0.2: mult = 1 + 0.2*256/10000
    assert ctl.value == pytest.approx(0.1 * 1.00512)
    ctl.update(current_kl=5.4, n_steps=1000)  # error -0.1: mult = 1 - 0.1*0.1 = 0.99
    assert ctl.value == pytest.approx(0.1 * 1.00512 * 0.99)
    restored = AdaptiveKLController(1.0, 1.0, 1)
    restored.load_state_dict(ctl.state_dict())
    assert (restored.value, restored.target, restored.horizon) == (ctl.value, 6.0, 10000)


def test_fixed_kl_controller_and_factory():
    fixed = make_kl_controller(0.05, None, 10000)
    assert isinstance(fixed, FixedKLController)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05
    adaptive = make_kl_controller(0.05, 6.0, 10000)
    assert isinstance(adaptive, AdaptiveKLController) and adaptive.value == 0.05


def test_exact_kl_by_hand():
    from dschat.algos.kl import exact_kl

    p = torch.tensor([[[0.5, 0.5]]]).log()
    q = torch.tensor([[[0.25, 0.75]]]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert exact_kl(p, q).item() == pytest.approx(expected, abs=1e-6)
    assert exact_kl(p, p).item() == pytest.approx(0.0, abs=1e-7)
