"""Prompt formats: DeepSpeed-Chat text and chat templates, through all three steps, evaluation and chat."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dschat.data.prompts import PromptFormat, carry_template, render_dschat, resolve_format, to_messages
from dschat.models.builtin import BUILTIN_MODEL_DIR
from dschat.models.loading import load_tokenizer
from dschat.runtime.errors import FlagError
from tests.helpers import QUICK_STEP1, REPO, STEP1, STEP2, STEP3, metrics, run

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chatml_copy(folder):
    """A copy of the builtin model in `folder` with a ChatML chat template and its two special tokens."""
    from transformers import AutoTokenizer

    shutil.copytree(BUILTIN_MODEL_DIR, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def templated_model(tmp_path_factory):
    """The builtin model with a ChatML chat template and its two special tokens."""
    return chatml_copy(tmp_path_factory.mktemp("chatml") / "model")


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


# ---- issue 26: messages stay data until the template ---------------------------------------------------------

BEFORE = json.loads((REPO / "tests" / "token_ids_before_issue26.json").read_text())
SHARED_HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


@pytest.mark.skipif(not SHARED_HH.exists(), reason="../shared/data (real HH-RLHF data) is not beside the repo")
@pytest.mark.parametrize("kind", ["builtin", "chatml"])
def test_text_data_tokenises_to_the_same_ids_as_before(kind, templated_model):
    """Builtin rows and HH rows give the ids the code before issue 26 gave (hashes computed from `git archive`
    of that commit with the same selection: 400 train + 100 eval builtin rows, the first 100 usable HH rows)."""
    import gzip
    import hashlib

    from dschat.data.builtin_task import builtin_dataset
    from dschat.data.phases import tokenize_row
    from dschat.data.sources import normalize_row

    data = builtin_dataset()
    hh = []
    with gzip.open(SHARED_HH, "rt") as f:
        for i, line in enumerate(f):
            row = normalize_row(json.loads(line), f"hh:{i}")
            if row is not None:
                hh.append(row)
            if len(hh) >= 100:
                break
    fmt = PromptFormat.create(load_tokenizer("builtin" if kind == "builtin" else str(templated_model)))
    for name, rows in (("builtin", data["train"][:400] + data["eval"][:100]), ("hh", hh)):
        for phase in (1, 2, 3):
            enc = [tokenize_row(r, fmt, phase, 512, 256, False) for r in rows]
            enc = [{k: v for k, v in e.items() if k not in ("prompt_json", "fields")} if e else None for e in enc]
            digest = hashlib.sha256(json.dumps(enc, sort_keys=True).encode()).hexdigest()
            assert BEFORE[f"{kind}/{name}/phase{phase}"] == {"rows": len(enc), "sha256": digest}, (name, phase)


def test_messages_render_through_the_template_unchanged(templated_model):
    tok = load_tokenizer(str(templated_model))
    fmt = PromptFormat.create(tok)
    messages = [{"role": "system", "content": "You summarise."},
                _user("Summarise: Human: hello Assistant: hi there"), _bot("A greeting."), _user("And Human: this?")]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert fmt.render(messages) == expected
    assert "<|im_start|>system\nYou summarise.<|im_end|>" in expected
    assert "<|im_start|>user\nSummarise: Human: hello Assistant: hi there<|im_end|>" in expected
    assert fmt.prompt_ids(messages) == tok(expected, add_special_tokens=False)["input_ids"]
    # without a template: DeepSpeed-Chat text from the messages, the content kept as it is
    plain = PromptFormat.create(load_tokenizer("builtin"))
    assert plain.render(messages) == ("You summarise. Human: Summarise: Human: hello Assistant: hi there "
                                      "Assistant: A greeting. Human: And Human: this? Assistant:")
    assert plain.render([_user("Hi, I am Ann. Name some fruits.")]) == "Human: Hi, I am Ann. Name some fruits. Assistant:"


@pytest.mark.parametrize("kind", ["builtin", "chatml"])
def test_a_conversation_trains_on_every_assistant_turn(kind, templated_model):
    from dschat.data.phases import tokenize_row

    tok = load_tokenizer("builtin" if kind == "builtin" else str(templated_model))
    fmt = PromptFormat.create(tok)
    messages = [{"role": "system", "content": "Be brief."}, _user("Name a fruit."), _bot("apple."),
                _user("Another?"), _bot("pear.")]
    row = {"prompt": messages[:-1], "chosen": messages[-1:], "rejected": None, "conversation": True}
    out = tokenize_row(row, fmt, 1, 512, 256, False)
    ids, labels = out["input_ids"], out["labels"]
    spans, run = [], []
    for i, label in enumerate(labels):
        if label != -100:
            run.append(ids[i])
        elif run:
            spans.append(run)
            run = []
    spans.append(run)
    end = [fmt.eos_token_id] if kind == "chatml" else []  # DeepSpeed-Chat text writes no EOS between turns
    assert spans == [fmt.answer_ids(_bot("apple."), end=bool(end)), fmt.answer_ids(_bot("pear."))]
    # the tokens before the last turn are that turn's prompt as rendered for generation (chat.py's prompt)
    first_loss_of_last = len(ids) - len(spans[-1])
    assert tok.decode(ids[:first_loss_of_last]) == tok.decode(fmt.prompt_ids(messages[:-1]))
    if kind == "chatml":
        assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False).rstrip("\n")
    else:
        assert tok.decode(ids[:-1]) == render_dschat(messages, add_generation_prompt=False)
    last = tokenize_row(row, fmt, 1, 512, 256, False, last_turn_only=True)
    assert last["input_ids"] == ids and [t for t in last["labels"] if t != -100] == spans[-1]
    # a prompt-completion row with the same turns: loss on the completion only
    pc = tokenize_row({"prompt": messages[:-1], "chosen": messages[-1:], "rejected": None}, fmt, 1, 512, 256, False)
    assert pc == last


@pytest.mark.parametrize("kind", ["builtin", "chatml"])
def test_conversational_pairs_and_prompts_through_the_cache(kind, templated_model, tmp_path):
    from datasets import load_from_disk

    from dschat.data.collators import PromptCollator
    from dschat.data.phases import DataSettings, load_phase_data

    tok = load_tokenizer("builtin" if kind == "builtin" else str(templated_model))
    fmt = PromptFormat.create(tok)
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"prompt": [{"role": "system", "content": "Be kind."}, _user(f"q{i}")],
                                     "chosen": [_bot("yes")], "rejected": [_bot("no")], "id": i}) + "\n"
                         for i in range(20)))
    common = {"data_path": (str(f),), "seed": 1, "prompt_format": fmt.kind}
    two = load_phase_data(DataSettings(data_split="0,1,0", phase=2, **common), tok, str(tmp_path / "cache"))
    row = two["train"][0]
    n = row["prompt_len"]
    assert row["chosen_ids"][:n] == row["rejected_ids"][:n]
    assert any(row["chosen_ids"][:n] == fmt.prompt_ids([{"role": "system", "content": "Be kind."}, _user(f"q{i}")])
               for i in range(20))
    assert row["chosen_ids"][n:] == fmt.answer_ids(_bot("yes")) and row["rejected_ids"][n:] == fmt.answer_ids(_bot("no"))
    three = load_phase_data(DataSettings(data_split="0,0,1", phase=3, **common), tok, str(tmp_path / "cache"))
    batch = PromptCollator(tok.pad_token_id)([three["train"][i] for i in range(2)])
    for prompt, fields, ids in zip(batch["prompt_text"], batch["fields"], batch["prompt"]):
        assert prompt == [{"role": "system", "content": "Be kind."}, _user(f"q{fields['id']}")]  # messages again
        assert [t for t in ids.tolist() if t != tok.pad_token_id] == fmt.prompt_ids(prompt)
    assert load_from_disk(str(Path(three["folder"]) / "train")).features["prompt_json"].dtype == "string"
    held = [r["prompt"] for r in three["eval"].select(range(1))]  # as step 3 reads its held-out prompts
    assert held[0][0] == {"role": "system", "content": "Be kind."} and held[0][1]["content"].startswith("q")


@pytest.mark.parametrize("kind", ["builtin", "chatml", "chatml_trained_as_dschat"])
def test_saved_model_reproduces_its_training_prompt_through_apply_chat_template(kind, templated_model, tmp_path):
    """Every saved model carries the template of the format it was trained in: the DeepSpeed-Chat format's renders
    the training text byte for byte (builtin data's text prompts too), a chat-template model keeps its own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dschat.data.builtin_task import builtin_dataset
    from dschat.data.phases import tokenize_row
    from dschat.models.export import save_hf_model

    tok = load_tokenizer(str(templated_model) if kind.startswith("chatml") else "builtin")
    fmt = PromptFormat.create(tok, "dschat" if kind == "chatml_trained_as_dschat" else "auto")
    if kind == "chatml_trained_as_dschat":  # what a step does with its tokenizer (trainers/base.py); a tokenizer
        carry_template(tok, fmt.kind)  # without a template gets the DeepSpeed-Chat one from save_hf_model itself
    model = AutoModelForCausalLM.from_pretrained(BUILTIN_MODEL_DIR)
    model.resize_token_embeddings(len(tok))
    save_hf_model(model, tok, str(tmp_path / "out"))
    saved = AutoTokenizer.from_pretrained(tmp_path / "out")  # plain transformers, as serving tools load it
    messages = [{"role": "system", "content": "Be brief."}, _user("Hi, I am Ann. Name some fruits."),
                _bot("apple, pear."), _user("Summarise: Human: hello Assistant: bye")]
    training_prompt = fmt.render(messages)
    assert saved.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == training_prompt
    ids = saved.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert list(ids) == fmt.prompt_ids(messages)
    again = PromptFormat.create(load_tokenizer(str(tmp_path / "out")))
    assert again.kind == fmt.kind and again.render(messages) == training_prompt
    if kind == "chatml":
        assert saved.chat_template == CHATML
        return
    assert training_prompt == ("Be brief. Human: Hi, I am Ann. Name some fruits. Assistant: apple, pear. Human: "
                               "Summarise: Human: hello Assistant: bye Assistant:")
    row = builtin_dataset()["train"][0]  # text data: the template writes the very prompt step 1 trained on
    question = row["prompt"].removeprefix("Human: ").removesuffix(" Assistant:")
    assert saved.apply_chat_template([_user(question)], add_generation_prompt=True, tokenize=False) == row["prompt"]
    assert again.prompt_ids(row["prompt"]) == tokenize_row(row, fmt, 3, 512, 256, False)["prompt_ids"]


def test_print_examples_shows_each_step_its_rows_as_tokenised_and_trains_nothing(tmp_path, templated_model):
    conv = tmp_path / "conv.jsonl"
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, _user("Name a fruit."), _bot("apple."),
                          _user("Another?"), _bot("pear.")]}] * 4
    conv.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"chosen": [_user("Sky?"), _bot("blue.")], "rejected": [_user("Sky?"),
                                         _bot("green.")]}) + "\n" for _ in range(4)))
    common = ["--data_output_path", tmp_path / "cache", "--print_examples", "2"]
    out = run([STEP1, "--data_path", conv, "--data_split", "1,0,0", *common]).stdout
    assert "Be brief. Human: Name a fruit. Assistant:[[ apple.]] Human: Another? Assistant:[[ pear.</s>]]" in out
    out = run([STEP1, "--model_name_or_path", templated_model, "--data_path", conv, "--data_split", "1,0,0",
               "--last_turn_only", *common]).stdout
    assert ("<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\n[[pear.<|im_end|>]]" in out
            and "[[apple" not in out and "<|im_start|>system\nBe brief.<|im_end|>" in out)
    for step in (STEP2, REPO / "training" / "step2_dpo_finetuning" / "main.py"):
        out = run([step, "--model_name_or_path", templated_model, "--data_path", pairs, "--data_split", "0,1,0",
                   *common]).stdout
        assert "<|im_start|>user\nSky?<|im_end|>\n<|im_start|>assistant\n[[blue.<|im_end|>]]" in out
        assert "[[green.<|im_end|>]]" in out
    out = run([STEP3, "--actor_model_name_or_path", templated_model, "--reward_fn", "builtin_judge",
               "--advantage_estimator", "grpo", "--n_samples_per_prompt", "2", "--data_path", pairs,
               "--data_split", "0,0,1", *common]).stdout
    assert "<|im_start|>user\nSky?<|im_end|>\n<|im_start|>assistant\n[[<answer sampled here>]]" in out
    assert not (tmp_path / "cache").exists()  # nothing tokenised into the cache, nothing trained


