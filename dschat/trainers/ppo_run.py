"""Step 3 as named stages: data, engines, the rollout/update loop, evaluation and saving."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dschat.algos.advantages import get_estimator, groups_with_variance
from dschat.algos.kl import exact_kl
from dschat.data.builtin_task import heldout_chosen_judge, heldout_prompts, judge
from dschat.data.collators import PromptCollator
from dschat.data.loaders import make_loader
from dschat.data.phases import DataSettings
from dschat.data.ptx import unsupervised_loader
from dschat.models.export import DONE_MARKER, atomic_dir, export_gguf, save_hf_model
from dschat.models.forward import answer_logits
from dschat.models.heads import has_dropout
from dschat.rewards.combine import pass_at_k, pass_ks, resolve_spec
from dschat.runtime import dist
from dschat.runtime.accumulation import check_accumulation
from dschat.runtime.engine import to_device
from dschat.runtime.errors import FlagError
from dschat.trainers.base import Run, data_key, lora_key
from dschat.trainers.loop import (
    NanGuard,
    check_resume,
    resume,
    resume_key,
    save_checkpoint,
    untrained_batches,
)
from dschat.trainers.ppo import PPOSettings, PPOTrainer, merge_experiences, select_rows
from dschat.trainers.rlhf_engine import RLHFEngine
from dschat.trainers.rollout import Generator, decode_answers, encode_prompts, generate_rollout

BEST_DIR = "best_actor"  # --save_best_by keeps the best evaluated actor here until the run ends


class RLHFRun(Run):
    """One PPO run: prompts, engines, rewards, trainer, evaluation history."""

    name = "step 3"

    def __init__(self, args: argparse.Namespace):
        super().__init__(args, args.actor_model_name_or_path, padding_side="left")
        data = self.load_data(DataSettings(data_path=tuple(args.data_path), data_split=args.data_split, phase=3,
                                           seed=args.seed, max_prompt_len=args.max_prompt_seq_len,
                                           prompt_format=self.fmt.kind))
        self.prompt_loader = make_loader(data["train"], PromptCollator(self.tokenizer.pad_token_id),
                                         args.per_device_generation_batch_size, True, args.seed,
                                         group_by_length=args.group_by_length)
        self.unsup_loader = None
        if args.unsupervised_dataset_name:
            self.unsup_loader = unsupervised_loader(args.unsupervised_dataset_name,
                                                    args.unsupervised_dataset_config_name, self.tokenizer,
                                                    args.max_prompt_seq_len + args.max_answer_seq_len,
                                                    args.per_device_training_batch_size, args.seed)
        self.ptx_drawn = 0  # PTX batches used so far (restored on resume, so no text is used twice)
        self._ptx: Iterator | None = None
        self.batches_per_epoch = len(self.prompt_loader)
        if args.resume:  # a corrupt checkpoint or one of another run is refused before any model is built
            check_resume(args.output_dir, self.resume_key())
        rows_per_rollout = args.per_device_generation_batch_size * args.generation_batches * args.n_samples_per_prompt
        cycles = args.num_train_epochs * (self.batches_per_epoch // args.generation_batches)  # a short buffer is dropped
        # The schedule's length: the optimizer steps the run will really take (see count_optimizer_steps).
        per_epoch = count_optimizer_steps(len(self.prompt_loader.sampler), args.per_device_generation_batch_size,
                                          args.generation_batches, args.n_samples_per_prompt,
                                          args.per_device_training_batch_size, args.ppo_epochs, 1, 1)  # micro-batches
        note = check_accumulation(per_epoch, args.num_train_epochs, args.gradient_accumulation_steps)
        if note:
            dist.print_rank0(note)
        total = max(1, per_epoch * args.num_train_epochs // args.gradient_accumulation_steps)
        estimator = get_estimator(args.advantage_estimator)
        reward_specs = [resolve_spec(v) for v in args.reward_fn]  # user functions load (and fail) before the models
        self.engine = RLHFEngine(args, self.tokenizer, self.dtype, total, with_critic=estimator.needs_critic,
                                 with_reward_model=any(s.needs_model for s in reward_specs))
        self.rewards = self.engine.reward_set()
        self.gold = self.engine.gold_scorer()
        # Step 3's log-probs come from fp32 logits whatever --compute_fp32_loss says (answer_logprobs).
        settings = PPOSettings.from_args(args, reuse_critic_forward=self._can_reuse_critic_forward(rows_per_rollout))
        generator = Generator(self.engine.actor, self.fmt, args.enable_hybrid_engine, args.actor_zero_stage,
                              args.release_inference_cache)
        self.trainer = PPOTrainer(self.engine, settings, generator, self.rewards)
        self.sampler = DynamicSampler(args.per_device_generation_batch_size * args.generation_batches,
                                      args.max_gen_batches, self.tokenizer.pad_token_id) \
            if args.dynamic_sampling else None
        self.builtin = self.data_settings.uses_builtin
        if self.builtin:
            self.eval_rows = [{"prompt": p, "fields": {}} for p in heldout_prompts(n=args.num_judge_prompts)]
        else:
            held = data["eval"].select(range(min(args.num_judge_prompts, len(data["eval"]))))
            self.eval_rows = [{"prompt": r["prompt"], "fields": json.loads(r.get("fields") or "{}")} for r in held]
        self.prompts = [r["prompt"] for r in self.eval_rows]
        steps = min(cycles, args.test_stop_step) if args.enable_test_mode else cycles  # where the run will stop
        self.logger = self.make_logger(steps, "step3 PPO", "step3_tensorboard")
        self.guard = NanGuard(args.max_bad_steps)
        self.step = 0
        self.updates = 0  # actor updates applied (a run that applies none saves nothing)
        self.rollouts = 0  # answers this rank generated for training (dynamic sampling's dropped ones included)
        self.last_entropy: float | None = None  # the last step's mean token entropy over all ranks
        self.best: dict[str, Any] | None = None  # --save_best_by: the best evaluation of a trained state so far

    def resume_key(self) -> dict[str, Any]:
        """What a resumed run must share with its checkpoint: the data position's settings, the data, LoRA and the
        advantage estimator (another one trains another set of models: gae's critic, rloo's none)."""
        a = self.args
        return resume_key(self.prompt_loader, per_device_generation_batch_size=a.per_device_generation_batch_size,
                          generation_batches=a.generation_batches, seed=a.seed, **data_key(self.data_settings),
                          **lora_key(a, "actor_"), **lora_key(a, "critic_"),
                          only_optimize_lora=bool(a.only_optimize_lora), advantage_estimator=a.advantage_estimator)

    def _can_reuse_critic_forward(self, rows_per_rollout: int) -> bool:
        """Whether the critic's experience forward can serve as its update forward: each rollout batch is
        updated once and whole, and train mode equals eval mode (no dropout)."""
        a = self.args
        critic = self.engine.critic
        return (critic is not None and not a.recompute_critic_values and a.ppo_epochs == 1
                and a.generation_batches == 1 and a.per_device_training_batch_size >= rows_per_rollout
                and not has_dropout(critic))

    def _eval_keys(self) -> list[str]:
        """The sums every rank reduces at an evaluation, in one fixed order."""
        n = self.args.eval_n_samples
        keys = ["rows", "kl", "answer_len", "reward_score", "judge", "gold_score"]
        for name in self.rewards.names:
            keys += [f"reward/{name}", f"count/{name}", f"nonbinary/{name}", f"prompts/{name}"]
            keys += [f"pass@{k}/{name}" for k in pass_ks(n)]
        return keys

    @torch.no_grad()
    def evaluate(self, when: str) -> dict[str, Any]:
        """Answers to held-out prompts (greedy, or --eval_n_samples sampled ones each): every reward's mean, pass@k
        of 0/1 rewards, KL to the reference, gold score, judge (builtin)."""
        a, e = self.args, self.engine
        n = a.eval_n_samples
        model, synced = self.trainer.generator.model_for_eval()
        mine, n_real = dist.shard(self.eval_rows)
        keys = self._eval_keys()
        sums = dict.fromkeys(keys, 0.0)
        examples = []
        sampling = {"do_sample": False} if n == 1 else {k: v for k, v in self.trainer.sampling.items()
                                                        if k != "max_new_tokens"}
        step = a.per_device_generation_batch_size
        for start in range(0, min(len(mine), step * a.eval_iters), step):
            rows = mine[start:start + step]
            texts = [r["prompt"] for r in rows for _ in range(n)]
            prompt, prompt_mask = encode_prompts(self.fmt, texts, self.dev)
            r = generate_rollout(model, self.fmt, prompt, prompt_mask, synced, max_new_tokens=a.max_answer_seq_len,
                                 **sampling)
            e.actor.eval()
            kl = exact_kl(answer_logits(e.actor, r.seq, r.attention_mask, r.prompt_len, a.padding_free),
                          answer_logits(e.ref, r.seq, r.attention_mask, r.prompt_len, a.padding_free)) * r.action_mask
            e.actor.train()
            result = self.trainer.score(r, texts, [r_["fields"] for r_ in rows for _ in range(n)])
            answers = decode_answers(self.fmt, r)
            gold = self.gold.scores(r.seq, r.attention_mask).tolist() if self.gold is not None else [0.0] * len(texts)
            kl_rows = kl.sum(1).double().cpu().tolist()
            len_rows = r.action_mask.sum(1).double().cpu().tolist()
            for i, row in enumerate(rows):
                if start + i >= n_real:  # padding rows of an uneven shard
                    continue
                span = range(i * n, (i + 1) * n)
                sums["rows"] += n
                sums["kl"] += sum(kl_rows[j] for j in span)
                sums["answer_len"] += sum(len_rows[j] for j in span)
                sums["reward_score"] += sum(result.total[j].item() for j in span)
                sums["gold_score"] += sum(gold[j] for j in span)
                if self.builtin:
                    sums["judge"] += sum(judge(texts[j], answers[j]) for j in span)
                for name in self.rewards.names:
                    values = [result.values[name][j] for j in span]
                    seen = [v for v in values if v is not None]
                    sums[f"reward/{name}"] += sum(seen)
                    sums[f"count/{name}"] += len(seen)
                    sums[f"nonbinary/{name}"] += sum(v not in (0.0, 1.0) for v in seen)
                    if seen:
                        sums[f"prompts/{name}"] += 1
                        correct = sum(v == 1.0 for v in seen)
                        for k in pass_ks(n):
                            if k <= len(seen):
                                sums[f"pass@{k}/{name}"] += pass_at_k(len(seen), correct, k)
                if len(examples) < 2:
                    examples.append((row["prompt"], answers[i * n]))
        total = dict(zip(keys, dist.all_reduce_sum(torch.tensor([sums[k] for k in keys],
                                                                dtype=torch.float64)).tolist()))
        rows_seen = max(total["rows"], 1.0)
        metrics: dict[str, Any] = {"reward_score": total["reward_score"] / rows_seen,
                                   "kl": total["kl"] / rows_seen, "answer_len": total["answer_len"] / rows_seen}
        for name in self.rewards.names:
            if total[f"count/{name}"]:
                metrics[f"reward/{name}"] = total[f"reward/{name}"] / total[f"count/{name}"]
            if total[f"prompts/{name}"] and self.rewards.binary(name, total[f"nonbinary/{name}"]):
                for k in pass_ks(n):
                    metrics[f"pass@{k}/{name}"] = total[f"pass@{k}/{name}"] / total[f"prompts/{name}"]
        if self.gold is not None:
            metrics["gold_score"] = total["gold_score"] / rows_seen
        if self.builtin:
            metrics["judge"] = total["judge"] / rows_seen
        metrics["answers"] = [list(x) for x in examples[:3]]  # rank 0's first prompts, the same at every eval
        for prompt, answer in examples[:2]:
            self.logger.write(f"  {prompt!r} -> {answer!r}")
        self.record(metrics, when)
        if self.step > 0:
            self._keep_if_best(metrics)
        return metrics

    def global_step(self) -> int:
        """PPO steps (rollouts trained on) so far."""
        return self.step

    def _keep_if_best(self, metrics: dict[str, Any]) -> None:
        """--save_best_by: save the actor of a trained state whose held-out metric beats every earlier one."""
        a = self.args
        if not a.save_best_by or not a.output_dir:
            return
        if a.save_best_by not in metrics:
            raise FlagError(f"--save_best_by {a.save_best_by}: the evaluation reports no such metric (it reports "
                            f"{', '.join(k for k, v in metrics.items() if isinstance(v, float))})")
        value = metrics[a.save_best_by]
        if self.best is not None and value <= self.best["value"]:
            return
        self.best = {"metric": a.save_best_by, "value": value, "when": metrics["when"], "step": self.step,
                     "eval_index": len(self.history) - 1}
        save_hf_model(self.engine.actor, self.tokenizer, f"{a.output_dir}/{BEST_DIR}")
        self.logger.write(f"--save_best_by {a.save_best_by}: {value:.4f} at {metrics['when']} is the best so far; "
                          f"actor kept in {a.output_dir}/{BEST_DIR}")

    def _next_ptx(self) -> dict[str, torch.Tensor]:
        """The next PTX batch; the text loader starts a new (reshuffled) pass when one ends."""
        while True:
            if self._ptx is None:
                self.unsup_loader.sampler.set_epoch(self.ptx_drawn)
                self._ptx = iter(self.unsup_loader)
            try:
                batch = next(self._ptx)
                self.ptx_drawn += 1
                return to_device(batch, self.dev)
            except StopIteration:
                self._ptx = None

    def train(self) -> None:
        """Epochs of: generate --generation_batches rollouts (with --dynamic_sampling: batches until every rank holds
        a full batch of groups whose rewards differ, at most --max_gen_batches), then --ppo_epochs of PPO updates."""
        a = self.args
        key = self.resume_key()
        state = {"epoch": 0, "batch": 0}
        if a.resume:
            state = resume(a.output_dir, self.engine.trained_engines(), key, self.history,
                           self.engine.checkpoint_extras())
            self.best = state.get("best", self.best)
            if "kl_ctl" in state:
                self.trainer.kl_ctl.load_state_dict(state["kl_ctl"])
                self.trainer.entropy_coef = state.get("entropy_coef", self.trainer.entropy_coef)
                self.rollouts = state.get("rollouts", 0)
                self.step = state["step"]
                self.updates = state.get("updates", self.step)
            for _ in range(state.get("ptx_drawn", 0)):  # the same PTX text order as an uninterrupted run
                self._next_ptx()
        stop = False
        for epoch in range(state["epoch"], a.num_train_epochs):
            buffer: list[dict[str, Any]] = []
            if self.sampler is not None:
                self.sampler.reset()  # a part-filled batch at an epoch's end is dropped, as a short buffer is
            for i, batch in untrained_batches(self.prompt_loader, epoch, state):
                batch = to_device(batch, self.dev)
                exp = self.trainer.generate_experience(batch["prompt"], batch["prompt_att_mask"],
                                                       batch["prompt_text"], batch["fields"])
                self.rollouts += exp["seq"].shape[0]
                if self.sampler is not None:
                    self.sampler.add(exp)
                    if not self.sampler.ready():
                        continue
                    merged, sampling = self.sampler.take()
                    if merged is None:
                        self.logger.write(f"--dynamic_sampling: no group with differing rewards on some rank after "
                                          f"{sampling['ds_gen_batches']:.0f} generation batches; no update")
                        continue
                    self._update([merged], sampling)
                    buffer = [merged]
                else:
                    buffer.append(exp)
                    if len(buffer) < a.generation_batches:
                        continue
                    self._update(buffer)
                if a.print_answers and self.step % a.print_answers_interval == 0:
                    exp = buffer[-1]
                    self.logger.write(f"  sample: {self.tokenizer.decode(exp['seq'][0], skip_special_tokens=True)!r}")
                buffer = []
                if a.eval_interval and self.step % a.eval_interval == 0:  # before the checkpoint, which keeps it
                    self.evaluate(f"step {self.step}")
                if a.save_interval and a.output_dir and self.step % a.save_interval == 0:
                    save_checkpoint(a.output_dir, self.engine.trained_engines(),
                                    {"epoch": epoch, "batch": i + 1, "step": self.step, "updates": self.updates,
                                     "kl_ctl": self.trainer.kl_ctl.state_dict(), "entropy_coef": self.trainer.entropy_coef,
                                     "rollouts": self.rollouts, "ptx_drawn": self.ptx_drawn, "best": self.best},
                                    key, self.history, self.engine.checkpoint_extras())
                if a.enable_test_mode and self.step >= a.test_stop_step:
                    stop = True
                    break
            if self.history[-1]["when"] != f"step {self.step}":  # not evaluated at this step already
                self.evaluate(f"epoch {epoch + 1}")
            if stop:
                break
        self.logger.close()

    def _update(self, buffer: list[dict[str, Any]], sampling: dict[str, float] | None = None) -> None:
        """PPO epochs over the buffered experience, in micro-batches of --per_device_training_batch_size
        (`sampling`: what --dynamic_sampling dropped and generated, logged with the step)."""
        a = self.args
        rollout = self.trainer.add_advantages(buffer)
        start = time.time()
        micro = split_micro_batches(buffer, a.per_device_training_batch_size)
        stats: list[dict[str, float]] = []
        first_steps = self.engine.actor.global_steps
        on_policy: list[float] = []  # ratios of micro-batches updated before this rollout's first optimizer step
        on_policy_max: list[float] = []
        for epoch in range(a.ppo_epochs):
            for mb in micro:
                fresh = epoch == 0 and self.engine.actor.global_steps == first_steps
                s = self.trainer.train_rlhf(mb, self.guard)
                if s is None:
                    self.logger.write(f"non-finite PPO loss: update skipped ({self.guard.total} in all)")
                    continue
                ratio, ratio_max = s.pop("ratio_mean"), s.pop("ratio_max")
                if fresh:  # the actor is still the sampling policy: new / old must be 1 up to rounding
                    on_policy.append(ratio)
                    on_policy_max.append(ratio_max)
                self.updates += 1
                if self.unsup_loader is not None:  # each PPO micro-batch gets its own PTX micro-batch
                    unsup = self.trainer.train_unsupervised(self._next_ptx(), self.guard)
                    if unsup is not None:
                        s["unsup_loss"] = unsup
                self.engine.update_ema()  # once per optimizer step of the actor (a no-op in between)
                stats.append(s)
        train_time = time.time() - start
        self.step += 1
        gen_time = sum(b["gen_time"] for b in buffer)  # sampling only
        experience_time = sum(b["experience_time"] for b in buffer)  # sampling + the models' forwards
        answer_tokens = sum(b["action_mask"].sum().item() for b in buffer)
        trained_tokens = sum(b["attention_mask"].sum().item() for b in micro) * a.ppo_epochs
        logged = {k: sum(s[k] for s in stats if k in s) / max(len(stats), 1) for k in (stats[0] if stats else {})}
        if on_policy:  # off 1 means old and new log-probs are not one function (sampling settings, dtype, dropout)
            logged["ratio_mean"] = sum(on_policy) / len(on_policy)
            logged["ratio_max"] = max(on_policy_max)
        if "entropy" in logged:  # the mean over ranks: the adaptive coefficient must be the same on every rank
            total, n = dist.all_reduce_sum(torch.tensor([logged["entropy"], 1.0], dtype=torch.float64)).tolist()
            logged["entropy"] = self.last_entropy = total / n
            if a.entropy_target is not None:
                logged["entropy_coef"] = self.trainer.adapt_entropy_coef(logged["entropy"])
        logged |= sampling or {}
        logged |= rollout | {
            "answer_len": answer_tokens / sum(b["scores"].numel() for b in buffer),
            "gen_time_s": gen_time, "experience_time_s": experience_time, "train_time_s": train_time,
            "gen_tokens_per_s": answer_tokens / max(gen_time, 1e-9),
            "train_tokens_per_s": trained_tokens / max(train_time, 1e-9)}
        self.logger.step(self.step, {f"train/{k}": v for k, v in logged.items()},
                         ("train/reward_score", "train/kl", "train/answer_len", "train/gen_time_s",
                          "train/train_time_s"))

    def save(self) -> None:
        """critic, actor_ema and (last, with the metrics) actor as plain HF directories, LoRA merged."""
        a = self.args
        self.require_trained(self.updates > 0 or self.step > 0, f"{self.guard.total} skipped as non-finite")
        if not a.output_dir:
            return
        metrics = self.run_metrics(
            3, skipped_updates=self.guard.total, advantage_estimator=a.advantage_estimator, policy_loss=a.policy_loss,
            loss_agg_mode=a.loss_agg_mode, final_entropy=self.last_entropy,
            rollouts=self.rollouts * dist.world_size(),  # every rank generates as many
            critic=self.engine.critic is not None, ppo_steps=self.step, ppo_updates=self.updates,
            actor_optimizer_steps=self.engine.actor.global_steps, ptx_batches=self.ptx_drawn)
        if self.engine.ema is not None:
            metrics["ema_updates"] = self.engine.ema.updates
        if self.builtin:
            metrics["chosen_judge"] = heldout_chosen_judge(len(self.prompts))
        best_earlier = self.best is not None and self.best["eval_index"] != len(self.history) - 1
        if self.best is not None:
            metrics["saved"] = self.best | {"final_state": not best_earlier}
        # The actor's completion marker is written last: it is the one e2e takes as "step 3 done".
        out = a.output_dir
        if self.engine.critic is not None:
            save_hf_model(self.engine.critic, self.tokenizer, f"{out}/critic",
                          {"README.md": self.card(None, f"{out}/critic", "the critic (value model)", seq_cls=True)})
        if self.engine.ema is not None:  # the actor with its trainable weights swapped for the EMA's, saved
            with self.engine.ema.swapped_in():
                save_hf_model(self.engine.actor, self.tokenizer, f"{out}/actor_ema",
                              {"README.md": self.card(metrics, f"{out}/actor_ema", "EMA of the actor's weights")})
        card = {"README.md": self.card(metrics, f"{out}/actor")}
        if best_earlier:  # --save_best_by: the best evaluated state, not the last one
            promote_dir(f"{a.output_dir}/{BEST_DIR}", f"{a.output_dir}/actor", {"dschat_metrics.json": metrics} | card,
                        gguf_type=getattr(a, "export_gguf", None))
            dist.print_rank0(f"--save_best_by {a.save_best_by}: saved the actor of {self.best['when']} "
                             f"({self.best['value']:.4f}), not the last state ({self.history[-1][a.save_best_by]:.4f})")
        else:
            save_hf_model(self.engine.actor, self.tokenizer, f"{a.output_dir}/actor", {"dschat_metrics.json": metrics} | card,
                          gguf_type=getattr(a, "export_gguf", None))
        if dist.is_rank0():
            shutil.rmtree(f"{a.output_dir}/{BEST_DIR}", ignore_errors=True)

    def summary(self) -> str:
        """SFT vs RLHF on held-out prompts, next to the chosen demonstrations' judge score."""
        first, last = self.history[0], self.history[-1]
        lines = [f"step 3 done in {time.time() - self.start:.0f}s ({self.step} PPO steps, "
                 f"{self.args.advantage_estimator})",
                 f"{'held-out prompts':<22}{'SFT (start)':>14}{'RLHF (end)':>14}",
                 f"{'reward score':<22}{first['reward_score']:>14.3f}{last['reward_score']:>14.3f}",
                 f"{'KL to reference':<22}{first['kl']:>14.3f}{last['kl']:>14.3f}"]
        if "gold_score" in last:
            lines.append(f"{'gold reward score':<22}{first['gold_score']:>14.3f}{last['gold_score']:>14.3f}")
        for key in [k for k in last if k.startswith(("reward/", "pass@")) and k in first]:
            lines.append(f"{key:<22}{first.get(key, float('nan')):>14.3f}{last[key]:>14.3f}")
        if self.builtin:
            lines.append(f"{'judge score':<22}{first['judge']:>14.3f}{last['judge']:>14.3f}")
            lines.append(f"judge score of the chosen demonstrations for these prompts: "
                         f"{heldout_chosen_judge(len(self.prompts)):.3f}")
        for (prompt, before), (_, after) in zip(first.get("answers", []), last.get("answers", [])):
            lines += [f"prompt: {prompt!r}", f"  SFT:  {before!r}", f"  RLHF: {after!r}"]
        return "\n".join(lines)


