"""PPOTrainer and RLHFEngine on small fake engines: update order, modes, logged names, EMA."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dschat.rewards.combine import RewardSet, resolve_spec
from dschat.rewards.registry import RewardContext
from dschat.trainers.loop import NanGuard
from dschat.trainers.ppo import PPOSettings, PPOTrainer
from dschat.trainers.rlhf_engine import RLHFEngine
from dschat.trainers.rollout import Rollout

VOCAB, PROMPT, ANSWER = 6, 3, 4


class FakeLM(torch.nn.Module):
    """An engine-like causal LM: forward gives .logits; backward/step are counted; records its modes."""

    def __init__(self, nan: bool = False):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, VOCAB)
        self.nan, self.backwards, self.steps, self.modes = nan, 0, 0, []

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        self.modes.append(self.training)
        logits = self.emb(input_ids)
        return SimpleNamespace(logits=logits * float("nan") if self.nan else logits)

    def backward(self, loss):
        self.backwards += 1
        loss.backward()

    def step(self):
        self.steps += 1


class FakeCritic(FakeLM):
    """An engine-like reward/critic model: a `score` head applied to every position."""

    def __init__(self, nan: bool = False):
        super().__init__(nan)
        self.score = torch.nn.Linear(VOCAB, 1)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        self.modes.append(self.training)
        hidden = self.emb(input_ids)
        return SimpleNamespace(logits=self.score(hidden * float("nan") if self.nan else hidden))


class FakeGenerator:
    def generate(self, prompt, prompt_mask, **sampling):
        answer = torch.tensor([[1, 2, 3, 0]] * prompt.shape[0])
        mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * prompt.shape[0])
        return Rollout(torch.cat([prompt, answer], 1), torch.cat([prompt_mask, mask.long()], 1), mask, PROMPT)


def trainer(actor_nan=False, critic_nan=False, with_critic=True, reward_stats=None,
            estimator="gae", n_samples=1) -> PPOTrainer:
    engine = SimpleNamespace(actor=FakeLM(actor_nan), ref=FakeLM(), reward=FakeCritic(),
                             critic=FakeCritic(critic_nan) if with_critic else None,
                             reward_stats=reward_stats or {}, tokenizer=None)
    rewards = RewardSet([resolve_spec("reward_model")], [1.0],
                        RewardContext(reward_model=engine.reward, reward_stats=engine.reward_stats, clip_reward_value=5.0))
    return PPOTrainer(engine, PPOSettings(advantage_estimator=estimator, n_samples_per_prompt=n_samples), FakeGenerator(),
                      rewards)


def experience(t: PPOTrainer) -> dict:
    prompt = torch.tensor([[4, 5, 1], [5, 4, 2]])
    exp = t.generate_experience(prompt, torch.ones_like(prompt))
    t.add_advantages([exp])
    return exp


@pytest.mark.parametrize("which", ["actor", "critic"])
def test_non_finite_loss_is_checked_before_any_update(which):
    t = trainer()
    exp = experience(t)
    getattr(t.engine, which).nan = True
    guard = NanGuard(limit=5)
    assert t.train_rlhf(exp, guard) is None
    assert guard.total == 1
    for model in (t.engine.actor, t.engine.critic):  # neither engine stepped: no half-applied update
        assert model.backwards == 0 and model.steps == 0
    getattr(t.engine, which).nan = False
    assert t.train_rlhf(exp, guard) is not None
    assert t.engine.actor.steps == 1 and t.engine.critic.steps == 1


def test_old_values_and_logprobs_come_from_eval_mode_and_training_resumes():
    t = trainer()
    experience(t)
    assert t.engine.critic.modes == [False] and t.engine.actor.modes == [False]
    assert t.engine.critic.training and t.engine.actor.training


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_critic_free_trainer_needs_no_critic(estimator):
    t = trainer(with_critic=False, estimator=estimator, n_samples=2)
    exp = experience(t)
    assert exp["values"] is None and exp["returns"] is None
    assert exp["seq"].shape[0] == 4 and exp["group"].tolist() == [0, 0, 1, 1]  # 2 prompts x 2 samples
    stats = t.train_rlhf(exp, NanGuard(3))
    assert "critic_loss" not in stats and t.engine.actor.steps == 1


def test_kl_loss_moves_the_kl_out_of_the_reward():
    t = trainer(estimator="reinforce_pp", with_critic=False)
    t.s = PPOSettings(advantage_estimator="reinforce_pp", use_kl_loss=True, kl_estimator="k3")
    prompt = torch.tensor([[4, 5, 1], [5, 4, 2]])
    exp = t.generate_experience(prompt, torch.ones_like(prompt))
    exp["ref_logprobs"] = exp["ref_logprobs"] - 0.5  # a reference that disagrees with the actor
    logged = t.add_advantages([exp])
    assert logged["kl"] > 0
    # no KL penalty in the rewards: the (whitened) advantages of a row are equal on every valid token
    adv = exp["advantages"][:, :3]
    assert torch.allclose(adv, adv[:, :1].expand_as(adv), atol=1e-5)
    stats = t.train_rlhf(exp, NanGuard(3))
    assert stats["kl_loss"] > 0


def test_reward_model_scores_are_normalised_with_step2_stats_and_logged_by_name():
    t = trainer(reward_stats={"mean": 1.0, "std": 2.0})
    prompt = torch.tensor([[4, 5, 1], [5, 4, 2]])
    exp = t.generate_experience(prompt, torch.ones_like(prompt))
    logged = t.add_advantages([exp])
    from dschat.algos.masked import end_scores
    from dschat.models.heads import token_values

    raw = end_scores(token_values(t.engine.reward, exp["seq"], exp["attention_mask"]), exp["attention_mask"])
    normalised = ((raw.float() - 1.0) / 2.0).clamp(-5, 5)
    torch.testing.assert_close(exp["scores"], normalised)
    assert logged["reward/reward_model"] == pytest.approx(normalised.mean().item(), abs=1e-6)
    assert logged["reward_score"] == pytest.approx(normalised.mean().item(), abs=1e-6)


def test_update_ema_moves_the_ema_towards_the_actor():
    from dschat.trainers.ema import ActorEMA

    actor = torch.nn.Linear(2, 2)
    engine = RLHFEngine.__new__(RLHFEngine)
    engine.actor = SimpleNamespace(module=actor, global_steps=0)
    engine.ema = ActorEMA(engine.actor, beta=0.75)
    before = [p.detach().clone() for p in actor.parameters()]
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(1.0)
    assert not engine.update_ema()  # no optimizer step yet: nothing to follow
    engine.actor.global_steps = 1
    assert engine.update_ema()
    for a, e, b in zip(actor.parameters(), engine.ema.shadow.values(), before):
        torch.testing.assert_close(e, 0.75 * b + 0.25 * a.detach())


def test_reused_critic_forward_gives_the_recomputed_update_with_one_forward_fewer():
    """reuse_critic_forward: the experience forward (graph kept) is the update's, so old values, losses and
    critic gradients equal the recomputing path's, with one critic forward instead of two."""
    grads, stats = {}, {}
    for reuse in (False, True):
        torch.manual_seed(0)
        t = trainer()
        t.s = PPOSettings(reuse_critic_forward=reuse)
        exp = experience(t)
        assert (exp["live_values"] is not None) == reuse
        stats[reuse] = t.train_rlhf(exp, NanGuard(3))
        grads[reuse] = [p.grad.clone() for p in t.engine.critic.parameters()]
        assert len(t.engine.critic.modes) == (1 if reuse else 2) and t.engine.critic.steps == 1
    assert stats[True] == pytest.approx(stats[False], abs=1e-6)
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b)


def test_has_dropout_sees_modules_and_config_dropout():
    from transformers import LlamaConfig, LlamaForCausalLM

    from dschat.models.heads import has_dropout

    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    assert not has_dropout(LlamaForCausalLM(config))
    config.attention_dropout = 0.1
    assert has_dropout(SimpleNamespace(module=LlamaForCausalLM(config)))  # an engine around it
    assert has_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))
    assert not has_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.0)))