def test_conversational_files_through_steps_1_2_3_and_chat(tmp_path, templated_model):
    """A test-sized pipeline on conversational data: step 1 on `messages`, step 2 on conversational pairs (implicit
    prompt), step 3 on their prompts with a rule reward; the actor answers in chat.py."""
    conv, pairs = tmp_path / "conv.jsonl", tmp_path / "pairs.jsonl"
    fruits = ["apple", "pear", "plum", "kiwi", "lemon", "mango"]
    conv.write_text("".join(json.dumps({"messages": [{"role": "system", "content": "Answer with fruits."},
                                                     _user(f"Name {k} fruits."), _bot(", ".join(fruits[:k]) + ".")]})
                            + "\n" for k in range(1, 7) for _ in range(8)))
    pairs.write_text("".join(json.dumps({"chosen": [_user(f"Name {k} fruits."), _bot(", ".join(fruits[:k]) + ".")],
                                         "rejected": [_user(f"Name {k} fruits."), _bot("dog.")]}) + "\n"
                             for k in range(1, 7) for _ in range(8)))
    data, sft, rm, s3 = tmp_path / "data", tmp_path / "sft", tmp_path / "rm", tmp_path / "s3"
    run([STEP1, "--model_name_or_path", templated_model, "--data_path", conv, "--data_split", "1,0,0",
         "--output_dir", sft, "--data_output_path", data, "--max_seq_len", "64", "--eval_iters", "2",
         "--num_judge_prompts", "0"])
    run([STEP2, "--model_name_or_path", sft, "--data_path", pairs, "--data_split", "0,1,0", "--output_dir", rm,
         "--data_output_path", data, "--max_seq_len", "64", "--num_train_epochs", "1", "--eval_iters", "2"])
    run([STEP3, "--actor_model_name_or_path", sft, "--critic_model_name_or_path", rm, "--data_path", pairs,
         "--data_split", "0,0,1", "--output_dir", s3, "--data_output_path", data,
         "--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "4",
         "--max_answer_seq_len", "8", "--num_judge_prompts", "4", "--enable_test_mode", "--test_stop_step", "1"])
    saved = load_tokenizer(str(s3 / "actor"))
    assert saved.chat_template == CHATML
    proc = run([REPO / "chat.py", "--path", s3 / "actor", "--prompt", "Name 2 fruits.", "--max_new_tokens", "8"])
    assert proc.returncode == 0


