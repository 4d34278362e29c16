"""Step 3 as named stages: data, engines, the rollout/update loop, evaluation and saving."""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from dschat.rlhf import ppo_math
from dschat.rlhf.ppo_trainer import PPOTrainer, answer_logits
from dschat.rlhf.rlhf_engine import RLHFEngine, check_same_tokenizer
from dschat.utils import checkpoint, dist
from dschat.utils.data.builtin_task import heldout_chosen_judge, heldout_prompts, judge
from dschat.utils.data.collators import PromptCollator, pad_sequences
from dschat.utils.data.data_utils import load_phase_data, prompt_ids
from dschat.utils.data.unsupervised import unsupervised_loader
from dschat.utils.loop import NanGuard
from dschat.utils.model.model_utils import load_tokenizer
from dschat.utils.model.reward_model import end_scores, token_values
from dschat.utils.model.save import save_hf_model
from dschat.utils.sft import data_settings, uses_builtin_data
from dschat.utils.training import Logger, device, make_loader, setup, to_device


class RLHFRun:
    """One PPO run: prompts, engines, trainer, evaluation history."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.start = args, time.time()
        self.dtype = setup(args)
        self.dev = device()
        self.tokenizer = load_tokenizer(args.actor_model_name_or_path, args.trust_remote_code, padding_side="left")
        check_same_tokenizer(self.tokenizer, args.actor_model_name_or_path, args.critic_model_name_or_path,
                             args.trust_remote_code)
        data = load_phase_data(data_settings(args, 3), self.tokenizer, args.data_output_path)
        self.prompt_loader = make_loader(data["train"], PromptCollator(self.tokenizer.pad_token_id),
                                         args.per_device_generation_batch_size, True, args.seed)
        self.unsup_loader = unsupervised_loader(args, self.tokenizer) if args.unsupervised_dataset_name else None
        n_batches = len(self.prompt_loader)
        if self.unsup_loader is not None:
            n_batches = min(n_batches, len(self.unsup_loader))
        self.batches_per_epoch = n_batches
        micro_per_rollout = args.per_device_generation_batch_size * args.generation_batches // \
            args.per_device_training_batch_size
        cycles = args.num_train_epochs * n_batches // args.generation_batches
        total = max(1, cycles * micro_per_rollout * args.ppo_epochs // args.gradient_accumulation_steps)
        self.engine = RLHFEngine(args, self.tokenizer, self.dtype, total)
        self.trainer = PPOTrainer(self.engine, args)
        self.prompts = heldout_prompts(n=args.num_judge_prompts) if uses_builtin_data(args) else \
            [self.tokenizer.decode(r["prompt_ids"], skip_special_tokens=True)
             for r in data["eval"].select(range(min(args.num_judge_prompts, len(data["eval"]))))]
        self.builtin = uses_builtin_data(args)
        tb = f"{args.tensorboard_path}/step3_tensorboard" if args.enable_tensorboard else None
        self.logger = Logger(cycles, "step3 PPO", tb)
        self.history: list[dict[str, Any]] = []
        self.guard = NanGuard(args.max_bad_steps)
        self.step = 0

    @torch.no_grad()
    def evaluate(self, when: str) -> dict[str, Any]:
        """Greedy answers to held-out prompts: reward score, KL to the reference, and the judge (builtin)."""
        a, e = self.args, self.engine
        model, synced = self.trainer.generator.model_for_eval()
        mine, n_real = dist.shard(self.prompts)
        sums = torch.zeros(4, dtype=torch.float64)
        examples = []
        for start in range(0, len(mine), a.per_device_generation_batch_size):
            batch = mine[start:start + a.per_device_generation_batch_size]
            ids = [prompt_ids(self.tokenizer, p) for p in batch]
            prompt = pad_sequences(ids, self.tokenizer.pad_token_id, left=True).to(self.dev)
            prompt_mask = pad_sequences([[1] * len(i) for i in ids], 0, left=True).to(self.dev)
            seq = model.generate(prompt, attention_mask=prompt_mask, do_sample=False, synced_gpus=synced,
                                 max_new_tokens=a.max_answer_seq_len, pad_token_id=self.tokenizer.pad_token_id,
                                 eos_token_id=self.tokenizer.eos_token_id)
            p = prompt.shape[1]
            mask = ppo_math.action_mask_from_tokens(seq[:, p:], self.tokenizer.eos_token_id,
                                                    self.tokenizer.pad_token_id)
            seq = torch.cat([prompt, torch.where(mask.bool(), seq[:, p:], self.tokenizer.pad_token_id)], 1)
            attn = torch.cat([prompt_mask, mask.long()], 1)
            e.actor.eval()
            kl = ppo_math.exact_kl(answer_logits(e.actor, seq, attn, p), answer_logits(e.ref, seq, attn, p)) * mask
            e.actor.train()
            scores = end_scores(token_values(e.reward, seq, attn), attn).float()
            answers = self.tokenizer.batch_decode(seq[:, p:], skip_special_tokens=True)
            valid = torch.tensor([start + i < n_real for i in range(len(batch))], dtype=torch.float64)
            judged = torch.tensor([judge(q, ans) if self.builtin else 0.0 for q, ans in zip(batch, answers)],
                                  dtype=torch.float64)
            sums += torch.stack([(scores.double().cpu() * valid).sum(), (kl.sum(1).double().cpu() * valid).sum(),
                                 (judged * valid).sum(), valid.sum()])
            examples += list(zip(batch, answers))[:2]
        s = dist.all_reduce_sum(sums.to(self.dev)).cpu()
        metrics = {"when": when, "reward_score": (s[0] / s[3]).item(), "kl": (s[1] / s[3]).item()}
        if self.builtin:
            metrics["judge"] = (s[2] / s[3]).item()
        self.history.append(metrics)
        self.logger.scalars(self.step, {f"eval/{k}": v for k, v in metrics.items() if k != "when"})
        for prompt, answer in examples[:2]:
            self.logger.write(f"  {prompt!r} -> {answer!r}")
        self.logger.write(f"[eval {when}] " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "when"))
        return metrics

    def _engines(self) -> dict[str, Any]:
        engines = {"actor": self.engine.actor, "critic": self.engine.critic}
        return engines | ({"ema": self.engine.ema} if self.engine.ema is not None else {})

    def train(self) -> None:
        """Epochs of: generate --generation_batches rollouts, then --ppo_epochs of PPO updates over them."""
        a = self.args
        # Settings that fix the data position; a resumed run must use the same ones.
        key = {"world_size": dist.world_size(), "per_device_generation_batch_size": a.per_device_generation_batch_size,
               "generation_batches": a.generation_batches, "seed": a.seed, "batches_per_epoch": self.batches_per_epoch}
        state = {"epoch": 0, "batch": 0}
        if a.resume:
            state = checkpoint.resume_state(a, self._engines())
            checkpoint.check_compatible(state, key, a.output_dir)
            # The first run's evaluations (its "start (SFT)" one included) replace the resumed model's.
            self.history[:] = state.get("history", self.history)
            if "kl_ctl" in state:
                self.trainer.kl_ctl.load_state_dict(state["kl_ctl"])
                self.step = state["step"]
        for epoch in range(state["epoch"], a.num_train_epochs):
            self.prompt_loader.sampler.set_epoch(epoch)
            unsup = iter(self.unsup_loader) if self.unsup_loader is not None else None
            buffer: list[dict[str, Any]] = []
            for i, batch in enumerate(self.prompt_loader):
                if i >= self.batches_per_epoch:
                    break
                unsup_batch = next(unsup) if unsup is not None else None
                if epoch == state["epoch"] and i < state["batch"]:
                    continue
                batch = to_device(batch, self.dev)
                buffer.append(self.trainer.generate_experience(batch["prompt"], batch["prompt_att_mask"]))
                if len(buffer) < a.generation_batches:
                    continue
                self._update(buffer, unsup_batch)
                if a.print_answers and self.step % a.print_answers_interval == 0:
                    exp = buffer[-1]
                    self.logger.write(f"  sample: {self.tokenizer.decode(exp['seq'][0], skip_special_tokens=True)!r}")
                buffer = []
                if a.save_interval and a.output_dir and self.step % a.save_interval == 0:
                    checkpoint.save(a.output_dir, self._engines(),
                                    {"epoch": epoch, "batch": i + 1, "step": self.step,
                                     "kl_ctl": self.trainer.kl_ctl.state_dict(), "resume_key": key,
                                     "history": self.history})
                if a.enable_test_mode and self.step >= a.test_stop_step:
                    break
            self.evaluate(f"epoch {epoch + 1}")
        self.logger.close()

    def _update(self, buffer: list[dict[str, Any]], unsup_batch: dict | None) -> None:
        """PPO epochs over the buffered experience, in micro-batches of --per_device_training_batch_size."""
        a = self.args
        rollout = self.trainer.add_advantages(buffer)
        start = time.time()
        micro = split_micro_batches(buffer, a.per_device_training_batch_size)
        stats: list[dict[str, float]] = []
        for _ in range(a.ppo_epochs):
            for mb in micro:
                s = self.trainer.train_rlhf(mb)
                if not self.guard.ok(torch.tensor([s["actor_loss"], s["critic_loss"]])):
                    self.logger.write("non-finite PPO loss: update skipped")
                    continue
                if unsup_batch is not None:
                    s["unsup_loss"] = self.trainer.train_unsupervised(to_device(unsup_batch, self.dev))
                self.engine.update_ema()
                stats.append(s)
        train_time = time.time() - start
        self.step += 1
        gen_time = sum(b["gen_time"] for b in buffer)  # sampling only
        experience_time = sum(b["experience_time"] for b in buffer)  # sampling + the four models' forwards
        answer_tokens = sum(b["action_mask"].sum().item() for b in buffer)
        trained_tokens = sum(b["attention_mask"].sum().item() for b in micro) * a.ppo_epochs
        logged = {k: sum(s[k] for s in stats) / max(len(stats), 1) for k in (stats[0] if stats else {})}
        logged |= rollout | {
            "answer_len": answer_tokens / sum(b["scores"].numel() for b in buffer),
            "gen_time_s": gen_time, "experience_time_s": experience_time, "train_time_s": train_time,
            "gen_tokens_per_s": answer_tokens / max(gen_time, 1e-9),
            "train_tokens_per_s": trained_tokens / max(train_time, 1e-9)}
        self.logger.step(self.step, {f"train/{k}": v for k, v in logged.items()},
                         ("train/reward_score", "train/kl", "train/answer_len", "train/gen_time_s",
                          "train/train_time_s"))

    def save(self) -> None:
        """actor (and critic, actor_ema) as plain HF directories under --output_dir, LoRA merged."""
        a = self.args
        if not a.output_dir:
            return
        metrics = {"step": 3, "evals": self.history, "wall_time_s": time.time() - self.start,
                   "skipped_updates": self.guard.total}
        if self.builtin:
            metrics["chosen_judge"] = heldout_chosen_judge(len(self.prompts))
        save_hf_model(self.engine.actor, self.tokenizer, f"{a.output_dir}/actor", {"dschat_metrics.json": metrics})
        save_hf_model(self.engine.critic, self.tokenizer, f"{a.output_dir}/critic")
        if self.engine.ema is not None:
            save_hf_model(self.engine.ema, self.tokenizer, f"{a.output_dir}/actor_ema")

    def summary(self) -> str:
        """SFT vs RLHF on held-out prompts, next to the chosen demonstrations' judge score."""
        first, last = self.history[0], self.history[-1]
        lines = [f"step 3 done in {time.time() - self.start:.0f}s ({self.step} PPO steps)",
                 f"{'held-out prompts':<22}{'SFT (start)':>14}{'RLHF (end)':>14}",
                 f"{'reward score':<22}{first['reward_score']:>14.3f}{last['reward_score']:>14.3f}",
                 f"{'KL to reference':<22}{first['kl']:>14.3f}{last['kl']:>14.3f}"]
        if self.builtin:
            lines.append(f"{'judge score':<22}{first['judge']:>14.3f}{last['judge']:>14.3f}")
            lines.append(f"judge score of the chosen demonstrations for these prompts: "
                         f"{heldout_chosen_judge(len(self.prompts)):.3f}")
        return "\n".join(lines)


def split_micro_batches(buffer: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """Re-cut buffered experience batches into micro-batches of `size` rows (tensors only split on dim 0)."""
    out = []
    for exp in buffer:
        n = exp["seq"].shape[0]
        for s in range(0, n, size):
            out.append({k: v[s:s + size] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
                        for k, v in exp.items()})
    return out