def promote_dir(src: str, out_dir: str, extra_json: dict[str, Any], gguf_type: str | None = None) -> None:
    """Make a saved model folder `src` the (atomically replaced) `out_dir`, with `extra_json` files and its
    completion marker written last, then its GGUF with `gguf_type` (rank 0 writes; every rank waits)."""
    if dist.is_rank0():
        with atomic_dir(out_dir) as tmp:
            for f in Path(src).iterdir():
                if f.name != DONE_MARKER and f.is_file():
                    shutil.copy2(f, tmp / f.name)
            for name, content in extra_json.items():  # text as it is (README.md), anything else as JSON
                (tmp / name).write_text(content if isinstance(content, str) else json.dumps(content, indent=1))
            (tmp / DONE_MARKER).write_text(json.dumps({"complete": True}))
        if gguf_type:
            export_gguf(out_dir, gguf_type)
    dist.barrier()


def count_optimizer_steps(prompt_rows: int, generation_batch: int, generation_batches: int, n_samples_per_prompt: int,
                          training_batch: int, ppo_epochs: int, num_train_epochs: int,
                          gradient_accumulation_steps: int) -> int:
    """Optimizer steps of the actor (and critic) in a whole run: what the learning-rate schedule must span.

    Each epoch the prompt loader gives this rank `prompt_rows` prompts in batches of `generation_batch` (the last
    one shorter); every `generation_batches` batches make a rollout (a short buffer at the epoch's end is dropped),
    each batch of rows x n_samples_per_prompt answers is cut into ceil(rows / training_batch) micro-batches
    (split_micro_batches) and updated on `ppo_epochs` times; every `gradient_accumulation_steps` micro-batches make
    an optimizer step, carried over between rollouts. PTX adds a backward per PPO micro-batch and doubles the
    actor's accumulation, so its optimizer steps are the same.
    """
    sizes = [generation_batch] * (prompt_rows // generation_batch)
    if prompt_rows % generation_batch:
        sizes.append(prompt_rows % generation_batch)
    used = len(sizes) - len(sizes) % generation_batches  # batches that complete a rollout
    micro = sum(math.ceil(rows * n_samples_per_prompt / training_batch) for rows in sizes[:used])
    return micro * ppo_epochs * num_train_epochs // gradient_accumulation_steps


def split_micro_batches(buffer: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """Re-cut buffered experience batches into micro-batches of `size` rows (tensors only split on dim 0)."""
    out = []
    for exp in buffer:
        n = exp["seq"].shape[0]
        for s in range(0, n, size):
            out.append({k: v[s:s + size] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
                        for k, v in exp.items()})
    return out


class DynamicSampler:
    """--dynamic_sampling (DAPO): keeps the groups whose rewards differ from each generation batch until every rank
    holds `target` groups or --max_gen_batches batches were generated this step, then gives each rank the same
    number of groups (the fewest any rank holds, at most `target`), merged into one experience batch.

    ready() is a collective every rank calls after each batch, so all ranks generate, and train, in lockstep.
    """

    def __init__(self, target: int, max_batches: int, pad_token_id: int):
        self.target, self.max_batches, self.pad_token_id = target, max_batches, pad_token_id
        self.reset()

    def reset(self) -> None:
        """Forget what was kept (a new step, or a new epoch)."""
        self.kept: list[dict[str, Any]] = []
        self.groups = self.batches = self.dropped = self.rollouts = 0
        self.times = [0.0, 0.0]
        self.totals: list[float] = []

    def add(self, exp: dict[str, Any]) -> None:
        """Keep the groups of one generation batch whose rewards differ."""
        keep = groups_with_variance(exp["scores"], exp["group"].to(exp["scores"].device)).to(exp["group"].device)
        groups = int(torch.unique(exp["group"]).numel())
        kept = int(torch.unique(exp["group"][keep]).numel())
        self.batches += 1
        self.rollouts += int(exp["group"].numel())
        self.dropped += groups - kept
        self.times[0] += exp["experience_time"]
        self.times[1] += exp["gen_time"]
        if kept:
            self.kept.append(select_rows(exp, keep))
            self.groups += kept

    def ready(self) -> bool:
        """Whether the step's batch is complete on every rank, or the generation budget is spent (a collective)."""
        counts = torch.zeros(dist.world_size() + 2, dtype=torch.float64)
        counts[dist.rank()] = self.groups
        counts[-2:] = torch.tensor([self.dropped, self.rollouts], dtype=torch.float64)
        self.totals = dist.all_reduce_sum(counts).tolist()
        return min(self.totals[:-2]) >= self.target or self.batches >= self.max_batches

    def take(self) -> tuple[dict[str, Any] | None, dict[str, float]]:
        """The step's experience (None when some rank kept no group) and what it cost; resets the sampler."""
        take = int(min(min(self.totals[:-2]), self.target))
        logged = {"ds_dropped_groups": self.totals[-2], "ds_rollouts": self.totals[-1],
                  "ds_gen_batches": float(self.batches), "ds_kept_groups": float(take * dist.world_size())}
        picked, left = [], take
        for exp in self.kept:
            if left == 0:
                break
            ids = torch.unique_consecutive(exp["group"])[:left]
            picked.append(select_rows(exp, torch.isin(exp["group"], ids)))
            left -= int(ids.numel())
        merged = None
        if picked:
            merged = merge_experiences(picked, self.pad_token_id)
            merged["experience_time"], merged["gen_time"] = self.times
        self.reset()
        return merged, logged
