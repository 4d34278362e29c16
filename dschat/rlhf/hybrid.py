"""Rollout generation for the actor, with and without our hybrid generation mode.

DeepSpeed's HybridEngine breaks on modern transformers decoders, so `--enable_hybrid_engine` gives the
actor a generation mode of our own: once per rollout the actor's weights are gathered (all ZeRO-3
partitions in one collective, LoRA folded in) and copied into a plain Hugging Face twin of the model that
lives outside DeepSpeed: no ZeRO forward hooks, no gradient checkpointing, dropout off, KV cache on. The
training engine itself is not touched, so the actor goes back to training exactly as it was.
Measured on CPU, the hooks (not the gathers) are what make ZeRO-3 generation slow; the twin avoids them.
Cost: one extra full copy of the actor's weights on each rank while it exists.
"""

from __future__ import annotations

import contextlib

import torch

from dschat.utils import dist
from dschat.utils.model.save import merge_lora_state_dict, unwrap


def _gather_all(module: torch.nn.Module):
    """Context in which every ZeRO-3 parameter of `module` is whole on every rank (no-op otherwise)."""
    import deepspeed

    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None) if params else contextlib.nullcontext()


class Generator:
    """Samples answers from the actor engine: plain `generate` on the engine's module, or the hybrid twin."""

    def __init__(self, actor_engine, tokenizer, hybrid: bool, zero_stage: int, release_cache: bool = False):
        self.actor, self.tokenizer, self.hybrid, self.release_cache = actor_engine, tokenizer, hybrid, release_cache
        self.synced = zero_stage == 3 and dist.world_size() > 1
        self.twin: torch.nn.Module | None = None

    def _refresh_twin(self) -> torch.nn.Module:
        """Copy the actor's current weights (gathered, LoRA merged) into the hook-free twin."""
        module = unwrap(self.actor)
        with _gather_all(module), torch.no_grad():
            state = {n: p.data for n, p in module.named_parameters()}
            state.update({n: b for n, b in module.named_buffers()})
            if hasattr(module, "peft_config"):
                state = merge_lora_state_dict(state, module.peft_config["default"])
            if self.twin is None:
                base = module.get_base_model() if hasattr(module, "peft_config") else module
                config = base.config.__class__.from_dict(base.config.to_dict())
                config.use_cache = True
                for key in ("dropout", "attention_dropout", "hidden_dropout", "activation_dropout"):
                    if hasattr(config, key):
                        setattr(config, key, 0.0)
                dtype = next(iter(state.values())).dtype
                with torch.random.fork_rng(devices=[]):  # building must not shift the sampling RNG
                    twin = type(base)._from_config(config, dtype=dtype)
                self.twin = twin.to(next(iter(state.values())).device)
                self.twin.generation_config = base.generation_config
                self.twin.requires_grad_(False).eval()
            missing, _ = self.twin.load_state_dict(state, strict=False)
            tied = set(getattr(self.twin, "_tied_weights_keys", None) or [])
            real_missing = [k for k in missing if k not in tied and "lm_head" not in k]
            if real_missing:
                raise RuntimeError(f"hybrid generation: actor weights missing in twin: {real_missing[:5]}")
        return self.twin

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, prompt_mask: torch.Tensor, **sampling) -> torch.Tensor:
        """[B, P + A] sequences for left-padded prompts; `sampling` goes to HF generate."""
        kwargs = dict(attention_mask=prompt_mask, pad_token_id=self.tokenizer.pad_token_id,
                      eos_token_id=self.tokenizer.eos_token_id, **sampling)
        if self.hybrid:
            out = self._refresh_twin().generate(prompt, **kwargs)
            if self.release_cache:
                self.twin = None
            return out
        module = unwrap(self.actor)
        was_training = module.training
        module.eval()
        out = module.generate(prompt, synced_gpus=self.synced, use_cache=True, **kwargs)
        module.train(was_training)
        return out

    def model_for_eval(self) -> tuple[torch.nn.Module, bool]:
        """(model, synced) to run greedy evaluation with: the refreshed twin in hybrid mode."""
        if self.hybrid:
            return self._refresh_twin(), False
        return unwrap(self.actor), self.synced
