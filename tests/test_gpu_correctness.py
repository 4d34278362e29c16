"""Issue 27's defects that CPU fp32 runs do not show, checked on CPU: GPU start-up with a mocked accelerator,
bf16 LoRA in the hybrid twin and the export, left padding under absolute positions, the policies' dropout
default, and the --deepspeed_config flag that was accepted and ignored."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from argparse import Namespace
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from dschat.runtime import dist
from dschat.runtime.errors import FlagError
from tests.helpers import REPO, STEP1, STEP2, STEP3, env

DPO = REPO / "training" / "step2_dpo_finetuning" / "main.py"


# 1. Multi-GPU start-up: each rank's device is bound from LOCAL_RANK before the first collective.
class FakeAccelerator:
    """DeepSpeed's accelerator interface as far as process set-up uses it, recording calls instead of CUDA."""

    def __init__(self, calls: list[tuple]):
        self.calls = calls

    def device_name(self, index: int | None = None) -> str:
        return "cuda" if index is None else f"cuda:{index}"

    def set_device(self, index: int) -> None:
        self.calls.append(("set_device", index))


@pytest.fixture
def fake_cuda(monkeypatch) -> list[tuple]:
    """A mocked CUDA accelerator and process-group start; returns the calls in order (nothing touches a GPU)."""
    import atexit

    import deepspeed
    import deepspeed.accelerator

    calls: list[tuple] = []
    fake = FakeAccelerator(calls)
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: fake)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **_: calls.append(("init_process_group",)))
    monkeypatch.setattr(dist, "is_dist", lambda: False)
    monkeypatch.setattr(atexit, "register", lambda *_, **__: None)
    return calls


def test_setup_binds_the_local_rank_device_before_the_process_group(monkeypatch, fake_cuda):
    from dschat.runtime import engine

    for key, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(key, value)
    assert engine.setup("fp32", 1) == "fp32"
    # set_device(1) first: every collective after it (the data set-up's all_gather_object included) runs on cuda:1
    assert fake_cuda == [("set_device", 1), ("init_process_group",)]
    assert engine.device() == torch.device("cuda", 1)


def test_a_world_of_one_binds_device_0(monkeypatch, fake_cuda):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    dist.init_distributed()
    assert fake_cuda == [("set_device", 0), ("init_process_group",)]


