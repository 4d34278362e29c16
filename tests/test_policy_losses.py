"""The policy-loss menu: hand values for ppo (clip-higher, dual-clip), gspo, cispo, the loss aggregations, dr_grpo,
dynamic sampling's group filter, truncated answers, DPO's loss registry, the adaptive entropy coefficient, the
default step reproducing today's loss and gradients bit for bit, flag checks, and step 3 on 1 and 2 ranks."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from dschat.algos.advantages import (
    AdvantageInputs,
    get_estimator,
    groups_with_variance,
)
from dschat.algos.losses import DPO_LOSS_KINDS, DPO_LOSSES, dpo_loss, policy_loss, register_dpo_loss
from dschat.algos.masked import agg_count, aggregate, truncated_rows
from dschat.algos.policy_losses import (
    POLICY_LOSSES,
    PolicyLossConfig,
    get_policy_loss,
    register_policy_loss,
)
from dschat.runtime.errors import FlagError
from dschat.trainers.loop import NanGuard
from dschat.trainers.ppo import PPOSettings, answer_logprobs, merge_experiences, select_rows
from tests.helpers import REPO, STEP3, metrics, run
from tests.test_ppo_trainer import experience, trainer


def close(actual, expected, atol=1e-6):
    assert torch.allclose(torch.as_tensor(actual, dtype=torch.float32),
                          torch.as_tensor(expected, dtype=torch.float32), atol=atol), (actual, expected)


def leaf(values):
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


# ---- the registry -------------------------------------------------------------------------------------------

def test_registry_names_and_errors():
    assert set(POLICY_LOSSES) >= {"ppo", "gspo", "cispo"}
    with pytest.raises(ValueError, match="unknown policy loss 'nope'"):
        get_policy_loss("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_policy_loss("ppo")(lambda *a: None)
    assert PolicyLossConfig(0.2).high == 0.2 and PolicyLossConfig(0.2, 0.28).high == 0.28


# ---- ppo ----------------------------------------------------------------------------------------------------

def test_ppo_default_is_todays_policy_loss_bit_for_bit():
    torch.manual_seed(0)
    lp0 = torch.randn(3, 5)
    old, adv = lp0 + 0.3 * torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    for count in (None, 4.5):
        a, b = lp0.clone().requires_grad_(), lp0.clone().requires_grad_()
        want, want_stats = policy_loss(a, old, adv, mask, 0.2, token_count=count)
        per_token, stats = get_policy_loss("ppo")(b, old, adv, mask, PolicyLossConfig(0.2))
        got = aggregate(per_token, mask, "token-mean", count)
        assert torch.equal(got, want)
        want.backward()
        got.backward()
        assert torch.equal(a.grad, b.grad)
        for k in ("clipfrac", "approx_kl", "ratio_mean"):
            assert torch.equal(stats[k], want_stats[k]), k


def test_ppo_clip_higher_by_hand():
    # ratios e^0.25 = 1.284 and e^-0.4 = 0.670, advantage +1 and -1
    old = torch.zeros(1, 2)
    lp = leaf([[0.25, -0.4]])
    mask = torch.ones(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    sym, s_sym = get_policy_loss("ppo")(lp, old, adv, mask, PolicyLossConfig(0.2))
    # A > 0: min(r, 1.2) = 1.2 (clipped); A < 0: max(r, 0.8) -> loss -(-1) * 0.8
    close(sym, [[-1.2, 0.8]])
    close(s_sym["clipfrac"], 1.0)
    high, s_high = get_policy_loss("ppo")(lp, old, adv, mask, PolicyLossConfig(0.2, 0.28))
    close(high, [[-1.28, 0.8]])  # r = 1.2840 is above 1.28 too: clipped there
    high.sum().backward()
    close(lp.grad, [[0.0, 0.0]])  # both clipped: no gradient


def test_ppo_clip_higher_lets_a_ratio_below_the_upper_bound_grow():
    old, mask, adv = torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1)
    lp = leaf([[0.22]])  # r = 1.2461: above 1.2, below 1.28
    loss, _ = get_policy_loss("ppo")(lp, old, adv, mask, PolicyLossConfig(0.2, 0.28))
    close(loss, [[-math.exp(0.22)]])
    loss.sum().backward()
    close(lp.grad, [[-math.exp(0.22)]])  # d(-r)/dlp = -r
    lp.grad = None
    loss, _ = get_policy_loss("ppo")(lp, old, adv, mask, PolicyLossConfig(0.2))
    close(loss, [[-1.2]])


def test_ppo_dual_clip_by_hand():
    # A = -2 and r = e^1.5 = 4.48: the clipped loss is max(2 r, 2 * 0.8) = 8.96; dual clip C = 3 caps it at 6
    old, mask = torch.zeros(1, 3), torch.ones(1, 3)
    lp = leaf([[1.5, 1.5, 0.1]])
    adv = torch.tensor([[-2.0, 2.0, -2.0]])
    loss, stats = get_policy_loss("ppo")(lp, old, adv, mask, PolicyLossConfig(0.2, dual_clip=3.0))
    r = math.exp(1.5)
    close(loss, [[6.0, -2.0 * 1.2, 2.0 * math.exp(0.1)]])  # capped; A > 0 untouched (clipped); inside the bound
    close(stats["dual_clipfrac"], 1 / 3)
    loss.sum().backward()
    close(lp.grad, [[0.0, 0.0, 2.0 * math.exp(0.1)]])  # the capped token has no gradient
    plain, _ = get_policy_loss("ppo")(lp.detach(), old, adv, mask, PolicyLossConfig(0.2))
    close(plain[0, 0], 2.0 * r)


def test_ratio_stats_mean_and_max_over_valid_tokens():
    lp = torch.tensor([[0.0, math.log(2.0), math.log(9.0)]])
    _, stats = get_policy_loss("ppo")(lp, torch.zeros(1, 3), torch.ones(1, 3), torch.tensor([[1.0, 1.0, 0.0]]),
                                      PolicyLossConfig())
    close(stats["ratio_mean"], 1.5)
    close(stats["ratio_max"], 2.0)  # the masked 9 is not seen


# ---- gspo ---------------------------------------------------------------------------------------------------

def test_gspo_sequence_ratio_by_hand():
    # row 0: token log-ratios 0.1, 0.3 -> s = e^0.2 = 1.2214 (> 1.2: clipped for A > 0 unless eps_high is larger)
    # row 1: one valid token, log-ratio -0.1 -> s = 0.905, A = -1 (inside the clip range)
    old = torch.zeros(2, 3)
    lp = leaf([[0.1, 0.3, 5.0], [-0.1, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    loss, stats = get_policy_loss("gspo")(lp, old, adv, mask, PolicyLossConfig(0.2, 0.3))
    s0, s1 = math.exp(0.2), math.exp(-0.1)
    close(loss * mask, [[-s0, -s0, 0.0], [s1, 0.0, 0.0]])  # entries leave masking to aggregate
    close(stats["seq_ratio_mean"], (s0 + s1) / 2)
    close(stats["clipfrac"], 0.0)
    # seq-mean-token-mean: each row's mean; the gradient through token t is -A s_i / |y_i| (the sequence ratio's)
    agg = aggregate(loss, mask, "seq-mean-token-mean", 1.0)
    agg.backward()
    close(lp.grad, [[-s0 / 2, -s0 / 2, 0.0], [s1, 0.0, 0.0]])
    # with the symmetric clip row 0 is clipped at 1.2 and has no gradient
    lp.grad = None
    loss, stats = get_policy_loss("gspo")(lp, old, adv, mask, PolicyLossConfig(0.2))
    close(loss[0, :2], [-1.2, -1.2])
    close(stats["clipfrac"], 0.5)
    (loss * mask).sum().backward()
    close(lp.grad[0], [0.0, 0.0, 0.0])


def test_gspo_equals_the_sequence_level_objective_gradient():
    torch.manual_seed(1)
    lp0, old = torch.randn(2, 4) * 0.05, torch.zeros(2, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    adv = torch.tensor([[0.7] * 4, [-1.3] * 4])
    a, b = lp0.clone().requires_grad_(), lp0.clone().requires_grad_()
    loss, _ = get_policy_loss("gspo")(a, old, adv, mask, PolicyLossConfig(0.5))  # nothing clipped
    aggregate(loss, mask, "seq-mean-token-mean").backward()
    s = torch.exp(((b - old) * mask).sum(-1) / mask.sum(-1))
    (-(adv[:, 0] * s)).mean().backward()  # GSPO's objective: -mean_i A_i s_i
    close(a.grad, b.grad)


def test_gspo_log_ratio_is_clamped():
    loss, _ = get_policy_loss("gspo")(torch.tensor([[100.0]]), torch.zeros(1, 1), torch.tensor([[-1.0]]),
                                      torch.ones(1, 1), PolicyLossConfig(0.2))
    assert torch.isfinite(loss).all()
    close(loss, [[math.exp(20.0)]], atol=1e3)


# ---- cispo --------------------------------------------------------------------------------------------------

def test_cispo_by_hand():
    # r = e^0.5 = 1.65 (weight clipped to 1.28), r = e^-0.05 = 0.951 (kept); A = 2 and -1
    old = torch.tensor([[-1.0, -2.0]])
    lp = leaf([[-0.5, -2.05]])
    adv = torch.tensor([[2.0, -1.0]])
    loss, stats = get_policy_loss("cispo")(lp, old, adv, torch.ones(1, 2), PolicyLossConfig(0.2, 0.28))
    w1 = math.exp(-0.05)
    close(loss, [[-1.28 * 2.0 * -0.5, w1 * -2.05]])
    close(stats["clipfrac"], 0.5)
    loss.sum().backward()
    close(lp.grad, [[-1.28 * 2.0, w1]])  # the clipped token keeps its (capped) gradient


# ---- aggregation --------------------------------------------------------------------------------------------

X = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
M = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


def test_aggregation_modes_by_hand():
    close(aggregate(X, M, "token-mean"), (1 + 2 + 3 + 4) / 4)
    close(aggregate(X, M, "seq-mean-token-mean"), (2.0 + 4.0) / 2)  # the empty row is not an answer
    close(aggregate(X, M, "seq-mean-token-sum-norm", horizon=4), (6 / 4 + 4 / 4) / 2)
    close(agg_count(M, "token-mean"), 4.0)
    close(agg_count(M, "seq-mean-token-mean"), 2.0)
    # a global count (this rank's share) replaces the local one; 0 divides by 1
    close(aggregate(X, M, "token-mean", 8.0), 10 / 8)
    close(aggregate(X, M, "seq-mean-token-mean", 3.0), 6 / 3)
    close(aggregate(X, torch.zeros_like(M), "token-mean", 0.0), 0.0)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(X, M, "sum")
    with pytest.raises(ValueError, match="horizon"):
        aggregate(X, M, "seq-mean-token-sum-norm")


def test_sharded_aggregation_equals_the_whole_batch():
    """Two ranks' losses with the global count (as train_rlhf passes it) average to the whole batch's loss."""
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        whole = aggregate(X, M, mode, horizon=4)
        shards = [(X[:1], M[:1]), (X[1:], M[1:])]
        share = sum(float(agg_count(m, mode)) for _, m in shards) / 2
        close(sum(aggregate(x, m, mode, share, 4) for x, m in shards) / 2, whole)


# ---- dr_grpo ------------------------------------------------------------------------------------------------

def test_dr_grpo_subtracts_the_group_mean_only():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    scores = torch.tensor([1.0, 0.0, 3.0, 1.0])
    group = torch.tensor([0, 0, 1, 1])
    rewards = torch.zeros(4, 3)
    rewards[:, 0] = -0.1  # a KL penalty on the first token of each answer
    last = torch.tensor([1, 2, 0, 1])
    rewards[torch.arange(4), last] += scores
    adv, ret = get_estimator("dr_grpo").fn(AdvantageInputs(rewards, mask, scores, group))
    assert ret is None
    centred = torch.tensor([0.5, -0.5, 1.0, -1.0])  # std (0.707, 1.414) not divided out
    want = centred.unsqueeze(1) * mask
    want[:, 0] += -0.1  # the penalty still to come at the first token, unnormalised
    close(adv, want)
    grpo, _ = get_estimator("grpo").fn(AdvantageInputs(rewards, mask, scores, group))
    close(grpo[0, 1], 0.5 / (math.sqrt(0.5) + 1e-6), atol=1e-5)


# ---- dynamic sampling and truncated answers -----------------------------------------------------------------

def test_groups_with_variance():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5])
    group = torch.tensor([0, 0, 1, 1, 2, 2, 7, 7])
    assert groups_with_variance(scores, group).tolist() == [False, False, True, True, False, False, False, False]


def test_truncated_rows():
    eos = 2
    ids = torch.tensor([[5, 2, 0], [5, 6, 7], [2, 0, 0], [5, 6, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])  # the last row was cut at a pad
    assert truncated_rows(ids, mask, eos).tolist() == [False, True, False, True]


def test_mask_truncated_completions_puts_no_loss_on_cut_answers():
    t = trainer(with_critic=False, estimator="grpo", n_samples=2)
    t.generator.fmt = type("Fmt", (), {"eos_token_id": 3})()  # FakeGenerator answers [1, 2, 3, 0] (mask 1 1 1 0)
    t.s = PPOSettings(advantage_estimator="grpo", n_samples_per_prompt=2, mask_truncated_completions=True)
    exp = experience(t)
    assert exp["loss_mask"].tolist() == exp["action_mask"].tolist()  # 3 ends each answer: nothing cut
    t.generator.fmt.eos_token_id = 4  # now no answer has its end-of-turn token
    exp = experience(t)
    assert exp["loss_mask"].sum() == 0 and exp["action_mask"].sum() == 12
    stats = t.train_rlhf(exp, NanGuard(3))
    assert stats["actor_loss"] == 0.0 and t.engine.actor.emb.weight.grad.abs().sum() == 0


def test_select_and_merge_experiences():
    pad = 0
    a = {"seq": torch.tensor([[7, 1, 2, 3], [7, 1, 4, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
         "prompt_len": 2, "action_mask": torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
         "logprobs": torch.tensor([[-1.0, -2.0], [-3.0, 0.0]]), "ref_logprobs": torch.zeros(2, 2),
         "values": None, "live_values": None, "scores": torch.tensor([1.0, 0.0]), "group": torch.tensor([0, 0]),
         "reward_values": {"r": [1.0, 0.0]}, "experience_time": 1.0, "gen_time": 0.5}
    a["loss_mask"] = a["action_mask"]
    b = {"seq": torch.tensor([[5, 6, 7, 8, 9], [9, 9, 9, 8, 8], [0, 6, 7, 1, 1]]),
         "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]),
         "prompt_len": 3, "action_mask": torch.ones(3, 2), "logprobs": -torch.ones(3, 2),
         "ref_logprobs": torch.zeros(3, 2), "values": None, "live_values": None,
         "scores": torch.tensor([0.0, 1.0, 2.0]), "group": torch.tensor([0, 0, 1]),
         "reward_values": {"r": [0.0, 1.0, 2.0]}, "experience_time": 2.0, "gen_time": 1.0}
    b["loss_mask"] = b["action_mask"]
    b1 = select_rows(b, torch.tensor([True, True, False]))
    assert b1["seq"].shape == (2, 5) and b1["reward_values"] == {"r": [0.0, 1.0]} and b1["prompt_len"] == 3
    m = merge_experiences([a, b1], pad)
    assert m["prompt_len"] == 3 and m["seq"].shape == (4, 5)
    assert m["seq"][0].tolist() == [0, 7, 1, 2, 3] and m["attention_mask"][0].tolist() == [0, 1, 1, 1, 1]
    assert m["seq"][2].tolist() == [5, 6, 7, 8, 9]
    assert m["group"].tolist() == [0, 0, 1, 1] and m["reward_values"] == {"r": [1.0, 0.0, 0.0, 1.0]}
    assert m["logprobs"][1].tolist() == [-3.0, 0.0] and m["values"] is None
    assert (m["experience_time"], m["gen_time"]) == (3.0, 1.5)


def fake_experience(scores: list[float], width: int = 3) -> dict:
    """A generation batch of 2 prompts x 2 answers with these scores (what DynamicSampler reads and merges)."""
    n = len(scores)
    return {"seq": torch.ones(n, 2 + width, dtype=torch.long), "attention_mask": torch.ones(n, 2 + width, dtype=torch.long),
            "prompt_len": 2, "action_mask": torch.ones(n, width), "loss_mask": torch.ones(n, width),
            "logprobs": torch.zeros(n, width), "ref_logprobs": torch.zeros(n, width), "values": None,
            "live_values": None, "scores": torch.tensor(scores), "group": torch.arange(n) // 2,
            "reward_values": {"r": list(scores)}, "experience_time": 1.0, "gen_time": 0.5}


# rank -> generation batches: rank 0 fills its 2 groups at once; rank 1 keeps one group, then none
SAMPLER_BATCHES = {"short": [[[0.0, 1.0, 1.0, 0.0]], [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0],
                                                      [1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]]],
                   "none": [[[0.0, 1.0, 1.0, 0.0]], [[1.0, 1.0, 0.0, 0.0]] * 4]}


def _sampler_worker(rank: int, world_size: int, init_file: str, out_dir: str, case: str) -> None:
    import torch.distributed as tdist

    from dschat.trainers.ppo_run import DynamicSampler

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        sampler = DynamicSampler(target=2, max_batches=3, pad_token_id=0)
        batches = SAMPLER_BATCHES[case][rank]
        for i in range(3):
            sampler.add(fake_experience(batches[min(i, len(batches) - 1)]))
            if sampler.ready():
                break
        merged, logged = sampler.take()
        torch.save({"batches": i + 1, "rows": None if merged is None else merged["seq"].shape[0],
                    "scores": None if merged is None else merged["scores"], "logged": logged},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("case", ["short", "none"])
def test_dynamic_sampling_ranks_agree_when_the_budget_runs_out(tmp_path, case):
    """Two gloo ranks: one full at once, the other short of groups; both generate until the budget is spent
    (the same number of collectives) and both train on the fewest groups any rank kept (or neither trains)."""
    import torch.multiprocessing as mp

    mp.spawn(_sampler_worker, args=(2, str(tmp_path / "init"), str(tmp_path), case), nprocs=2, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [o["batches"] for o in outs] == [3, 3]
    assert outs[0]["logged"] == outs[1]["logged"]
    if case == "short":
        assert [o["rows"] for o in outs] == [2, 2]  # one group each
        assert outs[1]["scores"].tolist() == [1.0, 0.0]  # the one group of rank 1 that differed
        assert outs[0]["logged"] == {"ds_dropped_groups": 5.0, "ds_rollouts": 24.0, "ds_gen_batches": 3.0,
                                     "ds_kept_groups": 2.0}
    else:
        assert [o["rows"] for o in outs] == [None, None]


def test_dynamic_sampling_on_one_rank_trims_to_the_target():
    from dschat.trainers.ppo_run import DynamicSampler

    sampler = DynamicSampler(target=3, max_batches=5, pad_token_id=0)
    sampler.add(fake_experience([0.0, 1.0, 1.0, 1.0]))  # one group kept
    assert not sampler.ready()
    sampler.add(fake_experience([0.0, 1.0, 1.0, 0.0, 0.5, 0.2], width=4))  # three kept: one too many
    assert sampler.ready()
    merged, logged = sampler.take()
    assert merged["scores"].tolist() == [0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert merged["group"].tolist() == [0, 0, 1, 1, 2, 2] and merged["action_mask"].shape == (6, 4)
    assert logged == {"ds_dropped_groups": 1.0, "ds_rollouts": 10.0, "ds_gen_batches": 2.0, "ds_kept_groups": 3.0}
    assert (merged["experience_time"], merged["gen_time"]) == (2.0, 1.0)
    assert sampler.batches == 0 and sampler.kept == []  # reset for the next step


# ---- entropy ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_other_aggregations_train_actor_and_critic(mode):
    t = trainer()
    t.s = PPOSettings(loss_agg_mode=mode, use_kl_loss=True, kl_estimator="k2", entropy_coef=0.01)
    t.entropy_coef = 0.01
    stats = t.train_rlhf(experience(t), NanGuard(3))
    assert math.isfinite(stats["actor_loss"]) and math.isfinite(stats["critic_loss"]) and "kl_loss" in stats
    assert t.engine.actor.steps == 1 and t.engine.critic.steps == 1


def test_entropy_is_logged_every_step_and_the_coefficient_adapts():
    t = trainer(with_critic=False, estimator="grpo", n_samples=2)
    stats = t.train_rlhf(experience(t), NanGuard(3))
    assert stats["entropy"] > 0  # logged with --entropy_coef 0
    t.s = PPOSettings(advantage_estimator="grpo", n_samples_per_prompt=2, entropy_target=1.0, entropy_coef=0.0,
                      entropy_coef_delta=0.4)
    assert t.adapt_entropy_coef(0.5) == 0.4  # below the target: raised
    assert t.adapt_entropy_coef(0.5) == 0.8
    assert t.adapt_entropy_coef(0.5) == 1.0  # clipped at 1
    assert t.adapt_entropy_coef(2.0) == pytest.approx(0.6)  # above: lowered
    t.entropy_coef = 0.1
    assert t.adapt_entropy_coef(2.0) == 0.0  # clipped at 0


# ---- the default step is today's step -----------------------------------------------------------------------

TODAY = [("grpo", {}), ("reinforce_pp", {"entropy_coef": 0.02, "use_kl_loss": True, "kl_estimator": "k2"}),
         ("gae", {"entropy_coef": 0.01})]


@pytest.mark.parametrize("estimator,extra", TODAY)
def test_default_step3_step_gives_todays_loss_and_gradients(estimator, extra):
    """A default PPOTrainer update (ppo, token-mean) gives exactly the loss and gradients train_rlhf computed before
    the registry: algos/losses.policy_loss with the global token count, the entropy bonus as coef * sum / tokens,
    the KL loss, the critic's value loss (torch.equal, not allclose: the order autograd sums in matters too)."""
    from dschat.algos.kl import kl_penalty
    from dschat.algos.losses import value_loss
    from dschat.algos.masked import masked_sum
    from dschat.trainers.ppo import answer_values

    t = trainer(with_critic=estimator == "gae", estimator=estimator, n_samples=2 if estimator == "grpo" else 1)
    t.s = PPOSettings(advantage_estimator=estimator, n_samples_per_prompt=t.s.n_samples_per_prompt, **extra)
    t.entropy_coef = t.s.entropy_coef
    exp = experience(t)
    exp["ref_logprobs"] = exp["ref_logprobs"] - 0.3  # a KL to the reference
    models = [m for m in (t.engine.actor, t.engine.critic) if m is not None]
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    stats = t.train_rlhf(exp, NanGuard(3))
    got = [m.emb.weight.grad.clone() for m in models]
    for m, state in zip(models, states):
        m.zero_grad()
        m.load_state_dict(state)
    s, mask, actor = t.s, exp["action_mask"], t.engine.actor
    tokens = mask.sum().double().item()
    logprobs, entropy = answer_logprobs(actor, exp["seq"], exp["attention_mask"], exp["prompt_len"],
                                        s.entropy_coef > 0)
    want, _ = policy_loss(logprobs, exp["logprobs"], exp["advantages"], mask, 0.2, token_count=tokens)
    loss = want
    if entropy is not None:
        loss = loss - s.entropy_coef * masked_sum(entropy, mask) / tokens
    if s.use_kl_loss:
        loss = loss + t.kl_ctl.value * masked_sum(kl_penalty(logprobs, exp["ref_logprobs"], s.kl_estimator), mask) / tokens
    loss.backward()
    assert stats["actor_loss"] == want.item()
    assert torch.equal(got[0], actor.emb.weight.grad)
    if t.engine.critic is not None:
        values = answer_values(t.engine.critic, exp["seq"], exp["attention_mask"], exp["prompt_len"])
        value_loss(values, exp["values"], exp["returns"], mask, 0.2, token_count=tokens)[0].backward()
        assert torch.equal(got[1], t.engine.critic.emb.weight.grad)


