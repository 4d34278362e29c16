"""Rollout generation for the actor, with and without our hybrid generation mode.

DeepSpeed's HybridEngine breaks on modern transformers decoders, so `--enable_hybrid_engine` gives the
actor a generation mode of our own: once per rollout the actor's weights are copied into a plain Hugging Face
twin of the model that lives outside DeepSpeed: no ZeRO forward hooks, no gradient checkpointing, dropout off,
KV cache on. Under ZeRO-3 the copy gathers one layer at a time and releases it before the next, so it costs one
layer's weights on top of the twin, not a second model; the twin is built on the meta device and its tensors
come from the actor's (no random initialisation of a full model). LoRA adapters stay adapters in the twin (a
bf16 merge would round small deltas away), so it computes what the actor does. The training engine itself is
not touched, so the actor goes back to training exactly as it was.
Measured on CPU, the hooks (not the gathers) are what make ZeRO-3 generation slow; the twin avoids them.
Cost: one extra full copy of the actor's weights on each rank while it exists (bench/twin_memory.py).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from dschat.algos.masked import action_mask_from_tokens
from dschat.data.collators import pad_sequences
from dschat.data.prompts import PromptFormat
from dschat.models.export import unwrap
from dschat.models.heads import hf_model
from dschat.runtime import dist


@dataclass
class Rollout:
    """Generated sequences, cut after each answer's first EOS.

    seq [B, P + A] (left-padded prompt, answer, pad after the EOS), attention_mask [B, P + A],
    action_mask [B, A] (1 on answer tokens through the first EOS), prompt_len P; logprobs [B, A] (fp32) of
    the answer tokens under the sampling model's raw logits when generation was asked to keep them.
    """

    seq: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    prompt_len: int
    logprobs: torch.Tensor | None = None


def encode_prompts(fmt: PromptFormat, prompts: list[str], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids [B, P] and their attention mask, so that every answer starts at column P."""
    ids = [fmt.prompt_ids(p) for p in prompts]
    return (pad_sequences(ids, fmt.pad_token_id, left=True).to(dev),
            pad_sequences([[1] * len(i) for i in ids], 0, left=True).to(dev))


def finish_rollout(prompt: torch.Tensor, prompt_mask: torch.Tensor, seq: torch.Tensor, eos_token_id: int,
                   pad_token_id: int) -> Rollout:
    """Mask what `generate` wrote after each answer's first EOS: neither an action nor attended to."""
    p = prompt.shape[1]
    action_mask = action_mask_from_tokens(seq[:, p:], eos_token_id, pad_token_id)
    answer = torch.where(action_mask.bool(), seq[:, p:], pad_token_id)
    return Rollout(torch.cat([prompt, answer], dim=1), torch.cat([prompt_mask, action_mask.long()], dim=1),
                   action_mask, p)


