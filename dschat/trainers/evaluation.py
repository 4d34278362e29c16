"""Evaluation shared by the steps: eval-split loss/perplexity and greedy answers scored by the judge."""

from __future__ import annotations

import math

import torch

from dschat.data.builtin_task import judge
from dschat.data.prompts import PromptFormat
from dschat.models.forward import label_logits
from dschat.runtime import dist
from dschat.runtime.engine import to_device
from dschat.trainers.rollout import generate_answers


@torch.no_grad()
def perplexity(engine, loader, eval_iters: int, dev: torch.device, padding_free: bool = False) -> dict[str, float]:
    """Token-weighted eval loss and perplexity over at most `eval_iters` batches, summed over ranks."""
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=dev)
    for i, batch in enumerate(loader):
        if i >= eval_iters:
            break
        batch = to_device(batch, dev)
        logits, targets, _ = label_logits(engine, batch, padding_free)
        loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        totals += torch.stack([loss.double(), torch.tensor(targets.numel(), dtype=torch.float64, device=dev)])
    engine.train()
    loss_sum, count = dist.all_reduce_sum(totals).tolist()
    loss = loss_sum / max(count, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def judge_eval(model, fmt: PromptFormat, prompts: list[str], max_new_tokens: int, dev: torch.device,
               synced: bool = False, batch_size: int = 32) -> dict[str, object]:
    """Mean judge score of greedy answers; prompts are sharded over ranks and the sums all-reduced."""
    mine, n_real = dist.shard(prompts)
    answers = generate_answers(model, fmt, mine, max_new_tokens, batch_size, dev, synced)
    scores = [judge(p, a) for p, a in zip(mine[:n_real], answers[:n_real])]
    totals = dist.all_reduce_sum(torch.tensor([sum(scores), len(scores)], dtype=torch.float64, device=dev))
    examples = list(zip(mine[:3], answers[:3]))
    return {"judge": (totals[0] / totals[1].clamp(min=1)).item(), "examples": examples}
