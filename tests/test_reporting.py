"""Runs you can see (issue 29 items 2-3) on fake data: metrics.jsonl lines, --report_to, the PNG plots, the model
card and e2e's report.html. The tiny runs of tests/test_step1.py and tests/test_step3.py check the real files."""

from __future__ import annotations

import json
import sys

import pytest

from dschat.cli import e2e
from dschat.cli.report import build_report, write_report
from dschat.models.card import model_card
from dschat.runtime.errors import FlagError
from dschat.runtime.logger import Logger, resolve_report_to
from dschat.runtime.plots import panels, plot_metrics, read_metrics


def fake_step3_metrics(path) -> None:
    """A metrics.jsonl as step 3 writes it: train lines every step, evaluations at 0, 10 and 20."""
    lines = []
    for s in range(1, 21):
        lines.append({"kind": "train", "step": s, "time_s": s * 1.5, "reward_score": 0.1 * s, "kl": 0.01 * s,
                      "entropy": 2.0 - 0.05 * s, "answer_len": 20 + s, "actor_loss": 0.5 / s, "lr": 1e-4,
                      "gen_tokens_per_s": 100.0})
    for s in (0, 10, 20):
        lines.append({"kind": "eval", "step": s, "time_s": s * 1.5, "reward_score": 0.08 * s, "kl": 0.012 * s,
                      "answer_len": 22.0, "reward/accuracy": s / 40})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")


def test_logger_writes_train_and_eval_lines_and_a_fresh_run_starts_over(tmp_path):
    path = tmp_path / "out" / "metrics.jsonl"
    log = Logger(3, "t", metrics_path=path)
    log.scalars(0, {"eval/perplexity": 9.0, "eval/judge": 0.5})
    log.step(1, {"train/loss": 2.5, "train/lr": 1e-3}, ("train/loss",))
    log.step(2, {"train/loss": float("nan"), "train/lr": 1e-3})
    log.close()
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [("eval", 0), ("train", 1), ("train", 2)]
    assert rows[0]["perplexity"] == 9.0 and rows[1]["loss"] == 2.5 and rows[1]["lr"] == 1e-3
    assert rows[2]["loss"] is None and all(r["time_s"] >= 0 for r in rows)  # NaN stays valid JSON
    path.write_text(path.read_text().replace('"time_s": ', '"time_s": 100'))  # as if the run had taken 100 s
    Logger(3, "t", metrics_path=path, append=True).step(3, {"train/loss": 1.0})  # --resume appends
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 4 and rows[-1]["time_s"] >= 100  # and its time goes on from the earlier lines
    Logger(3, "t", metrics_path=path).step(1, {"train/loss": 1.0})  # a new run starts the file over
    assert len(path.read_text().splitlines()) == 1