# ---- DPO's loss registry ------------------------------------------------------------------------------------

def test_dpo_losses_are_a_registry():
    assert DPO_LOSS_KINDS == ("sigmoid", "ipo") and set(DPO_LOSSES) == {"sigmoid", "ipo"}
    h = torch.tensor([2.0, -1.0])
    close(DPO_LOSSES["sigmoid"](h, 0.5), (-torch.nn.functional.logsigmoid(torch.tensor([1.0, -0.5]))).mean())
    close(DPO_LOSSES["ipo"](h, 0.5), (1.0 + 4.0) / 2)
    with pytest.raises(ValueError, match="registered twice"):
        register_dpo_loss("ipo")(lambda h, beta: h.mean())
    loss, _ = dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -2.0]),
                       torch.tensor([-2.0, -2.0]), 0.5, kind="ipo")
    close(loss, 2.5)


# ---- flags --------------------------------------------------------------------------------------------------

def step3_parse_args():
    spec = importlib.util.spec_from_file_location("step3_main", REPO / "training" / "step3_rlhf_finetuning" / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


GROUP = ["--advantage_estimator", "grpo", "--n_samples_per_prompt", "2", "--reward_fn", "builtin_judge"]


def test_policy_loss_flags():
    parse_args = step3_parse_args()
    args = parse_args(GROUP)
    assert (args.policy_loss, args.cliprange_high, args.dual_clip, args.loss_agg_mode, args.dynamic_sampling,
            args.max_gen_batches, args.mask_truncated_completions, args.entropy_target) == \
        ("ppo", None, None, "token-mean", False, None, False, None)
    assert parse_args([*GROUP, "--dynamic_sampling", "--generation_batches", "2"]).max_gen_batches == 6
    bad = [
        (["--dual_clip", "1"], "--dual_clip must be a finite number > 1"),
        (["--dual_clip", "3", "--policy_loss", "gspo"], "--dual_clip is a bound of PPO's clipped loss"),
        (["--cliprange_high", "0"], "--cliprange_high must be a finite number in (0.0"),
        (["--cliprange_high", "nan"], "--cliprange_high must be a finite number"),
        (["--entropy_target", "-1"], "--entropy_target must be a finite number in [0.0"),
        (["--entropy_target", "1", "--entropy_coef", "2"], "--entropy_target adapts --entropy_coef within [0, 1]"),
        (["--entropy_coef_delta", "0", "--entropy_target", "1"], "--entropy_coef_delta must be"),
        (["--entropy_coef_delta", "0.1"], "--entropy_coef_delta is --entropy_target's step"),
        (["--max_gen_batches", "3"], "--max_gen_batches is --dynamic_sampling's budget"),
        (["--dynamic_sampling", "--generation_batches", "2", "--max_gen_batches", "1"],
         "--max_gen_batches (1) must be at least --generation_batches (2)"),
        (["--policy_loss", "cispo", "--cliprange", "1.5"], "--cliprange must be below 1 with --policy_loss cispo"),
    ]
    for extra, message in bad:
        with pytest.raises(FlagError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            parse_args([*GROUP, *extra])
    with pytest.raises(FlagError, match="--dynamic_sampling .* needs a group estimator"):
        parse_args(["--advantage_estimator", "reinforce_pp", "--reward_fn", "builtin_judge", "--dynamic_sampling"])


# ---- step 3 on 1 rank and on 2 ranks (ZeRO-3) ---------------------------------------------------------------

MENU_STEP3 = ["--actor_model_name_or_path", "builtin", "--per_device_generation_batch_size", "4",
              "--per_device_training_batch_size", "8", "--max_answer_seq_len", "16", "--num_judge_prompts", "4",
              "--enable_test_mode", "--test_stop_step", "2", "--num_warmup_steps", "0", "--n_samples_per_prompt", "2",
              "--reward_fn", "builtin_judge", "--data_path", "dschat/builtin"]


def train_logs(out) -> dict:
    """The train/ scalars of a run's TensorBoard events, by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [p for p in out.rglob("events.out.tfevents.*")]
    found: dict[str, list[float]] = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return found


def test_step3_menu_on_one_rank(tmp_path):
    """dr_grpo + gspo + clip-higher + Dr. GRPO's aggregation + dynamic sampling + overlong filtering + adaptive
    entropy + sampling-pass log-probs; stopped after step 1 and resumed: the entropy coefficient comes back."""
    out = tmp_path / "s3"
    flags = [STEP3, *MENU_STEP3, "--data_output_path", tmp_path / "cache", "--advantage_estimator", "dr_grpo",
             "--policy_loss", "gspo", "--cliprange", "0.1", "--cliprange_high", "0.15", "--loss_agg_mode",
             "seq-mean-token-sum-norm", "--dynamic_sampling", "--max_gen_batches", "3", "--mask_truncated_completions",
             "--entropy_target", "5", "--logprobs_from_generation", "--save_interval", "1", "--enable_tensorboard",
             "--output_dir", out]
    run([*flags, "--test_stop_step", "1", "--tensorboard_path", tmp_path / "tb1"])
    state = json.loads(next((out / "checkpoints").rglob("state.json")).read_text())
    assert state["entropy_coef"] == pytest.approx(0.005)  # entropy below 5 nats: raised from 0 by the delta
    run([*flags, "--resume", "--tensorboard_path", tmp_path / "tb2"])
    assert (out / "actor" / "dschat_complete.json").is_file()
    first, resumed = train_logs(tmp_path / "tb1"), train_logs(tmp_path / "tb2")
    for tag in ("train/entropy", "train/entropy_coef", "train/ratio_mean", "train/ratio_max",
                "train/ds_dropped_groups", "train/ds_rollouts", "train/ds_gen_batches", "train/ds_kept_groups"):
        assert tag in first and tag in resumed, (tag, sorted(first))
    assert resumed["train/entropy_coef"] == [pytest.approx(0.01)]  # restored, then raised again
    logs = {k: first[k] + resumed[k] for k in first}
    assert all(abs(r - 1.0) < 1e-3 for r in logs["train/ratio_max"]), logs["train/ratio_max"]
    assert all(1 <= g <= 3 for g in logs["train/ds_gen_batches"])
    assert logs["train/ds_rollouts"] == [8 * g for g in logs["train/ds_gen_batches"]]  # 4 prompts x 2 answers each
    assert all(k == 4 for k in logs["train/ds_kept_groups"])  # a full batch each step
    m = metrics(out / "actor")
    assert (m["policy_loss"], m["loss_agg_mode"]) == ("gspo", "seq-mean-token-sum-norm")
    assert m["rollouts"] == sum(logs["train/ds_rollouts"])  # counted on across the resume
    assert m["final_entropy"] == pytest.approx(resumed["train/entropy"][-1])


def test_step3_menu_on_two_ranks_zero3(tmp_path):
    out = tmp_path / "s3"
    run([STEP3, *MENU_STEP3, "--data_output_path", tmp_path / "cache", "--advantage_estimator", "grpo",
         "--policy_loss", "cispo", "--cliprange_high", "0.28", "--loss_agg_mode", "seq-mean-token-mean",
         "--dynamic_sampling", "--mask_truncated_completions", "--entropy_target", "0.5", "--entropy_coef", "0.01",
         "--actor_zero_stage", "3", "--enable_hybrid_engine", "--enable_tensorboard", "--tensorboard_path",
         tmp_path / "tb", "--output_dir", out], ranks=2)
    m = metrics(out / "actor")
    assert m["ppo_steps"] == 2 and (out / "actor" / "dschat_complete.json").is_file()
    assert m["policy_loss"] == "cispo" and m["rollouts"] % 16 == 0 and m["rollouts"] >= 32  # 2 ranks x 4 x 2 a batch
    logs = train_logs(tmp_path / "tb")
    assert all(k % 2 == 0 and 0 < k <= 8 for k in logs["train/ds_kept_groups"])  # the same count on both ranks
    assert all(abs(r - 1.0) < 1e-3 for r in logs["train/ratio_max"]), logs["train/ratio_max"]  # the hybrid twin
    assert len(logs["train/entropy_coef"]) == 2 and len(logs["train/entropy"]) == 2
