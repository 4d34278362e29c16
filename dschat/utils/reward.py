"""Step 2 (reward model fine-tuning) as named stages that training/step2_reward_model_finetuning/main.py calls."""

from __future__ import annotations

import argparse
import math
import time

import torch

from dschat.utils import dist
from dschat.utils.data.collators import RewardCollator
from dschat.utils.data.data_utils import load_phase_data, phase_rows, tokenize_row
from dschat.utils.ds_utils import get_train_ds_config
from dschat.utils.loop import train_epochs
from dschat.utils.model.model_utils import load_tokenizer
from dschat.utils.model.reward_model import (
    create_reward_model,
    divergence_loss,
    end_scores,
    head_name,
    pairwise_accuracy,
    pairwise_loss,
    token_values,
)
from dschat.utils.model.save import save_hf_model
from dschat.utils.sft import data_settings, uses_builtin_data
from dschat.utils.training import (
    Logger,
    apply_lora,
    build_engine,
    device,
    make_loader,
    setup,
    steps_per_epoch,
    to_device,
    torch_dtype,
)

BUILTIN = "dschat/builtin"


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    import pandas as pd

    # Pearson correlation of average ranks (pandas' own method="spearman" needs scipy).
    rx, ry = pd.Series(x, dtype="float64").rank(), pd.Series(y, dtype="float64").rank()
    return float(rx.corr(ry))


