"""Step 2 (reward model): pairwise (or DeepSpeed-Chat's divergence) loss; eval = accuracy, score stats, judge."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from dschat.algos.losses import divergence_loss, pairwise_accuracy, pairwise_loss
from dschat.algos.masked import end_scores
from dschat.data.builtin_task import judge
from dschat.data.collators import RewardCollator
from dschat.data.phases import phase_rows, tokenize_row
from dschat.models.heads import PairValues, create_reward_model, head_name, token_values
from dschat.runtime import dist
from dschat.runtime.engine import to_device
from dschat.trainers.base import OneModelRun

BUILTIN = "dschat/builtin"


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    import pandas as pd

    # Pearson correlation of average ranks (pandas' own method="spearman" needs scipy).
    rx, ry = pd.Series(x, dtype="float64").rank(), pd.Series(y, dtype="float64").rank()
    return float(rx.corr(ry))


def longer_answer_wins(attention_mask: torch.Tensor) -> torch.Tensor:
    """Pairs of a [chosen; rejected] batch that "the longer answer wins" gets right (a tie counts 1/2), summed.

    Both rows of a pair hold the same prompt, so the longer row has the longer answer (in tokens, after
    truncation to the batch's length limit).
    """
    chosen, rejected = attention_mask.sum(1).chunk(2)
    return (chosen > rejected).sum().double() + 0.5 * (chosen == rejected).sum().double()


def reward_loss(engine, batch: dict, kind: str = "pairwise", margin: float = 0.0,
                values_fn: Callable = token_values) -> tuple[torch.Tensor, dict]:
    """Loss of a [chosen; rejected] batch: "pairwise" on end scores or DeepSpeed-Chat's "divergence"."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    values = values_fn(engine, ids, mask)
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


class RewardRun(OneModelRun):
    """One step-2 run: a one-label sequence-classification model trained on chosen/rejected pairs."""

    phase, name, shown = 2, "step2", ("loss", "acc")

    def __init__(self, args):
        super().__init__(args)
        self.pair_values = PairValues(args.pair_forward, self.tokenizer.pad_token_id, args.padding_free)
        self.judge_rows = self._judge_rows() if self.data_settings.uses_builtin else []

    def make_collator(self):
        """Chosen rows then rejected rows in one right-padded [2B, L] batch."""
        return RewardCollator(self.tokenizer.pad_token_id)

    def build_model(self, ds_config: dict, dtype: torch.dtype) -> torch.nn.Module:
        """A one-label sequence classifier from --model_name_or_path (a fresh head on a causal LM)."""
        a = self.args
        return create_reward_model(a.model_name_or_path, self.tokenizer, ds_config, dtype, a.dropout,
                                   a.trust_remote_code, a.gradient_checkpointing)

    def keep_trainable(self, model: torch.nn.Module) -> tuple[str, ...]:
        """The head stays fully trainable under LoRA, also with --only_optimize_lora."""
        return (head_name(model),)

    def description(self) -> str:
        """Progress-bar label."""
        return "step2 reward"

    def _judge_rows(self) -> list[dict]:
        """Tokenised held-out builtin rows of this run's phase-2 eval split, with their decoded texts."""
        rows = phase_rows([BUILTIN], self.args.data_split, 2, self.args.seed)["eval"]
        out = []
        for row in rows:
            enc = tokenize_row(row, self.fmt, 2, self.args.max_seq_len, self.args.max_seq_len, False)
            if enc is not None:
                out.append({**enc, "prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]})
        return out

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        """The training loss chosen by --loss/--margin, with batch accuracy and mean scores to log."""
        return reward_loss(engine, batch, self.args.loss, self.args.margin, self.pair_values)

    @torch.no_grad()
    def _scores(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """End scores of a [chosen; rejected] batch, as (chosen [B], rejected [B]) in fp32."""
        batch = to_device(batch, self.dev)
        values = self.pair_values(self.engine, batch["input_ids"], batch["attention_mask"])
        return end_scores(values, batch["attention_mask"]).float().chunk(2)

    def _judge_correlation(self) -> float:
        """Spearman correlation of reward and judge over the held-out builtin chosen and rejected answers."""
        bs = self.args.per_device_eval_batch_size
        # Equal batch counts on every rank (ZeRO-3 forwards are collective); dist.shard pads the last share.
        mine, n_real = dist.shard(self.judge_rows)
        pairs = []
        for s in range(0, len(mine), bs):
            chosen, rejected = self._scores(self.collator(mine[s: s + bs]))
            pairs += list(zip(chosen.tolist(), rejected.tolist()))
        scored = [(c, judge(r["prompt"], r["chosen"]), rj, judge(r["prompt"], r["rejected"]))
                  for (c, rj), r in zip(pairs[:n_real], mine[:n_real])]
        everything = [x for part in dist.all_gather_object(scored) for x in part]
        rewards = [s for c, _, r, _ in everything for s in (c, r)]
        judges = [j for _, jc, _, jr in everything for j in (jc, jr)]
        return spearman(rewards, judges)

    def evaluate(self, when: str) -> dict:
        """Eval-split pairwise accuracy, mean chosen/rejected scores, mean/std of all scores (+ judge corr)."""
        self.engine.eval()
        # sums: correct pairs, pairs, chosen scores, rejected scores, squared scores, longer-answer wins
        sums = torch.zeros(6, dtype=torch.float64, device=self.dev)
        for i, batch in enumerate(self.eval_loader):
            if i >= self.args.eval_iters:
                break
            chosen, rejected = self._scores(batch)
            chosen, rejected = chosen.double(), rejected.double()
            sums += torch.stack([(chosen > rejected).sum().double(), chosen.new_tensor(len(chosen)), chosen.sum(),
                                 rejected.sum(), (chosen ** 2).sum() + (rejected ** 2).sum(),
                                 longer_answer_wins(batch["attention_mask"]).to(sums)])
        correct, n, sum_c, sum_r, sum_sq, longer = dist.all_reduce_sum(sums).tolist()
        n = max(n, 1.0)
        mean = (sum_c + sum_r) / (2 * n)
        metrics = {"accuracy": correct / n, "chosen_mean": sum_c / n, "rejected_mean": sum_r / n,
                   "score_mean": mean, "score_std": math.sqrt(max(sum_sq / (2 * n) - mean ** 2, 0.0)),
                   "eval_pairs": int(n), "longer_answer_accuracy": longer / n}
        if self.judge_rows:
            corr = self._judge_correlation()
            metrics["judge_spearman"] = None if math.isnan(corr) else corr
        self.engine.train()
        # DeepSpeed-Chat's step-2 eval line, then ours.
        self.logger.write(f"chosen_last_scores (higher is better) : {metrics['chosen_mean']:.4f}, "
                          f"rejected_last_scores (lower is better) : {metrics['rejected_mean']:.4f}, "
                          f"acc (higher is better) : {metrics['accuracy']:.4f}")
        return self.record(metrics, when)

    def save(self) -> None:
        """The reward model as a plain HF sequence-classification directory, with eval history and score stats."""
        last = self.history[-1]
        self.save_model(2, {"reward_stats.json": {"mean": last["score_mean"], "std": last["score_std"],
                                                  "eval_pairs": last["eval_pairs"]}})

    def summary(self) -> str:
        """Final lines: accuracy before/after, mean chosen/rejected scores, judge correlation."""
        first, last = self.history[0], self.history[-1]
        lines = [f"step 2 done in {time.time() - self.start:.0f}s: pairwise accuracy {first['accuracy']:.4f} -> "
                 f"{last['accuracy']:.4f} on {last['eval_pairs']} eval pairs",
                 f"mean score: chosen {last['chosen_mean']:.4f}, rejected {last['rejected_mean']:.4f} "
                 f"(all: mean {last['score_mean']:.4f}, std {last['score_std']:.4f})",
                 f"baselines on the same pairs: the longer answer wins {last['longer_answer_accuracy']:.4f}, "
                 f"the untrained head {first['accuracy']:.4f}"]
        if "judge_spearman" in last:
            fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
            lines.append(f"Spearman(reward, judge) on {2 * len(self.judge_rows)} held-out builtin answers: "
                         f"{fmt(first['judge_spearman'])} -> {fmt(last['judge_spearman'])}")
        if self.args.output_dir:
            lines.append(f"reward model saved to {self.args.output_dir}")
        return "\n".join(lines)
