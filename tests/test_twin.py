"""Issue 27 item 8: the hybrid twin is built on the meta device and refreshed one layer at a time (under ZeRO-3
each layer gathered alone), and computes the engine's logits, on one rank and on two ZeRO-3 ranks."""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM

from dschat.runtime import dist
from tests.helpers import free_port


def test_layer_groups_split_by_decoder_layer_in_order():
    from dschat.trainers.rollout import layer_groups, layer_of

    assert layer_of("base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight") == \
        "base_model.model.model.layers.3"
    assert layer_of("model.embed_tokens.weight") == "model.embed_tokens"
    assert layer_of("lm_head.weight") == "lm_head"
    names = ["model.embed_tokens.weight", "model.layers.0.a.weight", "model.layers.0.b.weight",
             "model.layers.1.a.weight", "model.norm.weight", "lm_head.weight"]
    groups = layer_groups((n, torch.zeros(1)) for n in names)
    assert [[n for n, _ in g] for g in groups] == [names[:1], names[1:3], names[3:4], names[4:5], names[5:]]


def test_gather_units_never_gather_a_lone_partition():
    """DeepSpeed gathers a lone parameter through a path that allocates it twice: each unit fetches 0 or 2+."""
    from dschat.trainers.rollout import gather_units

    def param(partitioned: bool = True, persist: bool = False) -> torch.nn.Parameter:
        p = torch.nn.Parameter(torch.zeros(1))
        if partitioned:
            p.ds_id, p.ds_persist = 0, persist
        return p

    named = [("model.embed_tokens.weight", param()), ("model.layers.0.a.weight", param()),
             ("model.layers.0.norm.weight", param(persist=True)), ("model.layers.1.a.weight", param()),
             ("model.layers.1.b.weight", param()), ("model.norm.weight", param(persist=True)),
             ("lm_head.weight", param())]
    units = [[n.split(".weight")[0] for n, _ in u] for u in gather_units(named)]
    assert units == [["model.embed_tokens", "model.layers.0.a", "model.layers.0.norm"],
                     ["model.layers.1.a", "model.layers.1.b", "model.norm", "lm_head"]]
    plain = [("model.embed_tokens.weight", param(False)), ("lm_head.weight", param(False))]
    assert [len(u) for u in gather_units(plain)] == [1, 1]  # nothing to gather: one unit per layer


def zero3_engine(stage: int = 3, dtype: str = "fp32", lora_b: float | None = None):
    """The builtin model in a DeepSpeed engine at `stage` on this process group (world of one or more); with
    `lora_b`, LoRA (rank 4) on its decoder layers with B matrices of that size (so the adapters count)."""
    from dschat.models.loading import create_hf_model, load_tokenizer
    from dschat.runtime.ds_config import get_train_ds_config
    from dschat.runtime.engine import build_engine, torch_dtype

    torch.manual_seed(0)
    tok = load_tokenizer("builtin", padding_side="left")
    cfg = get_train_ds_config(stage=stage, dtype=dtype, micro_batch=2, world_size=dist.world_size())
    model = create_hf_model(AutoModelForCausalLM, "builtin", tok, cfg, torch_dtype(dtype))
    if lora_b is not None:
        from dschat.models.lora import apply_lora

        model = apply_lora(model, 4, "layers.", False)
        g = torch.Generator().manual_seed(3)
        for name, param in model.named_parameters():
            assert param.dtype == torch_dtype(dtype), name  # adapters in the engine's dtype (ZeRO-3 needs one)
            if "lora_B" in name:
                with dist.gathered([param], modifier_rank=0), torch.no_grad():
                    param.copy_(torch.randn(param.shape, generator=g) * lora_b)
    return build_engine(model, cfg, 1e-3, 0.0, 1e-3, "constant", 0, 10), tok


def twin_versus_engine(engine, tok) -> dict:
    """diff: max |twin - engine| logits after a refresh; size: max |logits|; adapters: max |engine - engine with
    adapters off| (0 without LoRA); calls: the tensors each gather of the refresh fetched."""
    from dschat.data.prompts import PromptFormat
    from dschat.trainers.rollout import Generator

    dev = next(engine.module.parameters()).device
    ids = torch.randint(3, 800, (2, 12), generator=torch.Generator().manual_seed(4)).to(dev)
    mask = torch.ones_like(ids)
    gen = Generator(engine, PromptFormat(tok), hybrid=True, zero_stage=3)
    calls: list[int] = []
    original = dist.gathered

    def recording(params, modifier_rank=None):
        params = list(params)
        calls.append(sum(dist.needs_gather(p) for p in params))
        return original(params, modifier_rank)

    engine.module.eval()
    with torch.no_grad():
        actor = engine(input_ids=ids, attention_mask=mask).logits.float()
        adapters = 0.0
        if hasattr(engine.module, "disable_adapter"):
            with engine.module.disable_adapter():
                adapters = (engine(input_ids=ids, attention_mask=mask).logits.float() - actor).abs().max().item()
        gen._refresh_twin()  # the first build
        dist.gathered = recording
        try:
            twin = gen._refresh_twin()
        finally:
            dist.gathered = original
        twin_logits = twin(input_ids=ids, attention_mask=mask).logits.float()
    return {"diff": (twin_logits - actor).abs().max().item(), "size": actor.abs().max().item(), "calls": calls,
            "adapters": adapters}


def test_twin_is_built_on_meta_and_refreshed_layer_by_layer_under_zero3(world_of_one):
    from dschat.models.export import unwrap
    from dschat.trainers.rollout import build_twin

    engine, tok = zero3_engine(lora_b=1e-2)
    module = unwrap(engine.module)
    assert all(hasattr(p, "ds_id") for p in module.parameters())  # really partitioned
    rng = torch.get_rng_state()
    empty = build_twin(module)
    assert all(t.is_meta for t in [*empty.parameters(), *empty.buffers()])  # no memory, no random init
    assert torch.equal(rng, torch.get_rng_state())
    out = twin_versus_engine(engine, tok)
    calls = out["calls"]
    assert out["adapters"] > 0.1 and out["diff"] <= 1e-5 * out["size"], out  # the adapters count, and are copied
    n_layers = module.config.num_hidden_layers
    fetched = sum(dist.needs_gather(p) for p in module.parameters())
    per_layer = sum(dist.needs_gather(p) for n, p in module.named_parameters() if ".layers.1." in n)
    # the embeddings with the first decoder layer, then one decoder layer a gather: never the whole model
    assert per_layer > 1 and len(calls) >= n_layers, calls
    assert max(calls) <= per_layer + 1 < fetched and sum(calls) == fetched, calls


def _parity_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_distributed()
    engine, tok = zero3_engine(dtype="bf16", lora_b=1e-2)  # LoRA too: bf16 adapters under ZeRO-3
    torch.save(twin_versus_engine(engine, tok), f"{out_dir}/rank{rank}.pt")
    dist.barrier()


def test_twin_equals_the_engine_on_two_zero3_ranks_in_bf16(tmp_path):
    """Two gloo ranks, each holding half of every weight (LoRA adapters included): the layer-by-layer refresh gives
    each rank a whole twin whose bf16 logits are the ZeRO-3 engine's."""
    import torch.multiprocessing as mp

    mp.spawn(_parity_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        out = torch.load(tmp_path / f"rank{r}.pt")
        bf16_step = 2.0 ** (torch.log2(torch.tensor(out["size"])).floor().item() - 7)
        assert out["diff"] <= 2 * bf16_step, out
        assert max(out["calls"]) < sum(out["calls"]), out["calls"]  # one layer a gather, not the model