def step_logprobs(step_logits: tuple[torch.Tensor, ...] | list[torch.Tensor], tokens: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """Log-probs [B, A] (fp32) of tokens [B, A] under per-step raw logits (A tensors [B, V], as `generate` keeps)
    divided by the sampling `temperature`: the distribution the tokens were drawn from (before any top-p cut)."""
    out = torch.empty(tokens.shape, dtype=torch.float32, device=tokens.device)
    for t, logits in enumerate(step_logits):  # one step at a time: no [B, A, V] tensor
        logits = logits.float()
        if temperature != 1.0:
            logits = logits / temperature
        out[:, t] = logits.gather(-1, tokens[:, t: t + 1]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return out


def generation_config(fmt: PromptFormat, **settings: Any) -> GenerationConfig:
    """A GenerationConfig from `settings` (our flags) and the prompt format's pad/end tokens only."""
    return GenerationConfig(pad_token_id=fmt.pad_token_id, eos_token_id=fmt.eos_token_id, **settings)


@contextlib.contextmanager
def without_model_generation_defaults(model: torch.nn.Module) -> Iterator[None]:
    """Within: `model` has a blank generation_config, so `generate` fills what our config leaves unset with the
    library's neutral defaults, not with the model's generation_config.json (a repetition_penalty of 1.05, a
    top_k or a temperature there would sample from a distribution PPO's log-probs never see)."""
    inner = hf_model(model)
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


@torch.no_grad()
def generate_rollout(model, fmt: PromptFormat, prompt: torch.Tensor, prompt_mask: torch.Tensor,
                     synced: bool = False, with_logprobs: bool = False, **generate_kwargs) -> Rollout:
    """`model.generate` on left-padded prompts (in eval mode) with a GenerationConfig of `generate_kwargs` only,
    cut after each first end-of-turn token; with_logprobs: also the answer tokens' log-probs from the sampling
    pass's raw logits at the sampling temperature."""
    config = generation_config(fmt, output_logits=with_logprobs, return_dict_in_generate=with_logprobs,
                               **generate_kwargs)
    was_training = model.training
    model.eval()
    try:
        with without_model_generation_defaults(model):
            out = model.generate(prompt, attention_mask=prompt_mask, generation_config=config, synced_gpus=synced)
    finally:
        model.train(was_training)
    seq = out.sequences if with_logprobs else out
    rollout = finish_rollout(prompt, prompt_mask, seq, fmt.eos_token_id, fmt.pad_token_id)
    if with_logprobs:
        temperature = config.temperature if config.do_sample and config.temperature is not None else 1.0
        rollout.logprobs = step_logprobs(out.logits, seq[:, prompt.shape[1]:], temperature)
    return rollout


def decode_answers(fmt: PromptFormat, rollout: Rollout) -> list[str]:
    """The answer texts of a rollout (special tokens dropped)."""
    return fmt.decode(rollout.seq[:, rollout.prompt_len:])


@torch.no_grad()
def generate_answers(model, fmt: PromptFormat, prompts: list[str], max_new_tokens: int, batch_size: int,
                     dev: torch.device, synced: bool = False) -> list[str]:
    """Greedy answers to `prompts` in batches; `synced` for ZeRO-3 modules on several ranks."""
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        prompt, mask = encode_prompts(fmt, prompts[start: start + batch_size], dev)
        rollout = generate_rollout(model, fmt, prompt, mask, synced, max_new_tokens=max_new_tokens,
                                   do_sample=False)
        answers += decode_answers(fmt, rollout)
    return answers


def layer_of(name: str) -> str:
    """The unit a parameter is gathered with: its name up to the first numeric part (one decoder layer of a
    ModuleList, adapters included), else its module's name."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1])


def layer_groups(named: Iterable[tuple[str, torch.Tensor]]) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive (name, tensor) pairs grouped by `layer_of`, in the given (module) order."""
    return [list(group) for _, group in itertools.groupby(named, key=lambda item: layer_of(item[0]))]


def gather_units(named: Iterable[tuple[str, torch.nn.Parameter]]) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """`layer_groups` of the parameters, a group that fetches fewer than two tensors (`dist.needs_gather`) merged
    into the next (the last into the one before): DeepSpeed 0.19 gathers a lone parameter through a path that
    allocates it twice, even on one rank (measured: +216 MiB for SmolLM2-135M's fp32 embedding, 0 with a layer)."""
    units: list[list[tuple[str, torch.nn.Parameter]]] = []
    pending: list[tuple[str, torch.nn.Parameter]] = []
    for group in layer_groups(named):
        pending += group
        if sum(dist.needs_gather(p) for _, p in pending) != 1:
            units.append(pending)
            pending = []
    while pending and units and sum(dist.needs_gather(p) for _, p in pending) == 1:
        pending = units.pop() + pending
    return units + ([pending] if pending else [])


def build_twin(module: torch.nn.Module) -> torch.nn.Module:
    """A plain HF model (peft-wrapped like `module` when it has LoRA) with `module`'s config, on the meta device.

    It holds no memory and is not randomly initialised: `refresh_twin` materialises each tensor from the actor's
    own, with the actor's dtype per tensor (adapters, fp32-kept layers) and on its device. The twin computes what
    the actor engine computes: LoRA stays a separate adapter path. Merging the adapters into bf16 weights
    (W + s * B @ A, rounded to bf16) would drop every delta below half a bf16 step of W (about 1e-4 for weights of
    size 0.02), so rollouts and --logprobs_from_generation would come from an older policy than the one trained.
    Dropout off, KV cache on; building does not consume the sampling RNG.
    """
    base = module.get_base_model() if hasattr(module, "peft_config") else module
    config = base.config.__class__.from_dict(base.config.to_dict())
    config.use_cache = True
    for key in ("dropout", "attention_dropout", "hidden_dropout", "activation_dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    dtype = next(module.parameters()).dtype  # a ZeRO-3 partitioned parameter knows its dtype too
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # building must not shift the sampling RNG
        twin = type(base)._from_config(config, dtype=dtype)
        twin.generation_config = base.generation_config
        if hasattr(module, "peft_config"):
            from peft import get_peft_model

            twin = get_peft_model(twin, copy.deepcopy(module.peft_config["default"]), autocast_adapter_dtype=False)
    return twin.eval()


def _materialise(twin: torch.nn.Module, meta: torch.Tensor, source: torch.Tensor) -> None:
    """Put a copy of `source` everywhere `twin` holds the meta tensor `meta` (tied weights stay one tensor)."""
    if isinstance(meta, torch.nn.Parameter):
        # Its weights keep requires_grad=True (it only ever runs under no_grad): on CPU, PyTorch 2.13's bf16
        # decode-shaped matmuls run 1.3-1.6x slower with frozen weights (measured, BENCHMARKS.md).
        real: torch.Tensor = torch.nn.Parameter(source.detach().clone(), requires_grad=True)
        slot = "_parameters"
    else:
        real, slot = source.detach().clone(), "_buffers"
    for mod in twin.modules():
        table = getattr(mod, slot)
        for key, value in table.items():
            if value is meta:
                table[key] = real


@torch.no_grad()
def refresh_twin(twin: torch.nn.Module, module: torch.nn.Module) -> None:
    """Copy `module`'s current weights into `twin` one layer at a time: under ZeRO-3 each layer is gathered alone
    (a collective: every rank calls this) and released before the next, so the transient cost is one layer, not a
    model; the twin's meta tensors are materialised from the actor's on the first call."""
    params = dict(twin.named_parameters(remove_duplicate=False))
    for group in gather_units(module.named_parameters()):
        with dist.gathered(p for _, p in group):
            for name, param in group:
                target = params.get(name)
                if target is None:  # the twin has no such weight: nothing to copy it into (as load_state_dict)
                    continue
                if target.is_meta:
                    _materialise(twin, target, param.data)
                    params = dict(twin.named_parameters(remove_duplicate=False))
                else:
                    target.copy_(param.data)
    buffers = dict(twin.named_buffers(remove_duplicate=False))
    for name, buf in module.named_buffers():  # never partitioned; non-persistent ones (rotary inv_freq) too
        target = buffers.get(name)
        if target is None:
            continue
        if target.is_meta:
            _materialise(twin, target, buf)
            buffers = dict(twin.named_buffers(remove_duplicate=False))
        else:
            target.copy_(buf)
    missing = [n for n, t in itertools.chain(twin.named_parameters(), twin.named_buffers()) if t.is_meta]
    if missing:
        raise RuntimeError(f"hybrid generation: actor weights missing in twin: {missing[:5]}")


class Generator:
    """Samples answers from the actor engine: plain `generate` on the engine's module, or the hybrid twin."""

    def __init__(self, actor_engine, fmt: PromptFormat, hybrid: bool, zero_stage: int, release_cache: bool = False):
        self.actor, self.fmt, self.hybrid, self.release_cache = actor_engine, fmt, hybrid, release_cache
        self.synced = zero_stage == 3 and dist.world_size() > 1
        self.twin: torch.nn.Module | None = None

    def _refresh_twin(self) -> torch.nn.Module:
        """Copy the actor's current weights (gathered layer by layer; LoRA adapters as adapters, unmerged) into the
        hook-free twin, built on the meta device the first time."""
        module = unwrap(self.actor)
        if self.twin is None:
            self.twin = build_twin(module)
        refresh_twin(self.twin, module)
        return self.twin

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, prompt_mask: torch.Tensor, with_logprobs: bool = False,
                 **sampling) -> Rollout:
        """Answers to left-padded prompts, cut after the first EOS (and their sampling log-probs when asked);
        `sampling` goes to HF generate."""
        if self.hybrid:
            rollout = generate_rollout(self._refresh_twin(), self.fmt, prompt, prompt_mask,
                                       with_logprobs=with_logprobs, use_cache=True, **sampling)
            if self.release_cache:
                self.twin = None
            return rollout
        return generate_rollout(unwrap(self.actor), self.fmt, prompt, prompt_mask, self.synced,
                                with_logprobs=with_logprobs, use_cache=True, **sampling)

    def model_for_eval(self) -> tuple[torch.nn.Module, bool]:
        """(model, synced) to run greedy evaluation with: the refreshed twin in hybrid mode."""
        if self.hybrid:
            return self._refresh_twin(), False
        return unwrap(self.actor), self.synced
