"""The builtin model: a tiny Llama with a byte-level BPE tokenizer trained on the builtin corpus.

It ships in `dschat/assets/tiny-llama/` as an ordinary Hugging Face model directory; `make_builtin_model`
re-creates it deterministically (`python scripts/make_builtin_model.py`).
"""

from __future__ import annotations

from pathlib import Path

BUILTIN_MODEL_DIR = str(Path(__file__).resolve().parents[2] / "assets" / "tiny-llama")
BUILTIN_ALIASES = ("builtin", "dschat/builtin")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


def resolve_builtin(path: str) -> str:
    """Map the names "builtin"/"dschat/builtin" to the shipped model directory; others unchanged."""
    return BUILTIN_MODEL_DIR if path in BUILTIN_ALIASES else path


def make_builtin_model(out_dir: str = BUILTIN_MODEL_DIR, seed: int = 0) -> None:
    """Train the tokenizer on the builtin corpus and save it with a freshly initialised tiny Llama."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from dschat.utils.data.builtin_task import corpus_text

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
    model.generation_config.pad_token_id = ids[0]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