def test_report_to_resolution(monkeypatch):
    assert resolve_report_to(None) == ["tensorboard"]  # tensorboard is in the requirements
    assert resolve_report_to(["none"]) == []
    assert resolve_report_to(["none"], enable_tensorboard=True) == ["tensorboard"]  # the old flag keeps working
    with pytest.raises(FlagError, match="cannot be combined"):
        resolve_report_to(["none", "tensorboard"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(FlagError) as err:
        resolve_report_to(["wandb"])
    assert "\n" not in str(err.value) and "pip install wandb" in str(err.value)


def test_plot_has_step3_panels_and_eval_points(tmp_path):
    path = tmp_path / "metrics.jsonl"
    fake_step3_metrics(path)
    lines = read_metrics(path)
    assert len(lines) == 23  # the broken line is skipped
    titles = [t for t, _ in panels(lines)]
    assert titles[:4] == ["reward", "KL to reference", "entropy", "answer length (tokens)"]
    assert "rewards by name" in titles and "loss" not in titles
    png = plot_metrics(path, title="step 3")
    assert png == tmp_path / "training_curves.png" and png.stat().st_size > 10_000
    import matplotlib.image

    img = matplotlib.image.imread(png)
    blue = ((abs(img[..., 0] - 0.12) < 0.05) & (abs(img[..., 1] - 0.47) < 0.05) & (abs(img[..., 2] - 0.71) < 0.05))
    assert blue.sum() > 500  # the training curves (matplotlib's first colour) are drawn
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_metrics(tmp_path / "empty.jsonl") is None


def test_model_card_names_base_algorithm_flags_and_metrics(tmp_path):
    flags = {"actor_model_name_or_path": "smollm2-135m", "data_path": ["dschat/builtin"], "data_split": "2,4,4",
             "advantage_estimator": "grpo", "policy_loss": "ppo", "reward_fn": ["accuracy"], "seed": 3,
             "actor_learning_rate": 1e-5, "lora_dim": 0}
    metrics = {"evals": [{"when": "start (SFT)", "reward_score": 0.2, "kl": 0.0, "reward/accuracy": 0.25,
                          "answers": [["q", "a"]]},
                         {"when": "epoch 1", "reward_score": 0.6, "kl": 0.3, "reward/accuracy": 0.5}]}
    card = model_card("step 3", flags, metrics, folder="/x/step3-models/smollm2/actor", counts={"train": 40, "eval": 8})
    for text in ("# actor", "dschat/builtin (split 2,4,4; 40 train rows; 8 eval rows)", "smollm2-135m", "Apache-2.0", "grpo", "accuracy", "| --actor_learning_rate | 1e-05 |",
                 "| reward_score | 0.2 | 0.6 |", "| kl | 0 | 0.3 |", "| reward/accuracy | 0.25 | 0.5 |",
                 "start (SFT)", "epoch 1", "AutoModelForCausalLM", "chat.py --path", "dschat 0."):
        assert text in card, text
    assert "answers" not in card and "lora_dim" not in card  # no text rows, no zero flags
    sft = tmp_path / "sft"  # a later step names what the step-1 model it starts from was trained from
    sft.mkdir()
    (sft / "README.md").write_text(model_card("step1", {"model_name_or_path": "/models/SmolLM2-135M"}))
    later = model_card("step 3", {**flags, "actor_model_name_or_path": str(sft)})
    assert f"- **Base model**: {sft}, trained from /models/SmolLM2-135M (licence: Apache-2.0" in later
    rm = model_card("step2", {"model_name_or_path": "x", "loss": "pairwise"}, {"evals": [{"accuracy": 0.5}]},
                    seq_cls=True)
    assert "AutoModelForSequenceClassification" in rm and "| accuracy | 0.5 | 0.5 |" in rm and "chat.py" not in rm


def test_report_html_from_fake_step_folders(tmp_path):
    pipe = e2e.PIPELINES["ppo"]
    dirs = {1: tmp_path / "actor-models" / "a", 2: tmp_path / "reward-models" / "r", 3: tmp_path / "step3-models" / "a"}
    answers = {"base": "uh", "sft": "apples <b>", "rlhf": "apples, pears"}
    step_metrics = {
        1: {"evals": [{"when": "start", "perplexity": 30.0, "answers": [["Name fruits.", answers["base"]]]},
                      {"when": "epoch 1", "perplexity": 5.0, "answers": [["Name fruits.", answers["sft"]]]}]},
        2: {"evals": [{"accuracy": 0.5}, {"accuracy": 0.9}]},
        3: {"evals": [{"reward_score": 0.1, "answers": [["Name fruits.", answers["sft"]]]},
                      {"reward_score": 0.7, "answers": [["Name fruits.", answers["rlhf"]]]}]}}
    for step, folder in dirs.items():
        model_dir = folder / "actor" if step == 3 else folder
        model_dir.mkdir(parents=True)
        (model_dir / "dschat_metrics.json").write_text(json.dumps(step_metrics[step]))
    fake_step3_metrics(dirs[3] / "metrics.jsonl")
    plot_metrics(dirs[3] / "metrics.jsonl")
    summary = {"status": "ok", "actor_model": "builtin", "total_wall_time_s": 42.0,
               "steps": {"1": {"status": "ran", "wall_time_s": 10.0}}}
    path = write_report(tmp_path, pipe, dirs, summary)
    page = path.read_text()
    assert path.name == "report.html" and page.startswith("<!doctype html>")
    for text in ("perplexity", "30", "accuracy", "0.9", "reward_score", "0.7", "base model", "SFT", "RLHF",
                 "Name fruits.", "apples &lt;b&gt;", "apples, pears", "uh", "data:image/png;base64,", "0:00:42"):
        assert text in page, text
    assert page.count("data:image/png") == 1 and page.count("(no plot") == 2
    assert build_report(tmp_path, e2e.PIPELINES["dpo"], {1: dirs[1], 2: tmp_path / "none"}).count("<tr>") >= 3


def test_save_writes_the_card_and_keeps_a_users_own_readme(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dschat.models.builtin import BUILTIN_MODEL_DIR
    from dschat.models.export import CARD_ASIDE, save_hf_model

    tok = AutoTokenizer.from_pretrained(BUILTIN_MODEL_DIR)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    card = model_card("step1", {"model_name_or_path": "builtin"}, {"evals": [{"perplexity": 3.0}]})
    out = tmp_path / "m"
    save_hf_model(model, tok, str(out), {"README.md": card, "dschat_metrics.json": {"evals": []}})
    assert (out / "README.md").read_text() == card and not (out / CARD_ASIDE).exists()
    save_hf_model(model, tok, str(out), {"README.md": card + "again"})  # an earlier card is replaced
    assert (out / "README.md").read_text().endswith("again")
    (out / "README.md").write_text("# my notes\n")  # the user's own README is never replaced
    save_hf_model(model, tok, str(out), {"README.md": card})
    assert (out / "README.md").read_text() == "# my notes\n" and (out / CARD_ASIDE).read_text() == card


def test_wandb_gets_the_same_scalars(tmp_path, monkeypatch):
    """--report_to wandb: init in <output_dir>/wandb (WANDB_MODE=offline works without a network), every logged
    scalar with its step, finish at close (a stand-in module: wandb is optional and not installed in CI)."""
    import types

    calls: list[tuple[str, object]] = []
    run = types.SimpleNamespace(log=lambda d: calls.append(("log", d)), finish=lambda: calls.append(("finish", None)))
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert resolve_report_to(["wandb", "tensorboard"]) == ["wandb", "tensorboard"]
    log = Logger(2, "step1", wandb_dir=str(tmp_path / "wandb"), wandb_config={"seed": 1})
    log.step(1, {"train/loss": 2.0})
    log.scalars(1, {"eval/perplexity": 7.0})
    log.close()
    assert calls[0][0] == "init" and calls[0][1]["dir"] == str(tmp_path / "wandb") and calls[0][1]["config"] == {"seed": 1}
    assert calls[1:] == [("log", {"train/loss": 2.0, "global_step": 1}), ("log", {"eval/perplexity": 7.0, "global_step": 1}),
                         ("finish", None)]
