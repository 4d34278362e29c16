"""Advantage estimators by hand values: GAE's registration, GRPO, RLOO, REINFORCE++ (with baseline)."""

from __future__ import annotations

import pytest
import torch

from dschat.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    discounted_returns,
    gae_advantages,
    get_estimator,
    group_stats,
    grpo_advantages,
    rloo_advantages,
    subtract_group_baseline,
)


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual.float(), torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


REWARDS = torch.tensor([[0.0, 1.0], [0.0, 3.0], [0.0, 2.0], [0.0, 2.0]])
MASK = torch.ones(4, 2)
GROUP = torch.tensor([0, 0, 1, 1])


def test_registry_says_which_estimators_need_a_critic():
    assert get_estimator("gae").needs_critic and get_estimator("gae").whiten
    for name in ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"):
        assert not get_estimator(name).needs_critic, name
    assert {n for n, e in ADVANTAGE_ESTIMATORS.items() if e.needs_group} == {"grpo", "dr_grpo", "rloo",
                                                                             "reinforce_pp_baseline"}
    with pytest.raises(ValueError, match="valid choices"):
        get_estimator("ppo2")


def test_registered_gae_is_the_gae_function():
    values = torch.tensor([[0.5, 0.2], [0.1, 0.0], [0.0, 0.0], [0.3, 0.3]])
    inp = AdvantageInputs(REWARDS, MASK, REWARDS[:, 1], GROUP, values, gamma=0.9, lam=0.8)
    adv, ret = get_estimator("gae").fn(inp)
    ref_adv, ref_ret = gae_advantages(REWARDS, values, MASK, 0.9, 0.8)
    assert torch.equal(adv, ref_adv) and torch.equal(ret, ref_ret)


def test_group_stats_never_mix_groups():
    mean, std, size = group_stats(torch.tensor([1.0, 3.0, 2.0, 2.0, 10.0]), torch.tensor([7, 7, 2, 2, 5]))
    close(mean, [2.0, 2.0, 2.0, 2.0, 10.0])
    close(std, [2 ** 0.5, 2 ** 0.5, 0.0, 0.0, 0.0])
    close(size, [2, 2, 2, 2, 1])


def test_grpo_by_hand():
    adv = grpo_advantages(REWARDS, MASK, REWARDS[:, 1], GROUP)
    s = 2 ** -0.5  # (1 - 2) / sqrt(2) and (3 - 2) / sqrt(2); the second group's answers score alike -> 0
    close(adv, [[-s, -s], [s, s], [0, 0], [0, 0]], atol=1e-4)


def test_grpo_normalises_the_scores_only_and_adds_the_kl_penalty_to_come():
    """Issue 27 (12): the KL penalty in the token rewards is not divided by the group's std."""
    rewards = torch.tensor([[-0.1, -0.2 + 1.0], [-0.3, 3.0], [-0.4, 2.0], [-0.0, 2.0]])  # KL penalty + end score
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0])
    s = 2 ** -0.5  # (1 - 2) / sqrt(2), (3 - 2) / sqrt(2); the second group's scores are alike -> 0
    adv = grpo_advantages(rewards, MASK, scores, GROUP)
    close(adv, [[-s - 0.3, -s - 0.2], [s - 0.3, s], [-0.4, 0.0], [0.0, 0.0]], atol=1e-4)
    adv, ret = get_estimator("grpo").fn(AdvantageInputs(rewards, MASK, scores, GROUP))
    close(adv, [[-s - 0.3, -s - 0.2], [s - 0.3, s], [-0.4, 0.0], [0.0, 0.0]], atol=1e-4)
    assert ret is None


def test_grpo_and_rloo_are_zero_on_masked_tokens():
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    rewards = torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.0, 2.0], [0.0, 2.0]])
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0])
    for adv in (grpo_advantages(rewards, mask, scores, GROUP), rloo_advantages(rewards, mask, GROUP)):
        assert adv[0, 1] == 0 and adv[0, 0] != 0


def test_rloo_by_hand():
    close(rloo_advantages(REWARDS, MASK, GROUP), [[-2, -2], [2, 2], [0, 0], [0, 0]])
    three = torch.tensor([[1.0], [2.0], [6.0]])
    close(rloo_advantages(three, torch.ones(3, 1), torch.zeros(3)), [[1 - 4.0], [2 - 3.5], [6 - 1.5]])


def test_reinforce_pp_discounted_returns_by_hand():
    rewards = torch.tensor([[0.1, 1.0], [0.5, 7.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    close(discounted_returns(rewards, mask, 0.5), [[0.1 + 0.5 * 1.0, 1.0], [0.5, 0.0]])


def test_reinforce_pp_baseline_subtracts_the_group_mean_score_at_the_end():
    rewards = torch.tensor([[-0.1, 1.0], [-0.2, 3.0], [0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    scores = torch.tensor([1.0, 3.0, 0.5])
    out = subtract_group_baseline(rewards, mask, scores, torch.tensor([0, 0, 1]))
    close(out, [[-0.1, -1.0], [-0.2, 1.0], [0.0, 0.0]])
    adv, ret = get_estimator("reinforce_pp_baseline").fn(AdvantageInputs(rewards, mask, scores, torch.tensor([0, 0, 1]),
                                                                          gamma=1.0))
    close(adv, [[-1.1, -1.0], [0.8, 1.0], [0.0, 0.0]])
    assert ret is None