def reward_loss(engine, batch: dict, kind: str = "pairwise", margin: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Loss of a [chosen; rejected] batch: "pairwise" on end scores or DeepSpeed-Chat's "divergence"."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    values = token_values(engine, ids, mask)
    chosen, rejected = end_scores(values, mask).chunk(2)
    if kind == "pairwise":
        loss = pairwise_loss(chosen, rejected, margin)
    else:
        c_val, r_val = values.chunk(2)
        c_ids, r_ids = ids.chunk(2)
        c_mask, r_mask = mask.chunk(2)
        loss = divergence_loss(c_val, r_val, c_ids, r_ids, c_mask, r_mask)
    return loss, {"acc": pairwise_accuracy(chosen, rejected).item(),
                  "chosen": chosen.mean().item(), "rejected": rejected.mean().item()}


class RewardRun:
    """Tokenizer, data, reward-model engine and evaluation of one step-2 run."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dtype = setup(args)
        self.dev = device()
        self.start = time.time()
        self.tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
        data = load_phase_data(data_settings(args, 2), self.tokenizer, args.data_output_path)
        self.collator = RewardCollator(self.tokenizer.pad_token_id)
        self.train_loader = make_loader(data["train"], self.collator, args.per_device_train_batch_size, True,
                                        args.seed)
        self.eval_loader = make_loader(data["eval"], self.collator, args.per_device_eval_batch_size, False,
                                       args.seed)
        ds_config = get_train_ds_config(args.offload, self.dtype, args.zero_stage, args.per_device_train_batch_size,
                                        args.gradient_accumulation_steps, dist.world_size(),
                                        args.enable_tensorboard, args.tensorboard_path, "step2_model")
        model = create_reward_model(args.model_name_or_path, self.tokenizer, ds_config, torch_dtype(self.dtype),
                                    args.dropout, args.trust_remote_code, args.gradient_checkpointing)
        if args.lora_dim > 0:  # the head stays fully trainable, also with --only_optimize_lora
            model = apply_lora(model, args.lora_dim, args.lora_module_name, args.only_optimize_lora,
                               keep_trainable=(head_name(model),))
        total = args.num_train_epochs * steps_per_epoch(self.train_loader, args.gradient_accumulation_steps)
        self.engine = build_engine(model, ds_config, args.learning_rate, args.weight_decay,
                                   args.lora_learning_rate, args.lr_scheduler_type, args.num_warmup_steps, total)
        tb = f"{args.tensorboard_path}/step2_tensorboard" if args.enable_tensorboard else None
        self.logger = Logger(total, "step2 reward", tb)
        self.judge_rows = self._judge_rows() if uses_builtin_data(args) else []
        self.history: list[dict] = []
        self.result: dict = {}

    def _judge_rows(self) -> list[dict]:
        """Tokenised held-out builtin rows of this run's phase-2 eval split, with their decoded texts."""
        rows = phase_rows([BUILTIN], self.args.data_split, 2, self.args.seed)["eval"]
        out = []
        for row in rows:
            enc = tokenize_row(row, self.tokenizer, 2, self.args.max_seq_len, 256, False)
            if enc is not None:
                out.append({**enc, "prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]})
        return out

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        """The training loss chosen by --loss/--margin, with batch accuracy and mean scores to log."""
        return reward_loss(engine, batch, self.args.loss, self.args.margin)

    @torch.no_grad()
    def _scores(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """End scores of a [chosen; rejected] batch, as (chosen [B], rejected [B]) in fp32."""
        batch = to_device(batch, self.dev)
        values = token_values(self.engine, batch["input_ids"], batch["attention_mask"])
        return end_scores(values, batch["attention_mask"]).float().chunk(2)

    def _judge_correlation(self) -> float:
        """Spearman correlation of reward and judge over the held-out builtin chosen and rejected answers."""
        world, rank, bs = dist.world_size(), dist.rank(), self.args.per_device_eval_batch_size
        rows = self.judge_rows
        per_rank = math.ceil(len(rows) / world)
        # Equal batch counts on every rank (ZeRO-3 forwards are collective); padding repeats row 0.
        mine = (rows[rank * per_rank: (rank + 1) * per_rank] + rows[:per_rank])[:per_rank]
        n_real = max(0, min(per_rank, len(rows) - rank * per_rank))
        pairs = []
        for s in range(0, per_rank, bs):
            chosen, rejected = self._scores(self.collator(mine[s: s + bs]))
            pairs += list(zip(chosen.tolist(), rejected.tolist()))
        from dschat.utils.data.builtin_task import judge

        scored = [(c, judge(r["prompt"], r["chosen"]), rj, judge(r["prompt"], r["rejected"]))
                  for (c, rj), r in zip(pairs[:n_real], mine[:n_real])]
        everything = [x for part in dist.all_gather_object(scored) for x in part]
        rewards = [s for c, _, r, _ in everything for s in (c, r)]
        judges = [j for _, jc, _, jr in everything for j in (jc, jr)]
        return spearman(rewards, judges)

    def evaluate(self, when: str) -> dict:
        """Eval-split pairwise accuracy, mean chosen/rejected scores, mean/std of all scores (+ judge corr)."""
        self.engine.eval()
        # sums: correct pairs, pairs, chosen scores, rejected scores, squared scores
        sums = torch.zeros(5, dtype=torch.float64, device=self.dev)
        for i, batch in enumerate(self.eval_loader):
            if i >= self.args.eval_iters:
                break
            chosen, rejected = self._scores(batch)
            chosen, rejected = chosen.double(), rejected.double()
            sums += torch.stack([(chosen > rejected).sum().double(), chosen.new_tensor(len(chosen)), chosen.sum(),
                                 rejected.sum(), (chosen ** 2).sum() + (rejected ** 2).sum()])
        correct, n, sum_c, sum_r, sum_sq = dist.all_reduce_sum(sums).tolist()
        n = max(n, 1.0)
        mean = (sum_c + sum_r) / (2 * n)
        metrics = {"accuracy": correct / n, "chosen_mean": sum_c / n, "rejected_mean": sum_r / n,
                   "score_mean": mean, "score_std": math.sqrt(max(sum_sq / (2 * n) - mean ** 2, 0.0)),
                   "eval_pairs": int(n)}
        if self.judge_rows:
            corr = self._judge_correlation()
            metrics["judge_spearman"] = None if math.isnan(corr) else corr
        self.engine.train()
        metrics["when"] = when
        self.history.append(metrics)
        self.logger.scalars(self.engine.global_steps, {f"eval/{k}": v for k, v in metrics.items()
                                                       if isinstance(v, float)})
        # DeepSpeed-Chat's step-2 eval line, then ours.
        self.logger.write(f"chosen_last_scores (higher is better) : {metrics['chosen_mean']:.4f}, "
                          f"rejected_last_scores (lower is better) : {metrics['rejected_mean']:.4f}, "
                          f"acc (higher is better) : {metrics['accuracy']:.4f}")
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        self.logger.write(f"[eval {when}] {shown}")
        return metrics

    def train(self) -> None:
        """All epochs, with the periodic evaluations and checkpoints the flags ask for."""
        self.result = train_epochs(self.engine, self.train_loader, self.loss, self.evaluate, self.args,
                                   self.logger, self.dev, shown=("loss", "acc"), history=self.history)
        self.logger.close()

    def save(self) -> None:
        """The reward model as a plain HF sequence-classification directory, with eval history and score stats."""
        if not self.args.output_dir:
            return
        last = self.history[-1]
        save_hf_model(self.engine, self.tokenizer, self.args.output_dir,
                      {"dschat_metrics.json": {"step": 2, "loss": self.args.loss, "evals": self.history,
                                               **self.result, "wall_time_s": time.time() - self.start},
                       "reward_stats.json": {"mean": last["score_mean"], "std": last["score_std"],
                                             "eval_pairs": last["eval_pairs"]}})

    def summary(self) -> str:
        """Final lines: accuracy before/after, mean chosen/rejected scores, judge correlation."""
        first, last = self.history[0], self.history[-1]
        lines = [f"step 2 done in {time.time() - self.start:.0f}s: pairwise accuracy {first['accuracy']:.4f} -> "
                 f"{last['accuracy']:.4f} on {last['eval_pairs']} eval pairs",
                 f"mean score: chosen {last['chosen_mean']:.4f}, rejected {last['rejected_mean']:.4f} "
                 f"(all: mean {last['score_mean']:.4f}, std {last['score_std']:.4f})"]
        if "judge_spearman" in last:
            fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
            lines.append(f"Spearman(reward, judge) on {2 * len(self.judge_rows)} held-out builtin answers: "
                         f"{fmt(first['judge_spearman'])} -> {fmt(last['judge_spearman'])}")
        if self.args.output_dir:
            lines.append(f"reward model saved to {self.args.output_dir}")
        return "\n".join(lines)