def test_comm_device_is_the_ranks_own_device(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_dist", lambda: True)
    monkeypatch.setattr(dist.tdist, "get_backend", lambda *_: "nccl")
    assert dist.comm_device() == torch.device("cuda", 1)  # not whatever device happens to be current
    monkeypatch.setattr(dist.tdist, "get_backend", lambda *_: "gloo")
    assert dist.comm_device() == torch.device("cpu")


# 4. LoRA in bf16: the hybrid twin computes what the engine computes; the export merges in fp32, casts once.
@pytest.fixture
def bf16_lora_engine(world_of_one):
    """A bf16 DeepSpeed engine of the builtin model with LoRA (rank 8) whose B matrices are of size 1e-3."""
    from dschat.models.loading import create_hf_model, load_tokenizer
    from dschat.models.lora import apply_lora
    from dschat.runtime.ds_config import get_train_ds_config
    from dschat.runtime.engine import build_engine

    torch.manual_seed(0)
    tok = load_tokenizer("builtin", padding_side="left")
    cfg = get_train_ds_config(stage=0, dtype="bf16", micro_batch=2, world_size=1)
    model = apply_lora(create_hf_model(AutoModelForCausalLM, "builtin", tok, cfg, torch.bfloat16), 8, "layers.", True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 1e-3)
    engine = build_engine(model, cfg, 1e-3, 0.0, 1e-3, "constant", 0, 10)
    assert {p.dtype for p in engine.module.parameters()} == {torch.bfloat16}
    return engine, tok


def test_hybrid_twin_logits_equal_the_bf16_lora_engine(bf16_lora_engine):
    from dschat.data.prompts import PromptFormat
    from dschat.trainers.rollout import Generator, encode_prompts, generate_rollout

    engine, tok = bf16_lora_engine
    dev = next(engine.module.parameters()).device  # the CPU here; cuda:0 where DeepSpeed found a GPU
    ids = torch.randint(3, 800, (2, 16), generator=torch.Generator().manual_seed(4)).to(dev)
    mask = torch.ones_like(ids)
    gen = Generator(engine, PromptFormat(tok), hybrid=True, zero_stage=0)
    engine.module.eval()
    with torch.no_grad():
        actor = engine(input_ids=ids, attention_mask=mask).logits.float()
        with engine.module.disable_adapter():
            base = engine(input_ids=ids, attention_mask=mask).logits.float()
        twin = gen._refresh_twin()(input_ids=ids, attention_mask=mask).logits.float()
    lora_effect = (actor - base).abs().max().item()
    assert lora_effect > 0.1  # the adapters change the logits: the check below can see a lost update
    bf16_step = 2.0 ** (torch.log2(actor.abs().max()).floor().item() - 7)  # one bf16 step at the logits' size
    # A bf16 merge of the adapters (the twin before this fix) was off by 0.78 here, more than the update itself.
    assert (twin - actor).abs().max().item() <= 2 * bf16_step
    # ... and greedy rollouts from the twin are the engine's own
    fmt = PromptFormat(tok)
    prompt, prompt_mask = encode_prompts(fmt, ["Human: name a fruit. Assistant:", "Human: hi. Assistant:"],
                                         dev)
    plain = generate_rollout(engine.module, fmt, prompt, prompt_mask, max_new_tokens=6, do_sample=False)
    hybrid = gen.generate(prompt, prompt_mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(plain.seq, hybrid.seq)


def test_export_merges_lora_in_fp32_and_saves_the_training_dtype(bf16_lora_engine, tmp_path, capsys):
    from safetensors.torch import load_file

    from dschat.models.export import save_hf_model

    engine, tok = bf16_lora_engine
    save_hf_model(engine, tok, str(tmp_path / "actor"))
    saved = load_file(str(tmp_path / "actor" / "model.safetensors"))
    params = dict(engine.module.named_parameters())
    lora_cfg = engine.module.peft_config["default"]
    scale = lora_cfg.lora_alpha / lora_cfg.r
    merged = 0
    for name, tensor in saved.items():
        stem = f"base_model.model.{name.removesuffix('.weight')}"
        if f"{stem}.base_layer.weight" not in params:
            continue
        w, a, b = (params[f"{stem}.{k}"].float() for k in ("base_layer.weight", "lora_A.default.weight",
                                                           "lora_B.default.weight"))
        assert tensor.dtype == torch.bfloat16  # the training dtype, cast once after the fp32 sum
        assert torch.equal(tensor, (w + scale * (b @ a)).to(torch.bfloat16))
        merged += 1
    assert merged == 4 * 7  # q, k, v, o, gate, up, down in each of the 4 layers
    # the cast to bf16 loses most of so small an update: the save says so, with the measured share
    assert "LoRA merged in fp32, saved in bfloat16" in capsys.readouterr().out


# 10. Left padding does not shift the positions of absolute-position models.
def tiny_gpt2(cls: type = GPT2LMHeadModel, **extra) -> torch.nn.Module:
    """A random 2-layer GPT-2 (learned absolute position embeddings) in eval mode."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=60, n_positions=64, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0, **extra)
    return cls(config).eval()


ROW = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
PROMPT_LEN, PADS = 4, 3


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    """ROW after PADS pad tokens, with its attention mask."""
    pad = torch.zeros(1, PADS, dtype=torch.long)
    return torch.cat([pad, ROW], 1), torch.cat([pad, torch.ones_like(ROW)], 1)


def test_answer_logprobs_of_a_left_padded_row_equal_the_unpadded_ones():
    from dschat.models.forward import answer_logits, logits_at

    model = tiny_gpt2()
    seq, mask = left_padded()
    with torch.no_grad():
        unpadded = answer_logits(model, ROW, torch.ones_like(ROW), PROMPT_LEN).log_softmax(-1)
        padded = answer_logits(model, seq, mask, PROMPT_LEN + PADS).log_softmax(-1)
        # without positions, GPT-2 numbers the padding too: answer log-probs differed by 0.27 here
        torch.testing.assert_close(padded, unpadded, atol=1e-5, rtol=0)
        keep = torch.zeros_like(seq, dtype=torch.bool)
        keep[:, PADS:] = True
        torch.testing.assert_close(logits_at(model, seq, mask, keep),
                                   logits_at(model, ROW, torch.ones_like(ROW), torch.ones_like(ROW).bool()),
                                   atol=1e-5, rtol=0)


def test_generation_positions_match_the_training_forward_on_left_padded_prompts():
    """HF generate counts positions from the mask itself; the forward's log-probs of a rollout now agree with it."""
    from dschat.algos.losses import logprobs_from_logits
    from dschat.models.forward import answer_logits
    from dschat.trainers.rollout import generate_rollout

    model = tiny_gpt2()
    fmt = SimpleNamespace(pad_token_id=0, eos_token_id=2)
    prompt = torch.tensor([[0, 0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]])
    prompt_mask = (prompt != 0).long()
    rollout = generate_rollout(model, fmt, prompt, prompt_mask, with_logprobs=True, max_new_tokens=5, do_sample=False)
    alone = generate_rollout(model, fmt, prompt[:1, 3:], prompt_mask[:1, 3:], max_new_tokens=5, do_sample=False)
    assert torch.equal(rollout.seq[:1, 3:], alone.seq)  # padding changes nothing in sampling ...
    with torch.no_grad():
        logits = answer_logits(model, rollout.seq, rollout.attention_mask, rollout.prompt_len)
    forward = logprobs_from_logits(logits, rollout.seq[:, rollout.prompt_len:])
    mask = rollout.action_mask.bool()
    torch.testing.assert_close(forward[mask], rollout.logprobs[mask], atol=1e-5, rtol=0)  # ... nor in the forward


def test_token_values_of_a_left_padded_row_equal_the_unpadded_ones():
    from dschat.models.heads import token_values

    model = tiny_gpt2(GPT2ForSequenceClassification, num_labels=1)
    seq, mask = left_padded()
    with torch.no_grad():
        torch.testing.assert_close(token_values(model, seq, mask)[:, PADS:],
                                   token_values(model, ROW, torch.ones_like(ROW)), atol=1e-5, rtol=0)


def test_position_ids_count_attended_tokens_only():
    from dschat.models.heads import position_ids_from_mask

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


# 11. DPO's policy trains without dropout unless --dropout asks for it.
@pytest.mark.parametrize("flag,expected", [(None, 0.0), (0.2, 0.2)])
def test_dpo_policy_has_no_dropout_by_default(tmp_path, flag, expected):
    from dschat.models.heads import has_dropout
    from dschat.trainers.dpo import DPORun

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")  # GPT-2's config carries dropout 0.1
    args = Namespace(model_name_or_path=str(tmp_path / "gpt2"), dropout=flag, gradient_checkpointing=False,
                     trust_remote_code=False)
    policy = DPORun.build_model(SimpleNamespace(args=args, tokenizer=None), {}, torch.float32)
    assert (policy.config.resid_pdrop, policy.config.attn_pdrop, policy.config.embd_pdrop) == (expected,) * 3
    assert has_dropout(policy) == (expected > 0)


# 14. --deepspeed_config FILE is refused, not silently ignored.
def step_module(path: Path) -> ModuleType:
    """A step's main.py as a module (its parse_args, without running it)."""
    spec = importlib.util.spec_from_file_location(f"step_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("step,zero_flag", [pytest.param(STEP1, "--zero_stage", id="step1"),
                                            pytest.param(STEP2, "--zero_stage", id="step2"),
                                            pytest.param(DPO, "--zero_stage", id="dpo"),
                                            pytest.param(STEP3, "--actor_zero_stage", id="step3")])
@pytest.mark.parametrize("flag", ["--deepspeed_config", "--deepscale_config"])
def test_every_step_refuses_a_deepspeed_config_file(tmp_path, step, zero_flag, flag):
    config = tmp_path / "ds.json"
    config.write_text('{"zero_optimization": {"stage": 3}}')
    with pytest.raises(FlagError) as err:
        step_module(step).parse_args([flag, str(config), "--deepspeed"])
    message = str(err.value)
    assert message.startswith(f"{flag} {config} is not read") and "\n" not in message
    assert zero_flag in message and "--dtype" in message and "--gradient_accumulation_steps" in message
    step_module(step).parse_args(["--deepspeed"])  # DeepSpeed-Chat's scripts pass --deepspeed: still accepted


def test_deepspeed_config_is_a_one_line_user_error_that_writes_nothing(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text("{}")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(STEP3), "--deepspeed_config", str(config), "--output_dir", str(out),
                           "--data_output_path", str(tmp_path / "data")], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--deepspeed_config" in errors[0] and "--actor_zero_stage" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.json"]
