"""Rewards as a registry: hand values for accuracy/overlong/pass@k, TRL's calling convention, bad reward functions,
rows' columns reaching the rewards, and step 3 trained against a rule with no reward model (1 and 2 ranks)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dschat.rewards.combine import RewardBatch, RewardSet, pass_at_k, pass_ks, resolve_spec
from dschat.rewards.registry import RewardContext
from dschat.rewards.rules import accuracy, answers_match, final_answer, overlong_penalty, reference_answer
from dschat.runtime.errors import DatasetError, FlagError, RewardFunctionError
from tests.helpers import STEP3, metrics, run
from tests.test_chat import chatml_model  # noqa: F401,F811  (a fixture)

# ---- accuracy: the final answer and its comparison ----------------------------------------------------------

FINAL_ANSWERS = [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),  # GSM8K
    ("#### 1,000", "1,000"),
    ("so it is \\boxed{42}.", "42"),
    ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last box, nested braces
    ("The answer is -5.", "-5"),  # negatives, a sentence's full stop is not a decimal point
    ("It costs 3.75 dollars", "3.75"),
    ("between 2 and 10, so 1,250,000 in all", "1,250,000"),  # thousands separators
    ("1,2,3", "3"),  # a list is not a thousands number
    ("no numbers here", None),
    ("", None),
    ("#### \n the answer is 12", "12"),  # an empty #### falls through to the last number
    ("x = .5", ".5"),
]


@pytest.mark.parametrize("text,expected", FINAL_ANSWERS)
def test_final_answer_extraction(text, expected):
    assert final_answer(text) == expected


MATCHES = [
    ("1,000", "1000", True), ("1000.0", "1000", True), ("$18", "18", True), ("7.", "7", True),
    ("-3", "-3.0", True), ("3", "-3", False), ("0.1", "0.10", True), ("Paris", " paris ", True),
    ("Paris", "London", False), (None, "3", False), ("12%", "12", True), ("1e3", "1000", False),
]


@pytest.mark.parametrize("predicted,reference,equal", MATCHES)
def test_answers_compare_as_numbers_else_as_folded_text(predicted, reference, equal):
    assert answers_match(predicted, reference) is equal


def test_reference_answers_take_gsm8k_and_boxed_forms():
    assert reference_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert reference_answer("hence \\boxed{5}") == "5"
    assert reference_answer(" 1,000 ") == "1,000"
    assert reference_answer(72) == "72"


def test_accuracy_reads_answer_solution_or_ground_truth_and_refuses_rows_without_one():
    completions = ["so 72", "#### 71", "\\boxed{72}"]
    assert accuracy(["q"] * 3, completions, answer=["#### 72"] * 3) == [1.0, 0.0, 1.0]
    assert accuracy(["q"], ["it is 5"], solution=["\\boxed{5}"]) == [1.0]
    assert accuracy(["q"], ["it is 5"], ground_truth=[5]) == [1.0]
    assert accuracy(["q"], [[{"role": "assistant", "content": "#### 9"}]], answer=["9"]) == [1.0]  # conversational
    with pytest.raises(DatasetError, match="answer, solution, ground_truth"):
        accuracy(["q"], ["5"], question=["x"])


# ---- overlong and pass@k -----------------------------------------------------------------------------------

@pytest.mark.parametrize("length,expected", [(0, 0.0), (12, 0.0), (13, -0.25), (14, -0.5), (16, -1.0), (30, -1.0)])
def test_overlong_penalty_hand_values(length, expected):
    assert overlong_penalty(length, max_len=16, buffer_len=4) == pytest.approx(expected)


def test_overlong_reward_counts_answer_tokens():
    fn = resolve_spec("overlong").make(RewardContext(max_answer_seq_len=8, overlong_buffer_len=4))
    assert fn(["p"] * 3, ["a"] * 3, completion_ids=[[1] * 4, [1] * 6, [1] * 8]) == [0.0, -0.5, -1.0]
    default = resolve_spec("overlong").make(RewardContext(max_answer_seq_len=8))  # L_cache = 8 // 4
    assert default(["p"], ["a"], completion_ids=[[1] * 7]) == [-0.5]


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # 0.5
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(5, 2, 4) == 1.0  # fewer wrong than k: always a hit
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    assert pass_ks(1) == [1] and pass_ks(4) == [1, 2, 4] and pass_ks(6) == [1, 2, 4, 6]


# ---- several rewards, TRL's calling convention, bad functions -----------------------------------------------

def batch(n: int = 3, **columns) -> RewardBatch:
    fields = [{k: v[i] for k, v in columns.items()} for i in range(n)]
    return RewardBatch([f"p{i}" for i in range(n)], [f"c{i}" for i in range(n)], [[1] * (i + 1) for i in range(n)],
                       fields)


def make_set(fns, weights=None) -> RewardSet:
    from dschat.rewards.registry import RewardSpec

    def constant(fn):
        return lambda _ctx: fn

    specs = [RewardSpec(f.__name__, constant(f)) for f in fns]
    return RewardSet(specs, weights or [1.0] * len(fns), RewardContext())


def test_weighted_sum_leaves_out_none_and_logs_each_reward():
    def first(completions, **kw):
        return [1.0, None, 3.0]

    def second(completions, **kw):
        return [10.0, 20.0, None]

    result = make_set([first, second], [1.0, 0.5])(batch())
    assert result.values == {"first": [1.0, None, 3.0], "second": [10.0, 20.0, None]}
    assert result.total.tolist() == [6.0, 10.0, 3.0]


def test_a_trl_style_function_gets_the_rows_columns():
    seen = {}

    def trl_style(completions, answer, **kwargs):
        seen.update(kwargs, answer=answer)
        return [float(c == f"c{a}") for c, a in zip(completions, answer)]

    def narrow(prompts, completion_ids):  # no **kwargs: given only what it names
        return [float(len(ids)) for ids in completion_ids]

    result = make_set([trl_style, narrow])(batch(answer=[0, 5, 2], level=["easy", "hard", "easy"]))
    assert result.values["trl_style"] == [1.0, 0.0, 1.0]
    assert result.values["narrow"] == [1.0, 2.0, 3.0]
    assert seen["answer"] == [0, 5, 2] and seen["level"] == ["easy", "hard", "easy"]
    assert seen["prompts"] == ["p0", "p1", "p2"] and seen["completion_ids"][0] == [1]


@pytest.mark.parametrize("returned,message", [
    ([1.0, 2.0], "returned 2 values for 3 completions"),
    ([1.0, float("nan"), 0.0], "must be finite"),
    ([1.0, "high", 0.0], "expected a number or None"),
    (0.5, "must return a list"),
])
def test_bad_return_values_name_the_function(returned, message):
    def my_reward(completions, **kw):
        return returned

    with pytest.raises(RewardFunctionError, match=f"'my_reward'.*{message}|{message}"):
        make_set([my_reward])(batch())


def test_an_exception_names_the_function_and_the_row():
    def picky(prompts, completions, **kw):
        for p in prompts:
            if p == "p1":
                raise KeyError("missing thing")
        return [0.0] * len(prompts)

    with pytest.raises(RewardFunctionError, match=r"'picky' raised KeyError.*prompt 'p1'"):
        make_set([picky])(batch())


def test_a_required_argument_the_rows_lack_is_a_flag_error():
    def needs_answer(completions, answer):
        return [0.0] * len(completions)

    with pytest.raises(FlagError, match="needs_answer.*answer"):
        make_set([needs_answer])(batch(level=["a", "b", "c"]))


def test_user_functions_load_from_a_file_or_a_module(tmp_path, monkeypatch):
    f = tmp_path / "my_rewards.py"
    f.write_text("def length(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n")
    assert resolve_spec(f"{f}:length").name == "length"
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = resolve_spec("my_rewards:length")
    assert spec.make(RewardContext())(completions=["ab", "c"]) == [2.0, 1.0]
    for bad, message in ((f"{f}:nope", "has no attribute 'nope'"), (f"{tmp_path}/none.py:f", "no such file"),
                         ("no_such_module_xyz:f", "importing no_such_module_xyz failed"), ("judge", "not a registered")):
        with pytest.raises(FlagError, match=message):
            resolve_spec(bad)


def test_reward_set_refuses_mismatched_weights_and_duplicates():
    with pytest.raises(FlagError, match="--reward_weights has 1 values for 2"):
        RewardSet.from_flags(["builtin_judge", "overlong"], [1.0], RewardContext())
    with pytest.raises(FlagError, match="named twice"):
        RewardSet.from_flags(["builtin_judge", "builtin_judge"], None, RewardContext())


# ---- rows keep their columns through tokenising, caching and collating ---------------------------------------

def test_prompt_only_rows_carry_their_columns_to_the_collator(tmp_path):
    from dschat.data.collators import PromptCollator
    from dschat.data.phases import DataSettings, load_phase_data
    from dschat.models.loading import load_tokenizer

    f = tmp_path / "math.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Human: What is {i} + 1? Assistant:", "answer": f"#### {i + 1}",
                                     "level": i % 3}) + "\n" for i in range(30)))
    tok = load_tokenizer("builtin", padding_side="left")
    settings = DataSettings(data_path=(str(f),), data_split="0,0,1", phase=3, seed=1)
    data = load_phase_data(settings, tok, str(tmp_path / "cache"))
    rows = [data["train"][i] for i in range(3)]
    out = PromptCollator(tok.pad_token_id)(rows)
    for text, fields in zip(out["prompt_text"], out["fields"]):
        i = int(text.split("is ")[1].split(" +")[0])
        assert fields == {"answer": f"#### {i + 1}", "level": i % 3}
    # a prompt-only file is step-3 data: step 1 is told so
    with pytest.raises(DatasetError, match="no 'chosen' answer.*step-3 data"):
        load_phase_data(DataSettings(data_path=(str(f),), data_split="1,0,1", phase=1, seed=1), tok,
                        str(tmp_path / "cache"))


# ---- step 3 against rules: no reward model ------------------------------------------------------------------

RULE_STEP3 = ["--actor_model_name_or_path", "builtin", "--per_device_generation_batch_size", "4",
              "--per_device_training_batch_size", "8", "--max_answer_seq_len", "8", "--num_judge_prompts", "4",
              "--enable_test_mode", "--test_stop_step", "2", "--num_warmup_steps", "0",
              "--advantage_estimator", "grpo", "--n_samples_per_prompt", "2"]


@pytest.fixture
def arith(tmp_path):
    """A prompt-only file with reference answers, and a TRL-style reward function file."""
    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Human: What is {i} plus {i}? Assistant:",
                                        "answer": str(2 * i)}) + "\n" for i in range(40)))
    fn = tmp_path / "my_reward.py"
    fn.write_text("def says_answer(completions, answer, **kwargs):\n"
                  "    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]\n"
                  "def short(completions, **kwargs):\n"
                  "    return [float(len(c) < 30) for c in completions]\n"
                  "def broken(completions, **kwargs):\n"
                  "    return [1 / 0 for c in completions]\n")
    return data, fn


def test_step3_trains_against_rules_without_a_reward_model(tmp_path, arith):
    data, fn = arith
    out = tmp_path / "s3"
    proc = run([STEP3, *RULE_STEP3, "--data_path", data, "--data_split", "0,0,1", "--data_output_path",
                tmp_path / "cache", "--reward_fn", "accuracy", f"{fn}:says_answer", "overlong",
                "--reward_weights", "1", "0.5", "0.1", "--eval_n_samples", "4", "--output_dir", out])
    assert "reward model" not in proc.stdout.lower().replace("reward model'", "")
    m = metrics(out / "actor")
    last = m["evals"][-1]
    for key in ("reward/accuracy", "reward/says_answer", "reward/overlong", "pass@1/accuracy", "pass@4/accuracy",
                "pass@2/says_answer"):
        assert key in last, sorted(last)
    assert "pass@1/overlong" not in last  # not a 0/1 reward
    assert 0.0 <= last["pass@1/accuracy"] <= last["pass@4/accuracy"] <= 1.0
    assert not (out / "critic").exists()


def test_a_failing_reward_function_exits_2_naming_it_and_keeps_checkpoints(tmp_path, arith):
    data, fn = arith
    out = tmp_path / "s3"
    ok = run([STEP3, *RULE_STEP3, "--data_path", data, "--data_split", "0,0,1", "--data_output_path",
              tmp_path / "cache", "--reward_fn", "accuracy", "--save_interval", "1", "--test_stop_step", "1",
              "--output_dir", out])
    assert ok.returncode == 0 and (out / "checkpoints" / "latest").is_file()
    checkpoint = sorted(p.name for p in (out / "checkpoints").iterdir())
    bad = run([STEP3, *RULE_STEP3, "--data_path", data, "--data_split", "0,0,1", "--data_output_path",
               tmp_path / "cache", "--reward_fn", f"{fn}:broken", "--output_dir", out, "--resume"], check=False)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "'broken' raised ZeroDivisionError" in bad.stderr and "Traceback" not in bad.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoint


def test_rule_flags_are_checked(tmp_path, tiny_reward_model):
    cases = [
        (["--reward_fn", "builtin_judge", "--critic_model_name_or_path", tiny_reward_model], "is not used"),
        (["--reward_fn", "builtin_judge", "--reward_weights", "1", "2"], "--reward_weights has 2 values"),
        (["--reward_fn", "builtin_judge", "--overlong_buffer_len", "4"], "add overlong to --reward_fn"),
        (["--reward_fn", "builtin_judge", "--save_best_by", "kl", "--output_dir", tmp_path / "o"], "--save_best_by kl"),
        (["--reward_fn", "nope", "--output_dir", tmp_path / "o2"], "not a registered reward"),
    ]
    for extra, message in cases:
        proc = run([STEP3, *RULE_STEP3, *extra], check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (extra, proc.stderr)


def test_gae_with_rules_starts_its_critic_from_the_actor_only_when_asked(tmp_path):
    base = [a for a in RULE_STEP3 if a not in ("grpo", "--advantage_estimator")]
    base = [*base, "--advantage_estimator", "gae", "--reward_fn", "builtin_judge", "--data_output_path", tmp_path / "c"]
    refused = run([STEP3, *base, "--critic_model_name_or_path", "builtin", "--output_dir", tmp_path / "r"], check=False)
    assert refused.returncode == 2 and "not a trained reward model" in refused.stderr
    out = tmp_path / "s3"
    run([STEP3, *base, "--critic_from_actor", "--output_dir", out])
    assert (out / "critic" / "config.json").is_file() and (out / "actor" / "dschat_complete.json").is_file()


def test_two_ranks_zero3_with_rules_pass_at_k_and_save_best(tmp_path, arith):
    data, fn = arith
    out = tmp_path / "s3"
    run([STEP3, *RULE_STEP3, "--data_path", "dschat/builtin", "--data_output_path", tmp_path / "cache",
         "--reward_fn", "builtin_judge", f"{fn}:short", "--actor_zero_stage", "3", "--enable_hybrid_engine",
         "--eval_n_samples", "2", "--eval_interval", "1", "--save_best_by", "judge", "--output_dir", out], ranks=2)
    m = metrics(out / "actor")
    whens = [e["when"] for e in m["evals"]]
    assert whens == ["start (SFT)", "step 1", "step 2"], whens
    judged = {e["when"]: e["judge"] for e in m["evals"][1:]}
    assert m["saved"]["metric"] == "judge" and m["saved"]["value"] == max(judged.values())
    assert m["saved"]["when"] == max(judged, key=judged.get)
    assert "pass@2/short" in m["evals"][-1] and "reward/short" in m["evals"][-1]
    assert not (out / "best_actor").exists()


def test_save_best_by_keeps_the_best_evaluated_actor(tmp_path):
    """A run whose held-out metric is worst at its end saves the earlier, better state."""
    from safetensors.torch import load_file

    out = tmp_path / "s3"
    # overlong rewards short answers; judge is the held-out metric; a high learning rate moves the policy a lot
    run([STEP3, *RULE_STEP3, "--data_output_path", tmp_path / "cache", "--reward_fn", "builtin_judge",
         "--eval_interval", "1", "--test_stop_step", "3", "--actor_learning_rate", "3e-2",
         "--save_best_by", "reward/builtin_judge", "--output_dir", out, "--save_interval", "0"])
    m = metrics(out / "actor")
    trained = m["evals"][1:]
    best = max(trained, key=lambda e: e["reward/builtin_judge"])
    assert m["saved"]["when"] == best["when"]
    assert m["saved"]["final_state"] == (best is trained[-1])
    assert torch.isfinite(next(iter(load_file(str(out / "actor" / "model.safetensors")).values()))).all()


def test_builtin_arithmetic_task_is_seeded_disjoint_and_answerable():
    import re

    from dschat.data.arith_task import arith_dataset
    from dschat.data.sources import load_raw

    data = arith_dataset(num_train=300, num_eval=50)
    assert data == arith_dataset(num_train=300, num_eval=50)  # seeded
    train_prompts = {r["prompt"] for r in data["train"]}
    assert not train_prompts & {r["prompt"] for r in data["eval"]}
    for row in data["train"] + data["eval"]:
        ops = row["prompt"].count("Then ") + 1
        assert 1 <= ops <= 3 and int(row["answer"]) >= 0, row
        assert accuracy([row["prompt"]], [f"The answer is {row['answer']}."], answer=[row["answer"]]) == [1.0]
    # "Mia has 12 apples. Mia buys 7 more. How many ..." is answered by its numbers
    one_step = [r for r in data["train"] if "more." in r["prompt"] and r["prompt"].count(".") == 3]
    for r in one_step[:20]:
        a, b = map(int, re.findall(r"\d+", r["prompt"])[:2])
        assert int(r["answer"]) == a + b, r
    rows = load_raw("dschat/arith", 1)
    assert rows["eval"][0]["chosen"] is None and rows["eval"][0]["fields"]["answer"].isdigit()


def test_step3_actor_carries_the_format_it_was_trained_in(tmp_path, chatml_model):  # noqa: F811
    """--prompt_format dschat on a ChatML actor: the saved actor's template renders DeepSpeed-Chat's text."""
    from transformers import AutoTokenizer

    out = tmp_path / "s3"
    run([STEP3, *RULE_STEP3, "--actor_model_name_or_path", chatml_model, "--prompt_format", "dschat",
         "--reward_fn", "builtin_judge", "--test_stop_step", "1", "--data_output_path", tmp_path / "c",
         "--output_dir", out])
    tok = AutoTokenizer.from_pretrained(out / "actor")
    text = tok.apply_chat_template([{"role": "user", "content": "Name some fruits."}], add_generation_prompt=True,
                                   tokenize=False)
    assert "<|im_start|>" not in text and text.endswith("Human: Name some fruits. Assistant:"), text
