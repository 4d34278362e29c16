"""The reward (and critic) model: a plain `AutoModelForSequenceClassification` with one label, and its
per-token values (the losses on them live in `dschat.algos.losses`).

Unlike DeepSpeed-Chat's RewardModel wrapper (AutoModel + a hand-made `v_head`), the head is the one
transformers builds for the architecture (`score` for Llama, OPT, Mistral, Qwen, GPT-2 ...), so a saved
reward model is a standard sequence-classification checkpoint: `AutoModelForSequenceClassification.
from_pretrained(dir)` loads it, head included, with nothing from this project, and its pooled logit is
the same end score `end_scores(token_values(...))` gives here (`dschat.algos.masked.end_scores`).

End positions come from the attention mask (the rightmost 1), not from token ids, so left padding, right
padding and OPT-style sequences whose BOS id equals the pad id all work; DeepSpeed-Chat's
`--num_padding_at_beginning` is not needed.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import sys
from pathlib import Path

import torch

from dschat.runtime.errors import ModelPathError

HEAD_NAMES = ("score", "classifier")


def create_reward_model(path: str, tokenizer, ds_config: dict, dtype: torch.dtype = torch.float32,
                        dropout: float | None = None, trust_remote_code: bool = False,
                        gradient_checkpointing: bool = False, allow_fresh_head: bool = True) -> torch.nn.Module:
    """A one-label sequence-classification model from a causal-LM or reward-model path (head kept if saved).

    `allow_fresh_head=False` (step 3's reward model and critic) refuses a path without a trained head.
    """
    from transformers import AutoModelForSequenceClassification

    from dschat.models.loading import create_hf_model

    # A causal LM gets a freshly initialised head (created inside zero.Init under ZeRO-3, in the model's
    # dtype); a previous reward model keeps its trained head. load_model sets config.pad_token_id.
    return create_hf_model(AutoModelForSequenceClassification, path, tokenizer, ds_config, dtype, dropout,
                           gradient_checkpointing, trust_remote_code, config_updates={"num_labels": 1},
                           allow_fresh_head=allow_fresh_head)


def check_trained_reward_model(path: str, flag: str, trust_remote_code: bool = False) -> None:
    """Before any engine is built: `path` must be a one-label sequence classifier whose files hold its head."""
    from dschat.models.loading import check_weight_files, model_config, split_model_path

    config = model_config(path, trust_remote_code)
    archs = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ModelPathError(f"{flag} {path} holds a {archs[0] if archs else 'model without architectures'}, not a "
                             f"trained reward model: its score head would be random; train one with step 2 and "
                             f"pass its --output_dir")
    if getattr(config, "num_labels", 1) != 1:
        raise ModelPathError(f"{flag} {path} is a classifier with {config.num_labels} labels, not a one-score reward "
                             f"model (step 2's output)")
    directory, _ = split_model_path(path)
    check_weight_files(directory)
    files = sorted(Path(directory).glob("*.safetensors")) if os.path.isdir(directory) else []
    if files:  # other formats (and hub names) are checked by load_model's loading report
        from safetensors import safe_open

        keys = set()
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                keys.update(f.keys())
        if not any(k.split(".")[0] in HEAD_NAMES for k in keys):
            raise ModelPathError(f"{flag} {path}: its weights hold no {'/'.join(HEAD_NAMES)} head (config.json says "
                                 f"{archs[0]}, but the head would be initialised at random); pass a step-2 output")


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a DeepSpeed engine (`.module`) and/or a peft wrapper."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether train mode can change a forward of `model` (engine, peft or HF): a dropout module or a config
    dropout probability above zero (attention dropout is applied functionally, from the config)."""
    inner = getattr(model, "module", model)
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in inner.modules()):
        return True
    config = getattr(hf_model(model), "config", None)
    settings = config.to_dict() if config is not None else {}
    return any(("dropout" in k or "pdrop" in k) and isinstance(v, (int, float)) and v > 0
               for k, v in settings.items())


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] counted over attended tokens (cumsum(mask) - 1, clamped at 0 on left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@functools.cache
def _takes_position_ids(cls: type) -> bool:
    try:
        return "position_ids" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


MASK_CALL = re.compile(r"\b(?:create_causal_mask|create_sliding_window_causal_mask|mask_function)\(")
PACKED_ATTENTION = ("sdpa", "eager")  # flash kernels drop the packed mask for more than one packed row


def passes_position_ids(source: str) -> bool:
    """True when every causal-mask call in a modeling file's `source` hands it the position ids (directly or through
    a `mask_kwargs` dict that holds them): only then can transformers find packed rows (OPT's, XGLM's and
    BioGPT's calls do not, and their packed rows would attend across each other)."""
    calls = []
    for match in MASK_CALL.finditer(source):
        depth, end = 1, match.end()
        while depth and end < len(source):
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            end += 1
        calls.append(source[match.end():end])
    in_kwargs = '"position_ids": position_ids' in source
    return bool(calls) and all("position_ids" in c or ("**mask_kwargs" in c and in_kwargs) for c in calls)


@functools.cache
def _packs(cls: type) -> bool:
    import transformers.masking_utils as masking  # releases before packed-sequence detection cannot pack

    module = sys.modules.get(cls.__module__)
    if not (hasattr(masking, "find_packed_sequence_indices") and _takes_position_ids(cls)
            and getattr(module, "create_causal_mask", None) is not None):
        return False
    try:
        return passes_position_ids(inspect.getsource(module))
    except (OSError, TypeError):
        return False


def packable(model) -> bool:
    """True when `model` (or its engine / peft wrapper) can run padding-free rows: its forward takes position ids,
    its causal-mask call passes them to transformers' create_causal_mask (which, given no attention mask, finds
    rows packed end to end from position ids that restart at 0 and keeps each row's attention inside it), and it
    runs sdpa or eager attention."""
    inner = hf_model(model)
    attention = getattr(getattr(inner, "config", None), "_attn_implementation", None) or "eager"
    return attention in PACKED_ATTENTION and _packs(type(inner))


def position_kwargs(model: torch.nn.Module, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{"position_ids": ...} for a forward of `model` (engine, peft or HF): `position_ids` if given, else counted
    from a 2-D attention mask, so that a left-padded row sits at the positions it has unpadded.

    Models with absolute position embeddings (GPT-2, GPT-Neo, OPT-style learned ones computed from 0) otherwise
    number left padding too, and their outputs depend on how much padding a row got; rotary models are
    invariant up to rounding. {} for a model whose forward takes no position_ids, or a mask that is not 2-D.
    """
    if position_ids is None:
        if attention_mask.dim() != 2 or not _takes_position_ids(type(hf_model(model))):
            return {}
        position_ids = position_ids_from_mask(attention_mask)
    return {"position_ids": position_ids}


def head_name(model: torch.nn.Module) -> str:
    """Attribute name of the scalar head of a (wrapped) sequence-classification model ("score" usually)."""
    inner = hf_model(model)
    for name in HEAD_NAMES:
        if isinstance(getattr(inner, name, None), torch.nn.Module):
            return name
    raise ValueError(f"{type(inner).__name__} has no sequence-classification head ({', '.join(HEAD_NAMES)})")


def token_values(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor | None = None, padding_free: bool = False) -> torch.Tensor:
    """[B, L] scalar value of every position (the head applied to every hidden state); positions from the
    attention mask unless `position_ids` are given (left padding does not shift them). padding_free: the rows
    run packed end to end where the model allows it (dschat.data.packing.pack_rows; 0 on padding).

    `model` may be the HF model, a peft PeftModel or a DeepSpeed engine around either. The model's own
    forward runs (so ZeRO-3's gather/release hooks see a normal top-level call) and a forward hook on the
    head captures its per-token output before transformers pools it down to one score per sequence.
    """
    if padding_free and position_ids is None and attention_mask is not None:
        from dschat.data.packing import pack_rows, unpack_rows

        packed = pack_rows(input_ids, attention_mask) if packable(model) else None
        if packed is not None:
            return unpack_rows(token_values(model, packed.input_ids, None, packed.position_ids), packed)
    head = getattr(hf_model(model), head_name(model))
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _mod, _inp, out: captured.append(out))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
              **position_kwargs(model, attention_mask, position_ids))
    finally:
        handle.remove()
    values = captured[-1]
    if values.dim() != 3 or values.shape[-1] != 1:
        raise ValueError(f"expected per-token head output [B, L, 1], got {tuple(values.shape)}")
    return values.squeeze(-1)


def pair_token_values(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      pad_token_id: int, padding_free: bool = False) -> torch.Tensor:
    """token_values of a right-padded [chosen; rejected] batch [2B, L] from one shared-prompt forward per pair
    (dschat.data.packing): the prompt runs once, not twice; values equal the separate forward's up to rounding."""
    from dschat.data.packing import pack_pairs, unpack_pairs

    dtype = next(hf_model(model).parameters()).dtype
    packed = pack_pairs(input_ids, attention_mask, pad_token_id, dtype, padding_free)
    values = token_values(model, packed.input_ids, packed.attention_mask, packed.position_ids)
    return unpack_pairs(values, packed)


class PairValues:
    """Per-token values of [chosen; rejected] batches, shared-prompt or separate (--pair_forward).

    "auto" checks the shared-prompt forward against the separate one on the first batch (no gradient, eval
    mode) and keeps it only when they agree: a model whose attention ignores custom 4-D masks falls back to
    separate forwards with one printed line. "shared" makes a failed check an error. padding_free (--padding_free):
    the packed pair rows (or, separate, the sequences) laid end to end in as few rows as fit.
    """

    def __init__(self, mode: str, pad_token_id: int, padding_free: bool = False):
        self.mode, self.pad_token_id, self.padding_free = mode, pad_token_id, padding_free

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Values [2B, L] of the batch (0 or the model's raw output on padding)."""
        if self.mode in ("auto", "shared"):
            self._check(model, input_ids, attention_mask)
        if self.mode == "checked":
            return pair_token_values(model, input_ids, attention_mask, self.pad_token_id, self.padding_free)
        return token_values(model, input_ids, attention_mask, padding_free=self.padding_free)

    def _check(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        module = hf_model(model)
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                shared = pair_token_values(model, input_ids, attention_mask, self.pad_token_id,
                                           self.padding_free).float()
                separate = token_values(model, input_ids, attention_mask).float()
        finally:
            module.train(was_training)
        from dschat.runtime import dist

        valid = attention_mask.bool()
        diff = (shared - separate)[valid].abs().max().item()
        scale = separate[valid].abs().max().item() + 1.0
        tol = 1e-3 if next(module.parameters()).dtype == torch.float32 else 5e-2
        agree = torch.tensor([float(diff <= tol * scale)], device=input_ids.device)
        if dist.all_reduce_sum(agree).item() == dist.world_size():  # every rank decides alike
            self.mode = "checked"
            return
        message = (f"--pair_forward shared: this model's shared-prompt values differ from separate forwards "
                   f"(max |difference| {diff:.3g}); its attention may ignore custom 4-D masks")
        if self.mode == "shared":
            from dschat.runtime.errors import FlagError

            raise FlagError(message + "; use --pair_forward separate")
        print(message.replace("--pair_forward shared: ", "--pair_forward auto: ") + "; using separate forwards",
              flush=True)
        self.mode = "separate"