def test_dschat_template_puts_the_bos_in_front_where_the_tokenizer_adds_one():
    from dschat.data.prompts import adds_bos

    tok = load_tokenizer("builtin")
    tok.add_bos_token = True
    assert adds_bos(tok)
    fmt = PromptFormat.create(tok)
    carry_template(tok, fmt.kind)
    messages = [_user("Hi"), _bot("Hello."), _user("Fruit?")]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == tok.bos_token + fmt.render(messages) == "<s>Human: Hi Assistant: Hello. Human: Fruit? Assistant:"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert list(ids) == fmt.prompt_ids(messages)


def test_prompt_eval_takes_text_or_a_json_message_list():
    import importlib.util

    spec = importlib.util.spec_from_file_location("prompt_eval", REPO / "training" / "step1_supervised_finetuning"
                                                  / "prompt_eval.py")
    prompt_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prompt_eval)
    assert prompt_eval.parse_prompt("Human: hi Assistant:") == "Human: hi Assistant:"
    assert prompt_eval.parse_prompt('[{"role": "user", "content": "Human: hi"}]') == [_user("Human: hi")]
    from dschat.runtime.errors import DatasetError

    with pytest.raises(DatasetError, match="--prompt: field 'prompt' message 0: unknown role 'bot'"):
        prompt_eval.parse_prompt('[{"role": "bot", "content": "x"}]')
