"""Prompt formats: DeepSpeed-Chat text and chat templates, through all three steps, evaluation and chat."""

from __future__ import annotations

import json
import shutil

import pytest

from dschat.data.prompts import PromptFormat, resolve_format, to_messages
from dschat.models.builtin import BUILTIN_MODEL_DIR
from dschat.models.loading import load_tokenizer
from dschat.runtime.errors import FlagError
from tests.helpers import QUICK_STEP1, REPO, STEP1, STEP2, STEP3, metrics, run

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def templated_model(tmp_path_factory):
    """The builtin model with a ChatML chat template and its two special tokens."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chatml") / "model"
    shutil.copytree(BUILTIN_MODEL_DIR, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return folder


def test_dschat_prompts_become_role_messages():
    assert to_messages("Human: Hi, I am Ann. Name some fruits. Assistant:") == [
        {"role": "user", "content": "Hi, I am Ann. Name some fruits."}]
    hh = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    assert to_messages(hh) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                               {"role": "user", "content": "how are you?"}]
    assert to_messages("plain question") == [{"role": "user", "content": "plain question"}]


def test_formats_resolve_and_refuse_what_cannot_work(templated_model):
    plain = load_tokenizer("builtin")
    templated = load_tokenizer(str(templated_model))
    assert resolve_format(plain, "auto") == "dschat" and resolve_format(templated, "auto") == "chat_template"
    assert resolve_format(templated, "dschat") == "dschat"
    with pytest.raises(FlagError, match="has no chat template"):
        resolve_format(plain, "chat_template")


def test_chat_template_ids_and_end_of_turn(templated_model):
    tok = load_tokenizer(str(templated_model))
    fmt = PromptFormat.create(tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert fmt.kind == "chat_template" and fmt.eos_token_id == im_end != tok.eos_token_id
    prompt = "Human: Hi, I am Ann. Name some fruits. Assistant:"
    expected = tok.apply_chat_template([{"role": "user", "content": "Hi, I am Ann. Name some fruits."}],
                                       add_generation_prompt=True, tokenize=False)
    assert fmt.render(prompt) == expected
    assert fmt.prompt_ids(prompt) == tok(expected, add_special_tokens=False)["input_ids"]
    assert fmt.answer_ids(" pear, banana.") == tok("pear, banana.", add_special_tokens=False)["input_ids"] + [im_end]
    plain = PromptFormat.create(load_tokenizer("builtin"))
    assert plain.kind == "dschat" and plain.answer_ids(" pear.")[-1] == plain.tokenizer.eos_token_id


def test_three_steps_and_chat_through_the_template(tmp_path, templated_model):
    data = tmp_path / "data"
    sft, rm, s3 = tmp_path / "sft", tmp_path / "rm", tmp_path / "s3"
    run([STEP1, "--model_name_or_path", templated_model, "--output_dir", sft, "--data_output_path", data,
         *QUICK_STEP1])
    # the tokenised phase-1 rows are rendered through the template and end with <|im_end|>
    cache = next(p for p in data.iterdir() if p.name.startswith("phase1_"))
    settings = json.loads((cache / "settings.json").read_text())["settings"]
    assert settings["prompt_format"] == "chat_template"
    from datasets import load_from_disk

    tok = load_tokenizer(str(sft))
    row = load_from_disk(str(cache / "train"))[0]
    text = tok.decode(row["input_ids"])
    assert text.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in text
    assert row["input_ids"][-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.chat_template == CHATML  # saved with the model, so chat.py uses the same format
    assert "judge" in metrics(sft)["evals"][-1]
    run([STEP2, "--model_name_or_path", sft, "--output_dir", rm, "--data_output_path", data, "--data_split",
         "1,2,97", "--max_seq_len", "96", "--num_train_epochs", "1", "--eval_iters", "2"])
    proc = run([STEP3, "--actor_model_name_or_path", sft, "--critic_model_name_or_path", rm, "--output_dir", s3,
                "--data_output_path", data, "--per_device_generation_batch_size", "4",
                "--per_device_training_batch_size", "4", "--max_answer_seq_len", "8", "--num_judge_prompts", "4",
                "--enable_test_mode", "--test_stop_step", "1", "--enable_hybrid_engine"])
    assert "judge score" in proc.stdout
    proc = run([REPO / "chat.py", "--path", s3 / "actor", "--prompt", "Hi, I am Ann. Name some fruits.",
                "--max_new_tokens", "8"])
    assert proc.stdout.strip()
