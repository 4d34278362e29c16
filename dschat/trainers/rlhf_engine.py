"""The four (or five) models of PPO RLHF, each its own DeepSpeed engine.

actor   step-1 model, trained (ZeRO --actor_zero_stage, optional LoRA)
ref     frozen copy of the step-1 model (ZeRO-3 when the actor is ZeRO-3, else 0); with LoRA-only
        training (--only_optimize_lora) the actor engine with its adapters off instead of a copy
critic  step-2 reward model, trained, per-token values (ZeRO --critic_zero_stage, optional LoRA);
        only for estimators that need values (gae); with --critic_from_actor the actor with a fresh value head
reward  frozen step-2 reward model (ZeRO-3 when the critic is ZeRO-3, else 0); likewise the critic with
        its adapters off (and its original head) when the critic trains LoRA only; only when --reward_fn
        names `reward_model` (rule-based rewards need no model)
gold    optional second reward model that only scores evaluation answers (--gold_reward_model)
ema     optional exponential moving average of the actor (--enable_ema): an fp32 CPU shadow (trainers/ema.py), no engine
This module only builds them (and the reward set that scores rollouts); how PPO uses them lives in ppo.py.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from dschat.models.heads import check_trained_reward_model, create_reward_model
from dschat.models.loading import create_hf_model, load_tokenizer, read_json, split_model_path
from dschat.models.lora import LORA_ALPHA, WithoutAdapters, apply_lora
from dschat.rewards.combine import RewardSet
from dschat.rewards.model import RewardModelScorer
from dschat.rewards.registry import RewardContext
from dschat.runtime import dist
from dschat.runtime.ds_config import get_eval_ds_config, get_train_ds_config
from dschat.runtime.engine import build_engine, build_frozen_engine, torch_dtype, warmup_steps
from dschat.runtime.errors import FlagError, ModelPathError
from dschat.trainers.ema import ActorEMA


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of a tokenizer's vocabulary and special tokens (equal fingerprints = same token ids)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256((vocab + json.dumps(special)).encode()).hexdigest()


def check_same_tokenizer(actor_tokenizer, actor_path: str, critic_path: str, trust_remote_code: bool,
                         flag: str = "--critic_model_name_or_path") -> None:
    """Actor and critic (or `flag`'s model) read the same token ids, so they must share a tokenizer."""
    critic_tokenizer = load_tokenizer(critic_path, trust_remote_code)
    if tokenizer_fingerprint(actor_tokenizer) != tokenizer_fingerprint(critic_tokenizer):
        raise FlagError(f"--actor_model_name_or_path ({actor_path}) and {flag} "
                        f"({critic_path}) use different tokenizers (vocabulary or special tokens differ); "
                        f"PPO scores the actor's token ids with that model, so both must come from one family")


def read_reward_stats(directory: str) -> dict[str, Any]:
    """Step 2's reward_stats.json ({} when absent); content that is not finite mean/std numbers names the file."""
    path = f"{directory}/reward_stats.json"
    stats = read_json(path)
    if not stats:
        return {}
    bad = [k for k in ("mean", "std") if not isinstance(stats.get(k), (int, float)) or isinstance(stats[k], bool)
           or not math.isfinite(stats[k])]
    if bad or stats["std"] < 0:
        raise ModelPathError(f"{path}: expected finite numbers 'mean' and 'std' >= 0 (step 2 writes them), got "
                             f"{json.dumps({k: stats.get(k) for k in ('mean', 'std')})}; re-run step 2 or remove "
                             f"the file (scores are then used unnormalised)")
    return stats


class RLHFEngine:
    """Builds actor, ref, (ema,) (critic,) and reward engines from step-1 and step-2 outputs.

    `with_critic` comes from the advantage estimator: critic-free estimators build no critic at all.
    """

    def __init__(self, args: argparse.Namespace, tokenizer, dtype: str, total_steps: int, with_critic: bool = True,
                 with_reward_model: bool = True):
        self.args, self.tokenizer, self.dtype = args, tokenizer, dtype
        self.torch_dtype = torch_dtype(dtype)
        critic_from_actor = with_critic and getattr(args, "critic_from_actor", False)
        uses_rm_path = with_reward_model or (with_critic and not critic_from_actor)
        self.reward_stats: dict[str, Any] = {}
        directory = None
        if uses_rm_path:
            # The reward model (and critic) must be a trained step-2 output: checked before any engine is built.
            check_same_tokenizer(tokenizer, args.actor_model_name_or_path, args.critic_model_name_or_path,
                                 args.trust_remote_code)
            check_trained_reward_model(args.critic_model_name_or_path, "--critic_model_name_or_path",
                                       args.trust_remote_code)
            directory, _ = split_model_path(args.critic_model_name_or_path)
            self.reward_stats = read_reward_stats(directory) if with_reward_model else {}
        self.gold, self.gold_stats = None, {}
        if args.gold_reward_model:
            self.gold, self.gold_stats = self._gold_reward_model(args.gold_reward_model)
        world = dist.world_size()
        tb = args.tensorboard_path if args.enable_tensorboard else None
        micro = args.per_device_training_batch_size

        def train_cfg(stage: int, grad_accum: int, name: str) -> dict:
            return get_train_ds_config(stage=stage, dtype=dtype, micro_batch=micro, world_size=world,
                                       grad_accum=grad_accum, offload=args.offload, tensorboard_path=tb,
                                       tb_name=name, gradient_clipping=getattr(args, "max_grad_norm", 1.0))

        self.actor = self._actor(train_cfg(args.actor_zero_stage, args.actor_gradient_accumulation_steps,
                                           "step3_actor"), total_steps)
        # The reference's frozen-engine config (the engine gets its own copy of the dict).
        ref_stage = 3 if args.actor_zero_stage == 3 else 0
        ref_cfg = get_eval_ds_config(stage=ref_stage, dtype=dtype, world_size=world,
                                     offload=args.offload_reference_model)
        # LoRA-only training leaves the base weights as loaded: the frozen model is then the trained engine
        # with its adapters off, not a second copy (unless that copy was asked to be offloaded).
        lora_only = args.only_optimize_lora and not args.no_shared_base
        self.shared = {"ref": lora_only and args.actor_lora_dim > 0 and not args.offload_reference_model,
                       "reward": lora_only and with_critic and not critic_from_actor and args.critic_lora_dim > 0
                       and not args.offload_reward_model}
        self.ref = WithoutAdapters(self.actor) if self.shared["ref"] else \
            build_frozen_engine(self._causal_lm(copy.deepcopy(ref_cfg)), copy.deepcopy(ref_cfg))
        self.ema = ActorEMA(self.actor) if args.enable_ema else None
        self.critic = None
        if with_critic:
            self.critic = self._critic(train_cfg(args.critic_zero_stage, args.gradient_accumulation_steps,
                                                 "step3_critic"), total_steps, critic_from_actor)
        self.reward = None
        if with_reward_model:
            reward_stage = 3 if args.critic_zero_stage == 3 else 0
            reward_cfg = get_eval_ds_config(stage=reward_stage, dtype=dtype, world_size=world,
                                            offload=args.offload_reward_model)
            self.reward = WithoutAdapters(self.critic) if self.shared["reward"] else \
                build_frozen_engine(self._reward_model(reward_cfg), reward_cfg)
        for name, base in (("reference", "actor"), ("reward model", "critic")):
            if self.shared["ref" if base == "actor" else "reward"]:
                dist.print_rank0(f"{name}: the {base} with its LoRA adapters off (--only_optimize_lora keeps its "
                                 f"base weights as loaded), no second copy")
        if with_reward_model and args.normalize_reward and not self.reward_stats:
            dist.print_rank0(f"note: {directory} has no reward_stats.json (not a dschat step-2 output), so reward "
                             f"scores are used unnormalised")

    def _gold_reward_model(self, path: str) -> tuple[torch.nn.Module, dict[str, Any]]:
        """--gold_reward_model: a trained reward model with the actor's tokenizer, evaluation only (one per rank),
        and its reward_stats.json."""
        from transformers import AutoModelForSequenceClassification

        from dschat.models.builtin import resolve_model_name
        from dschat.models.loading import load_model
        from dschat.runtime.engine import device

        a = self.args
        path = resolve_model_name(path)
        check_trained_reward_model(path, "--gold_reward_model", a.trust_remote_code)
        check_same_tokenizer(self.tokenizer, a.actor_model_name_or_path, path, a.trust_remote_code,
                             "--gold_reward_model")
        model = load_model(AutoModelForSequenceClassification, path, dtype=self.torch_dtype,
                           trust_remote_code=a.trust_remote_code)
        return model.to(device()).eval().requires_grad_(False), read_reward_stats(split_model_path(path)[0])

    def reward_set(self) -> RewardSet:
        """The rewards --reward_fn names, weighted by --reward_weights, with this engine's reward model."""
        a = self.args
        ctx = RewardContext(max_answer_seq_len=a.max_answer_seq_len, overlong_buffer_len=a.overlong_buffer_len,
                            reward_model=self.reward, reward_stats=self.reward_stats,
                            normalize_reward=a.normalize_reward, clip_reward_value=a.clip_reward_value,
                            padding_free=a.padding_free)
        return RewardSet.from_flags(a.reward_fn, a.reward_weights, ctx)

    def gold_scorer(self) -> RewardModelScorer | None:
        """--gold_reward_model's scorer: the same normalisation and clipping as the training reward model."""
        if self.gold is None:
            return None
        a = self.args
        return RewardModelScorer(self.gold, self.gold_stats, a.normalize_reward, a.clip_reward_value, a.padding_free)

    def trained_engines(self) -> dict[str, Any]:
        """The engines a checkpoint holds: actor, critic (if any). The EMA is checkpointed apart (checkpoint_extras)."""
        engines = {"actor": self.actor, "critic": self.critic}
        return {k: v for k, v in engines.items() if v is not None}

    def checkpoint_extras(self) -> dict[str, Any]:
        """State a checkpoint stores beside the engines, one file per rank: the EMA's fp32 shadow (if any)."""
        return {"ema": self.ema} if self.ema is not None else {}

    def _causal_lm(self, ds_config: dict, dropout: float | None = None, grad_ckpt: bool = False):
        return create_hf_model(AutoModelForCausalLM, self.args.actor_model_name_or_path, self.tokenizer, ds_config,
                               self.torch_dtype, dropout, grad_ckpt, self.args.trust_remote_code)

    def _reward_model(self, ds_config: dict, dropout: float | None = None, grad_ckpt: bool = False):
        return create_reward_model(self.args.critic_model_name_or_path, self.tokenizer, ds_config, self.torch_dtype,
                                   dropout, self.args.trust_remote_code, gradient_checkpointing=grad_ckpt,
                                   allow_fresh_head=False)

    def _actor(self, ds_config: dict, total_steps: int):
        a = self.args
        model = self._causal_lm(ds_config, 0.0 if a.actor_dropout is None else a.actor_dropout,  # no dropout unless asked
                                a.actor_gradient_checkpointing)
        if a.actor_lora_dim > 0:
            model = apply_lora(model, a.actor_lora_dim, a.actor_lora_module_name, a.only_optimize_lora,
                               "--actor_lora_module_name", alpha=getattr(a, "actor_lora_alpha", LORA_ALPHA),
                               target_modules=getattr(a, "actor_lora_target_modules", None))
        return build_engine(model, ds_config, a.actor_learning_rate, a.actor_weight_decay, a.actor_lora_learning_rate,
                            a.lr_scheduler_type, self.warmup(total_steps), total_steps)

    def warmup(self, total_steps: int) -> int:
        """Warmup steps of the actor's and critic's schedules (--warmup_ratio of the total, or --num_warmup_steps)."""
        return warmup_steps(self.args.num_warmup_steps, getattr(self.args, "warmup_ratio", None), total_steps)

    def _critic(self, ds_config: dict, total_steps: int, from_actor: bool = False):
        a = self.args
        if from_actor:  # --critic_from_actor: the one place a fresh (untrained) value head is allowed
            model = create_reward_model(a.actor_model_name_or_path, self.tokenizer, ds_config, self.torch_dtype,
                                        0.0 if a.critic_dropout is None else a.critic_dropout, a.trust_remote_code,
                                        gradient_checkpointing=a.critic_gradient_checkpointing, allow_fresh_head=True)
        else:
            model = self._reward_model(ds_config, 0.0 if a.critic_dropout is None else a.critic_dropout,
                                       a.critic_gradient_checkpointing)
        if a.critic_lora_dim > 0:
            model = apply_lora(model, a.critic_lora_dim, a.critic_lora_module_name, a.only_optimize_lora,
                               "--critic_lora_module_name", keep_trainable=("score",),
                               alpha=getattr(a, "critic_lora_alpha", LORA_ALPHA),
                               target_modules=getattr(a, "critic_lora_target_modules", None))
        return build_engine(model, ds_config, a.critic_learning_rate, a.critic_weight_decay,
                            a.critic_lora_learning_rate, a.lr_scheduler_type, self.warmup(total_steps), total_steps)

    def update_ema(self) -> bool:
        """Move the EMA (if any) towards the actor when the actor took an optimizer step since the last call."""
        return self.ema.update() if self.ema is not None else False
