"""LoRA through peft: wrapping a model's Linear layers, and folding adapters back into plain weights."""

from __future__ import annotations

from typing import Any

import torch

from dschat.runtime.errors import FlagError

LORA_ALPHA = 1.0  # DeepSpeed-Chat's LoRA scaling 1/r (peft's own default alpha is 8)


def lora_targets(model: torch.nn.Module, module_name: str, target_modules: list[str] | None = None,
                 keep_trainable: tuple[str, ...] = ()) -> list[str]:
    """The Linear layers LoRA wraps: peft's form when `target_modules` is given (names, each matching a module
    whose name is it or ends with "." + it; or ["all-linear"]: every Linear but the output head), else every
    Linear whose name contains `module_name` (DeepSpeed-Chat's form)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or any(name.endswith(k) for k in keep_trainable):
            continue
        if target_modules is None:
            hit = module_name in name
        elif target_modules == ["all-linear"]:
            hit = mod is not head
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if hit:
            targets.append(name)
    return targets


def apply_lora(model: torch.nn.Module, dim: int, module_name: str, only_optimize_lora: bool,
               flag: str = "--lora_module_name", keep_trainable: tuple[str, ...] = (), alpha: float = LORA_ALPHA,
               target_modules: list[str] | None = None) -> torch.nn.Module:
    """Wrap `model` with peft LoRA of rank `dim` and scale `alpha / dim` on the layers lora_targets picks."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, module_name, target_modules, keep_trainable)
    if not targets:
        what = f"{flag.replace('module_name', 'target_modules')} {' '.join(target_modules)}" if target_modules \
            else f"{flag} '{module_name}'"
        raise FlagError(f"{what} matches no Linear layer of {type(model).__name__}")
    config = LoraConfig(r=dim, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                        modules_to_save=list(keep_trainable) or None)
    # Adapters in the base weights' dtype: peft would upcast them to fp32 beside bf16/fp16 weights, which a ZeRO-3
    # engine refuses (one dtype per partitioned group); DeepSpeed's optimizer keeps fp32 master copies anyway.
    model = get_peft_model(model, config, autocast_adapter_dtype=False)
    if not only_optimize_lora:  # DeepSpeed-Chat trains the base weights too unless told otherwise
        for name, param in model.named_parameters():
            if "lora_" not in name:
                param.requires_grad_(True)
    return model


class WithoutAdapters:
    """A frozen model that is a LoRA-trained engine with its adapters switched off (peft's disable_adapter).

    When only the adapters (and peft's modules_to_save copies, e.g. a reward head) train, the base weights
    stay exactly as loaded, so the engine with adapters off *is* the frozen starting model: step 3's
    reference (the actor's base) or reward model (the critic's base, original head) without a second copy
    of the weights. Calls run under no_grad in eval mode and restore the engine's mode.
    """

    def __init__(self, engine):
        self.engine = engine

    @property
    def module(self) -> torch.nn.Module:
        """The engine's (peft) module, for helpers that look inside (heads, logits_to_keep support)."""
        return getattr(self.engine, "module", self.engine)

    @torch.no_grad()
    def __call__(self, **kwargs):
        """The engine's forward with adapters disabled, no gradient, dropout off."""
        module = self.module
        was_training = module.training
        module.eval()
        try:
            with module.disable_adapter():
                return self.engine(**kwargs)
        finally:
            module.train(was_training)

    def eval(self) -> WithoutAdapters:
        """Always evaluated in eval mode already."""
        return self


def merge_lora_state_dict(state: dict[str, torch.Tensor], peft_config: Any,
                          rounding: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Fold LoRA weights into their base Linear and drop peft's name prefixes.

    Each merge runs in fp32, W.float() + scale * B.float() @ A.float(), and is cast to W's (the training)
    dtype once, after the sum. In bf16/fp16 that one cast still drops the part of the update below half a
    step of W: `rounding`, when given, receives the squared norms of the update ("update") and of what the
    cast lost ("lost") summed over the merged weights, so a caller can say how much survived.
    """
    scale = peft_config.lora_alpha / peft_config.r
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if ".lora_A." in name or ".lora_B." in name or ".original_module." in name:
            continue
        if ".base_layer.weight" in name:
            stem = name.split(".base_layer.weight")[0]
            lora_a = state[next(k for k in state if k.startswith(stem + ".lora_A."))]
            lora_b = state[next(k for k in state if k.startswith(stem + ".lora_B."))]
            update = scale * (lora_b.float() @ lora_a.float())
            exact = tensor.float() + update
            tensor = exact.to(tensor.dtype)
            if rounding is not None:
                rounding["update"] = rounding.get("update", 0.0) + update.square().sum().item()
                rounding["lost"] = rounding.get("lost", 0.0) + (tensor.float() - exact).square().sum().item()
        clean = name.replace(".base_layer", "").replace(".modules_to_save.default", "")
        merged[clean.removeprefix("base_model.model.")] = tensor
    return merged
