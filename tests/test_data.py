"""Data pipeline: builtin task and judge, splits, tokenisation masks, collators, cache, bad input."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from dschat.data import builtin_task as bt
from dschat.data.collators import PromptCollator, RewardCollator, SFTCollator
from dschat.data.phases import DataSettings, load_phase_data, phase_indices, phase_rows, tokenize_row
from dschat.data.prompts import PromptFormat
from dschat.data.sources import load_raw, read_json_rows
from dschat.models.loading import load_tokenizer
from dschat.runtime.errors import DatasetError

SHARED_HH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin")


def settings(paths, phase=1, **kw):
    base = {"data_path": tuple(paths), "data_split": "2,4,4", "phase": phase, "seed": 1234, "sft_only_data_path": (),
            "max_seq_len": 64, "max_prompt_len": 48, "train_on_prompt": False}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    return DataSettings(**(base | kw))


# ---- builtin task and judge ------------------------------------------------------------------------------

def test_judge_values_by_hand():
    p = "Human: Hi, I am Ann. Name some fruits. Assistant:"
    assert bt.judge(p, " apple, pear.") == pytest.approx(2 / 6)
    assert bt.judge(p, " apple, pear, plum, kiwi, lemon, mango.") == 1.0
    assert bt.judge(p, " apple, pear, plum, kiwi, lemon, mango, melon.") == 1.0  # coverage caps at 6
    assert bt.judge(p, " apple, apple.") == pytest.approx(0.5 * 1 / 6)  # duplicate costs precision
    assert bt.judge(p, " apple, dog.") == pytest.approx(0.5 * 1 / 6)  # wrong category costs precision
    assert bt.judge(p, " I do not know.") == 0.0
    assert bt.judge(p, "") == 0.0
    assert bt.judge("Human: hello Assistant:", " apple.") == 0.0  # no category asked
    assert bt.judge(p, " apple, pear. Human: more?") == pytest.approx(2 / 6)  # a new turn is not the answer


def test_item_counts_sort_each_item_once():
    prompt = "Hi, I am Ann. Name some fruits."
    counts = bt.item_counts(prompt, " apple, dog, strawberry, apple, pear.")
    assert counts == {"items": 5, "correct": 2, "other_category": 1, "outside": 1, "repeats": 1}
    assert bt.item_counts(prompt, " I do not know.")["correct"] == 0
    assert bt.item_counts("Tell me a joke.", " apple.") == {"items": 1, "correct": 0, "other_category": 1,
                                                             "outside": 0, "repeats": 0}


def test_builtin_dataset_properties():
    data = bt.builtin_dataset()
    assert data == bt.builtin_dataset()  # deterministic
    assert data != bt.builtin_dataset(seed=7)
    chosen = [bt.judge(r["prompt"], r["chosen"]) for r in data["train"]]
    rejected = [bt.judge(r["prompt"], r["rejected"]) for r in data["train"]]
    assert all(c > r for c, r in zip(chosen, rejected))
    assert sum(chosen) / len(chosen) <= 0.75
    # No list length appears only among rejected answers (the reward model would learn length is bad).
    longest = max(bt.CHOSEN_LENGTH_WEIGHTS)
    assert max(len(bt.parse_items(r["rejected"])) for r in data["train"]) == longest
    for row in data["train"][:500]:  # chosen answers list distinct items in catalogue order
        order = [bt.CATEGORIES[bt.category_of(row["prompt"])].index(i) for i in bt.parse_items(row["chosen"])]
        assert order == sorted(set(order))
    assert all(0.0 <= s <= 1.0 for s in chosen + rejected)
    train_prompts = {r["prompt"] for r in data["train"]}
    assert not train_prompts & {r["prompt"] for r in data["eval"]}
    assert not train_prompts & set(bt.heldout_prompts(n=200))


def test_outside_and_plural_rejections_are_what_the_judge_counts_wrong():
    catalogue = {w for words in bt.CATEGORIES.values() for w in words}
    assert not catalogue & {w for words in bt.OUTSIDE.values() for w in words}
    assert not catalogue & {bt.plural(w) for w in catalogue}
    assert [bt.plural(w) for w in ("peach", "bus", "pea", "box", "city", "key")] == \
        ["peaches", "buses", "peas", "boxes", "cities", "keys"]
    p = bt.make_prompt("Ann", bt.GREETINGS[0], bt.REQUESTS[0], "fruits")
    assert bt.judge(p, " apple, strawberry.") == bt.judge(p, " apple, pears.") == pytest.approx(0.5 / 6)
    rejected = [r["rejected"] for r in bt.builtin_dataset()["train"]]
    outside = {w for words in bt.OUTSIDE.values() for w in words}
    plurals = {bt.plural(w) for w in catalogue}
    items = [i for r in rejected for i in bt.parse_items(r)]
    assert 0.05 < sum(i in outside for i in items) / len(rejected) < 0.4
    assert 0.02 < sum(i in plurals for i in items) / len(rejected) < 0.2


# ---- splits -------------------------------------------------------------------------------------------------

def test_phase_indices_disjoint_cover_and_seeded():
    shares = [0.2, 0.4, 0.4]
    parts = [phase_indices(1000, shares, p, seed=3) for p in (1, 2, 3)]
    assert sorted(int(i) for part in parts for i in part) == list(range(1000))
    assert [len(p) for p in parts] == [200, 400, 400]
    assert (phase_indices(1000, shares, 2, seed=3) == parts[1]).all()
    assert not (phase_indices(1000, shares, 2, seed=4) == parts[1]).all()


def test_phase_rows_disjoint_across_phases():
    rows = [phase_rows(["dschat/builtin"], "2,4,4", p, 1234)["train"] for p in (1, 2, 3)]
    keys = [{(r["prompt"], r["chosen"], r["rejected"]) for r in part} for part in rows]
    assert len(rows[0]) == 2400 and len(rows[1]) == 4800 and sum(map(len, rows)) == 12000
    # Rows that repeat in the data itself (the same prompt, chosen and rejected drawn twice) may land in two
    # phases; no other row may.
    counts = Counter((r["prompt"], r["chosen"], r["rejected"]) for r in bt.builtin_dataset()["train"])
    repeated = {k for k, n in counts.items() if n > 1}
    assert len(repeated) < 5
    assert not (keys[0] & keys[1] | keys[1] & keys[2] | keys[0] & keys[2]) - repeated


# ---- tokenisation and collators ---------------------------------------------------------------------------

def test_sft_labels_mask_prompt_by_default(tokenizer):
    row = {"prompt": "Human: Name some fruits. Assistant:", "chosen": " apple, pear.", "rejected": " dog."}
    out = tokenize_row(row, PromptFormat(tokenizer), 1, 64, 48, train_on_prompt=False)
    n_prompt = len(tokenizer(row["prompt"])["input_ids"])
    assert out["labels"][:n_prompt] == [-100] * n_prompt
    assert out["labels"][n_prompt:] == out["input_ids"][n_prompt:]
    assert out["input_ids"][-1] == tokenizer.eos_token_id
    whole = tokenize_row(row, PromptFormat(tokenizer), 1, 64, 48, train_on_prompt=True)
    assert whole["labels"] == whole["input_ids"]
    assert tokenize_row(row, PromptFormat(tokenizer), 1, n_prompt, 48, False) is None  # prompt alone fills max_seq_len
    assert tokenize_row(row, PromptFormat(tokenizer), 3, 64, n_prompt - 1, False) is None  # prompt too long for phase 3


def test_collators_pad_and_mask():
    sft = SFTCollator(0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert sft["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert sft["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert sft["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    rm = RewardCollator(0)([{"chosen_ids": [1, 2, 3], "rejected_ids": [1, 4], "prompt_len": 1}])
    assert rm["input_ids"].tolist() == [[1, 2, 3], [1, 4, 0]]
    assert rm["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    pr = PromptCollator(0)([{"prompt_ids": [3, 4]}, {"prompt_ids": [5, 6, 7]}])
    assert pr["prompt"].tolist() == [[0, 3, 4], [5, 6, 7]]
    assert pr["prompt_att_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]


# ---- local files, HH format, bad input --------------------------------------------------------------------

def test_local_jsonl_and_hh_format(tmp_path):
    f = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Human: q{i} Assistant:", "chosen": " yes", "rejected": " no"} for i in range(20)]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_raw(str(f), seed=1)
    assert len(data["train"]) == 18 and len(data["eval"]) == 2
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: well",
                              "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: go away"}))
    (row,) = read_json_rows(str(hh))
    assert row["prompt"] == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:"
    assert row["chosen"] == " well" and row["rejected"] == " go away"


@pytest.mark.skipif(not SHARED_HH.exists(), reason="../shared/data (real HH-RLHF data) is not beside the repo")
def test_real_hh_rlhf_file_loads_and_splits():
    data = load_raw(str(SHARED_HH), seed=1234)
    n = len(data["train"]) + len(data["eval"])
    assert 2250 < n <= 2312  # a few HH rows have an empty final answer and are skipped
    for row in data["train"][:50]:
        assert row["prompt"].endswith("\n\nAssistant:") and row["prompt"].startswith("\n\nHuman:")
        assert row["chosen"] != row["rejected"] or row["chosen"]


@pytest.mark.parametrize("content,expected", [
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n', r"bad\.jsonl:2: invalid JSON"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "rejected": "c"}\n',
     r"bad\.jsonl:2: missing field 'chosen'"),
    ('{"prompt": "a", "chosen": "  ", "rejected": "c"}\n', r"bad\.jsonl:1: field 'chosen' is empty"),
    ('{"question": "a"}\n', r"bad\.jsonl:1: missing field 'prompt'"),
    ("", r"bad\.jsonl: file is empty"),
])
def test_malformed_dataset_fails_with_location_and_leaves_no_cache(tmp_path, tokenizer, content, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match=expected):
        load_phase_data(settings([str(bad)]), tokenizer, str(cache))
    assert not cache.exists() or not any(cache.iterdir())


PAIR = {"prompt": "Human: hi Assistant:", "chosen": " hello", "rejected": " go"}


@pytest.mark.parametrize("name, content, expected", [
    ("bom.jsonl", b"\xef\xbb\xbf" + (json.dumps(PAIR) + "\n").encode() * 3, 3),  # a UTF-8 BOM is read past
    ("pretty.jsonl", json.dumps([PAIR] * 4, indent=2).encode(), 4),  # a pretty-printed list, whatever the suffix
    ("oneline.jsonl", json.dumps([PAIR] * 2).encode(), 2),
    ("wrapped.json", json.dumps({"data": [PAIR] * 5, "version": 1}, indent=1).encode(),
     r"wrapped\.json: valid JSON, but one object \(keys \['data', 'version'\]\), not rows.*'data' key holds a list "
     r"of 5 objects"),
    ("wrapped1.jsonl", json.dumps({"rows": [PAIR]}).encode(), r"valid JSON, but one object.*'rows' key"),
    ("scalar.json", b"42\n", r"scalar\.json: valid JSON, but a int, not rows"),
    ("objects.jsonl", json.dumps(PAIR, indent=2).encode() * 2,
     r"objects\.jsonl:1: invalid JSON: .*one complete JSON object per line"),
])
def test_json_shapes_are_read_or_named_for_what_they_are(tmp_path, name, content, expected):
    """Valid JSON of an unsupported shape is not called "invalid JSON"; a BOM and a pretty-printed list are read
    (issue 30 item 12)."""
    f = tmp_path / name
    f.write_bytes(content)
    if isinstance(expected, int):
        rows = read_json_rows(str(f))
        assert len(rows) == expected and rows[0]["chosen"] == " hello" and rows[0]["prompt"] == PAIR["prompt"]
    else:
        with pytest.raises(DatasetError, match=expected) as err:
            read_json_rows(str(f))
        assert "invalid JSON" not in str(err.value) or name == "objects.jsonl"


def test_unknown_dataset_name(tmp_path, tokenizer):
    with pytest.raises(DatasetError, match="unknown dataset 'nope/nothing'"):
        load_phase_data(settings(["nope/nothing"]), tokenizer, str(tmp_path))


def test_all_rows_dropped_for_length_says_how_many(tmp_path, tokenizer):
    f = tmp_path / "long.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": "word " * 80, "chosen": " a", "rejected": " b"}) for _ in range(10)))
    with pytest.raises(DatasetError, match=r"no usable train rows for phase 1: 9 rows, all dropped for length"):
        load_phase_data(settings([str(f)], data_split="10,0,0"), tokenizer, str(tmp_path / "cache"))
    assert not any((tmp_path / "cache").iterdir())


def test_tie_pairs_are_dropped_and_counted(tmp_path, tokenizer, capsys):
    """Pairs whose chosen equals rejected, as written or only after truncation, are dropped with a count in the
    log; rows dropped for length are counted there too (issue 30 items 7, 8)."""
    long_tail = "word " * 80
    rows = [{"prompt": "hi", "chosen": " same", "rejected": " same"}] * 5 \
        + [{"prompt": "hi", "chosen": " a" + long_tail, "rejected": " a" + long_tail + " x"}] * 5 \
        + [{"prompt": "hi", "chosen": " a", "rejected": " b"}] * 10 + [{"prompt": long_tail, "chosen": " a",
                                                                      "rejected": " b"}] * 2
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_phase_data(settings([str(f)], phase=2, data_split="0,1,0"), tokenizer, str(tmp_path / "cache"))
    train = data["stats"]["train"]
    assert train["dropped_ties"] + len(data["train"]) + train["dropped_for_length"] == train["rows"]
    assert all(r["chosen_ids"] != r["rejected_ids"] for r in data["train"])
    assert train["dropped_ties"] >= 8 and train["dropped_for_length"] >= 1  # ~10 ties and ~2 long of 22 rows x 0.9
    log = capsys.readouterr().out
    assert f"{train['dropped_ties']} tie pairs dropped (chosen == rejected)" in log
    assert f"{train['dropped_for_length']} dropped for length (--max_seq_len=64)" in log
    again = load_phase_data(settings([str(f)], phase=2, data_split="0,1,0"), tokenizer, str(tmp_path / "cache"))
    assert again["folder"] == data["folder"] and "tie pairs dropped" in capsys.readouterr().out  # cache hit too


def test_all_tie_pairs_are_an_error(tmp_path, tokenizer):
    f = tmp_path / "ties.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": "hi", "chosen": " same", "rejected": " same"}) for _ in range(10)))
    with pytest.raises(DatasetError, match=r"no usable train pairs for phase 2: all 9 have chosen == rejected"):
        load_phase_data(settings([str(f)], phase=2, data_split="0,1,0"), tokenizer, str(tmp_path / "cache"))
    assert not any((tmp_path / "cache").iterdir())


def test_single_response_data_rejected_for_reward_phase(tmp_path, tokenizer):
    f = tmp_path / "sft.json.gz"
    with gzip.open(f, "wt") as fh:
        json.dump([{"prompt": "Human: q Assistant:", "response": " a"} for _ in range(10)], fh)
    with pytest.raises(DatasetError, match="has no 'rejected' answer"):
        load_phase_data(settings([str(f)], phase=2), tokenizer, str(tmp_path / "cache"))
    data = load_phase_data(settings([], sft_only_data_path=[str(f)]), tokenizer, str(tmp_path / "cache"))
    assert len(data["train"]) == 9  # SFT-only data feeds all of its train rows to phase 1


# ---- cache --------------------------------------------------------------------------------------------------

def test_cache_reused_and_invalidated(tmp_path, tokenizer):
    cache = tmp_path / "cache"
    first = load_phase_data(settings(["dschat/builtin"]), tokenizer, str(cache))
    again = load_phase_data(settings(["dschat/builtin"]), tokenizer, str(cache))
    assert again["folder"] == first["folder"] and len(list(cache.iterdir())) == 1
    assert again["train"][0] == first["train"][0]
    other = load_phase_data(settings(["dschat/builtin"], max_seq_len=32), tokenizer, str(cache))
    assert other["folder"] != first["folder"]
    load_phase_data(settings(["dschat/builtin"], phase=3), tokenizer, str(cache))
    load_phase_data(settings(["dschat/builtin"], seed=9), tokenizer, str(cache))
    assert len(list(cache.iterdir())) == 4
    assert not list(cache.glob("*.tmp-*"))
    assert not list(cache.rglob("*.pt")) and not list(cache.rglob("*.pkl"))  # Arrow only, no pickles


def test_a_zero_share_is_not_called_dropped_for_length(tmp_path, tokenizer):
    f = tmp_path / "ok.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": "hi", "chosen": " a", "rejected": " b"}) for _ in range(10)))
    with pytest.raises(DatasetError, match=r"phase 2 gets no training rows: its --data_split share \(1,0,1\) is 0"):
        load_phase_data(settings([str(f)], phase=2, data_split="1,0,1"), tokenizer, str(tmp_path / "cache"))


def test_length_grouped_keeps_every_row_and_cuts_padding():
    import random

    from dschat.data.loaders import length_grouped

    rng = random.Random(0)
    lengths = [rng.randrange(5, 200) for _ in range(103)]
    order = length_grouped(list(range(103)), lengths, 4, random.Random(1), mega_batches=10)
    assert sorted(order) == list(range(103))
    padded = sum(max(lengths[i] for i in order[b: b + 4]) * len(order[b: b + 4]) for b in range(0, 103, 4))
    plain = sum(max(lengths[b: b + 4]) * len(lengths[b: b + 4]) for b in range(0, 103, 4))
    assert padded < 0.85 * plain  # random order wastes far more on padding
    assert order[-3:] == sorted(range(80, 103), key=lambda i: -lengths[i])[-3:]  # the partial batch stays last
    assert order == length_grouped(list(range(103)), lengths, 4, random.Random(1), mega_batches=10)
    assert order != length_grouped(list(range(103)), lengths, 4, random.Random(2), mega_batches=10)


def test_group_by_length_loader_shards_ranks_and_reshuffles_per_epoch(monkeypatch):
    from datasets import Dataset

    from dschat.data import loaders

    data = Dataset.from_dict({"prompt_ids": [[1] * (1 + (7 * i) % 50) for i in range(40)]})
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(loaders.dist, "world_size", lambda: 2)
        monkeypatch.setattr(loaders.dist, "rank", lambda r=rank: r)
        loader = loaders.make_loader(data, PromptCollator(0), 4, True, 1234, group_by_length=True)
        epochs = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            epochs.append([list(b["prompt_att_mask"].sum(1)) for b in loader])
        assert epochs[0] != epochs[1] and len(epochs[0]) == 5
        seen.append(list(loader.sampler))
    assert not set(seen[0]) & set(seen[1]) and len(seen[0] + seen[1]) == 40


# ---- TRL's dataset types, standard and conversational (issue 26) -------------------------------------------

def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_each_trl_type_is_detected_from_its_columns(tmp_path):
    sys_msg = {"role": "system", "content": "Be brief."}
    records = [
        {"text": "The sky is blue."},
        {"messages": [sys_msg, _user("hi"), _bot("hello"), _user("fruit?"), _bot("apple.")]},
        {"prompt": "The sky is"},
        {"prompt": [_user("sky?")], "id": 7},
        {"prompt": "The sky is", "completion": " blue."},
        {"prompt": [_user("sky?")], "completion": [_bot("blue.")]},
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": [_user("sky?")], "chosen": [_bot("blue.")], "rejected": [_bot("green.")]},
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": [_user("sky?"), _bot("blue.")], "rejected": [_user("sky?"), _bot("green.")]},
        {"prompt": [_user("sky?")], "chosen": "blue.", "rejected": "green."},  # text answers to a conversation
    ]
    rows = read_json_rows(_jsonl(tmp_path / "all.jsonl", records))
    assert rows[0] == {"prompt": None, "chosen": None, "rejected": None, "text": "The sky is blue."}
    assert rows[1] == {"prompt": [sys_msg, _user("hi"), _bot("hello"), _user("fruit?")], "chosen": [_bot("apple.")],
                       "rejected": None, "conversation": True}
    assert rows[2] == {"prompt": "The sky is", "chosen": None, "rejected": None}
    assert rows[3] == {"prompt": [_user("sky?")], "chosen": None, "rejected": None, "fields": {"id": 7}}
    assert rows[4] == {"prompt": "The sky is", "chosen": " blue.", "rejected": None}
    assert rows[5] == {"prompt": [_user("sky?")], "chosen": [_bot("blue.")], "rejected": None}
    assert rows[6] == {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    assert rows[7] == {"prompt": [_user("sky?")], "chosen": [_bot("blue.")], "rejected": [_bot("green.")]}
    assert rows[8] == {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}  # shared start, no space
    assert rows[9] == rows[7]  # implicit prompt cut at the message boundary
    assert rows[10] == rows[7]


def test_phases_take_the_types_they_suit(tmp_path, tokenizer):
    lm = _jsonl(tmp_path / "lm.jsonl", [{"messages": [_user(f"q{i}"), _bot(f"a{i}")]} for i in range(10)])
    text = _jsonl(tmp_path / "text.jsonl", [{"text": f"plain {i}"} for i in range(10)])
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": [_user(f"q{i}")], "chosen": [_bot("yes")],
                                                "rejected": [_bot("no")]} for i in range(10)])
    for f in (lm, text, pairs):
        assert phase_rows([f], "1,0,0", 1, 1)["train"]
    assert phase_rows([pairs], "0,1,0", 2, 1)["train"]
    assert phase_rows([pairs], "0,0,1", 3, 1)["train"] and phase_rows([lm], "0,0,1", 3, 1)["train"]
    for f in (lm, text):
        with pytest.raises(DatasetError, match="language-modelling data .* give it to step 1"):
            phase_rows([f], "0,1,0", 2, 1)
    with pytest.raises(DatasetError, match="phase 3 has no prompt"):
        phase_rows([text], "0,0,1", 3, 1)


@pytest.mark.parametrize("record,expected", [
    ({"messages": [{"content": "hi"}]}, r"bad\.jsonl:1: field 'messages' message 0: missing 'role'"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"bad\.jsonl:1: field 'messages' message 0: unknown role 'robot'"),
    ({"messages": []}, r"bad\.jsonl:1: field 'messages' is an empty conversation"),
    ({"prompt": []}, r"bad\.jsonl:1: field 'prompt' is an empty conversation"),
    ({"messages": [{"role": "user", "content": 3}]}, r"message 0: 'content' must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"field 'messages' has no assistant message"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
     r"field 'completion' must start with an assistant message"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": " b"},
     r"field 'chosen' is a list of messages but 'prompt' is text"),
    ({"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
     r"field 'chosen' has no message after the prompt"),
    ({"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"},
                 {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "q3"}, {"role": "assistant", "content": "c"}]},
     r"bad\.jsonl:1: the prompts of 'chosen' and 'rejected' differ: they part at message 2, a user message"),
    ({"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
     r"bad\.jsonl:1: 'chosen' and 'rejected' have nothing in common"),
    ({"chosen": "Yes, blue.", "rejected": "No, green."}, r"bad\.jsonl:1: 'chosen' and 'rejected' have nothing in common"),
])
def test_bad_conversations_name_file_line_and_field(tmp_path, record, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok", "chosen": " a", "rejected": " b"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DatasetError, match=expected.replace("bad\\.jsonl:1", "bad\\.jsonl:2")):
        read_json_rows(str(bad))


def test_load_dataset_formats_parquet_csv_and_data_folders_without_a_hub(tmp_path, tokenizer):
    from datasets import Dataset

    records = [{"prompt": [_user(f"q{i}")], "chosen": [_bot("yes")], "rejected": [_bot("no")], "id": i}
               for i in range(20)]
    Dataset.from_list(records).to_parquet(str(tmp_path / "pairs.parquet"))
    data = load_raw(str(tmp_path / "pairs.parquet"), seed=1)
    assert len(data["train"]) == 18 and len(data["eval"]) == 2
    row = data["train"][0]
    assert row["prompt"] == [_user(f"q{row['fields']['id']}")] and row["chosen"] == [_bot("yes")]
    csv = tmp_path / "sft.csv"
    csv.write_text("prompt,completion\n" + "".join(f"Human: q{i} Assistant:, a{i}\n" for i in range(10)))
    data = load_raw(str(csv), seed=1)
    assert {r["prompt"] for r in data["train"] + data["eval"]} == {f"Human: q{i} Assistant:" for i in range(10)}
    assert all(r["chosen"].startswith(" a") and r["rejected"] is None for r in data["train"])
    (tmp_path / "bad.csv").write_text("prompt,completion\nHuman: q Assistant:, a\n  , b\n")
    with pytest.raises(DatasetError, match=r"bad\.csv:3: field 'prompt' is empty"):
        load_raw(str(tmp_path / "bad.csv"), seed=1)
    folder = tmp_path / "hubstyle" / "data"
    folder.mkdir(parents=True)
    Dataset.from_list([{"messages": [_user(f"q{i}"), _bot(f"a{i}")]} for i in range(12)]).to_parquet(
        str(folder / "train-00000-of-00001.parquet"))
    Dataset.from_list([{"messages": [_user("t"), _bot("u")]}] * 3).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    data = load_raw(str(tmp_path / "hubstyle"), seed=1)
    assert len(data["train"]) == 12 and len(data["eval"]) == 3 and data["eval"][0]["conversation"]
    # and the phases tokenise them (the cache stamps the local files)
    out = load_phase_data(settings([str(tmp_path / "hubstyle")], data_split="1,0,0"), tokenizer, str(tmp_path / "c"))
    assert len(out["train"]) == 12
    with pytest.raises(DatasetError, match="folder has no train.json"):
        load_raw(str((tmp_path / "empty").mkdir() or tmp_path / "empty"), seed=1)


def test_a_hub_name_goes_through_load_dataset_with_column_detection(monkeypatch):
    from datasets import Dataset, DatasetDict

    from dschat.data import sources

    calls = []

    def fake_load_dataset(name, *args, **kwargs):
        calls.append(name)
        return DatasetDict({"train": Dataset.from_list([{"chosen": [_user("q"), _bot(f"a{i}")],
                                                         "rejected": [_user("q"), _bot("no")]} for i in range(5)]),
                            "test": Dataset.from_list([{"text": "plain"}])})

    monkeypatch.setattr(sources, "hub_unreachable", lambda: None)
    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    data = load_raw("someorg/prefs", seed=1)
    assert calls == ["someorg/prefs"] and len(data["train"]) == 5
    assert data["train"][0]["prompt"] == [_user("q")] and data["eval"][0]["text"] == "plain"
    monkeypatch.setattr(sources, "hub_unreachable", lambda: "HF_HUB_OFFLINE is set")
    with pytest.raises(DatasetError, match=r"unknown dataset 'other/name'.*hub cannot be reached .*HF_HUB_OFFLINE"):
        load_raw("other/name", seed=1)
    assert calls == ["someorg/prefs"]
