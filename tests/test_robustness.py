"""Robustness: atomic saves under SIGKILL/SIGTERM, exact resume from checkpoints, NaN guard, bad input
(one clear line, exit code 2, nothing half-written) and safe loading (no pickles, no remote code).

The slow tests run step 1's real main.py in subprocesses with the builtin model and test hooks read from
the environment: DSCHAT_TEST_SLOW_SAVE (save.py), DSCHAT_TEST_KILL_AFTER_STEP and DSCHAT_TEST_NAN_AT_STEPS
(loop.py).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dschat.models import export as save
from dschat.models.builtin import BUILTIN_MODEL_DIR
from dschat.runtime import checkpoint
from dschat.runtime.errors import FlagError, ModelPathError
from tests.helpers import env

REPO = Path(__file__).resolve().parents[1]
STEP1 = REPO / "training/step1_supervised_finetuning/main.py"
# ~120 training rows, 15 steps of batch 8; no judge prompts, one eval batch: a run takes ~15 s here.
TINY = ["--data_split", "1,2,97", "--max_seq_len", "64", "--eval_iters", "1", "--num_judge_prompts", "0",
        "--per_device_train_batch_size", "8", "--dtype", "fp32"]


STARTED: list[subprocess.Popen] = []


def kill_started() -> None:
    """Kill the runs a failed or timed-out test left behind."""
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(autouse=True)
def kill_leftover_runs():
    """Runs still going when a test ends (it failed or timed out) are killed."""
    yield
    kill_started()


@pytest.fixture
def shm_cleanup():
    """Remove the /dev/shm all-reduce buffers (69 MB each) that DeepSpeed leaks when a test SIGKILLs a run."""
    pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_*"
    before = set(Path("/dev/shm").glob(pattern))
    yield
    kill_started()
    orphans = set(Path("/dev/shm").glob(pattern)) - before
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        orphans = {o for o in orphans if str(o) not in text}
    for path in orphans:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One tokenised-data cache shared by this module's runs."""
    return tmp_path_factory.mktemp("data_cache")


def start_step1(args: list[str], data: Path, log: Path, **extra_env: str) -> subprocess.Popen:
    """Start step 1's main.py in the background; stdout and stderr go to `log`."""
    with open(log, "w") as f:
        STARTED.append(subprocess.Popen([sys.executable, str(STEP1), *TINY, "--data_output_path", str(data), *args],
                                        stdout=f, stderr=subprocess.STDOUT, env=env(**extra_env), cwd=REPO))
    return STARTED[-1]


def run_step1(args: list[str], data: Path, log: Path, timeout: float = 300, **extra_env: str) -> int:
    """Run step 1's main.py to the end; returns its exit status."""
    return start_step1(args, data, log, **extra_env).wait(timeout)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temps(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*")) + sorted(out.parent.glob(f".{out.name}.old-*"))


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def old_model(folder: Path) -> None:
    """A complete model folder as a previous save leaves it (the builtin model plus our marker)."""
    shutil.copytree(BUILTIN_MODEL_DIR, folder)
    (folder / save.DONE_MARKER).write_text(json.dumps({"complete": True, "old": True}))
    (folder / "training.log").write_text("old log\n")


def assert_old_model(folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    assert json.loads((folder / save.DONE_MARKER).read_text()) == {"complete": True, "old": True}
    assert sha(folder / "model.safetensors") == sha(Path(BUILTIN_MODEL_DIR) / "model.safetensors")
    AutoModelForCausalLM.from_pretrained(folder)


def wait_for_written_temp(proc: subprocess.Popen, out: Path, log: Path, exclude: tuple[Path, ...] = (),
                          timeout: float = 240) -> Path:
    """Wait until the run has written its model into a temp sibling of `out` (it then sleeps)."""
    end = time.time() + timeout
    while time.time() < end:
        done = [t for t in temps(out) if t not in exclude and (t / save.DONE_MARKER).exists()]
        if done:
            return done[0]
        assert proc.poll() is None, f"run ended before saving:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no save started in time")


# ---------------------------------------------------------------- 1. atomic saves

def test_kill_during_save_keeps_the_old_model_then_sigterm_cleans_up(tmp_path, data_dir, shm_cleanup):
    """SIGKILL while the new model sits in its temp folder: the old model stays whole at the output path
    (a leftover `.<name>.tmp-*` is all). SIGTERM at the same point: the exception path removes the temp
    folder, the next save's start removed the stale one, and the run ends with one line and status 143."""
    out = tmp_path / "model"
    old_model(out)
    log = tmp_path / "kill.log"
    proc = start_step1(["--output_dir", str(out)], data_dir, log, DSCHAT_TEST_SLOW_SAVE="120")
    stale = wait_for_written_temp(proc, out, log)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    assert_old_model(out)
    assert temps(out) == [stale]  # SIGKILL leaves its temp folder; never mistaken for the output

    log = tmp_path / "term.log"
    proc = start_step1(["--output_dir", str(out)], data_dir, log, DSCHAT_TEST_SLOW_SAVE="120")
    fresh = wait_for_written_temp(proc, out, log, exclude=(stale,))
    assert not stale.exists()  # stale temp folders of killed runs are removed when a save starts
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143
    text = log.read_text()
    assert "Traceback" not in text
    assert error_lines(text) == [text.strip().splitlines()[-1]]
    assert "interrupted (SIGTERM)" in text
    assert not fresh.exists() and temps(out) == []
    assert_old_model(out)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
def test_atomic_dir_replaces_whole_and_keeps_logs_and_checkpoints(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(save, "_exchange", lambda a, b: False)  # the path for systems without renameat2
    out = tmp_path / "model"
    out.mkdir()
    for name in ("config.json", "pytorch_model.bin", "adapter_config.json", "model-00001-of-00002.safetensors",
                 save.DONE_MARKER, "notes.txt"):
        (out / name).write_text("old")
    (out / "checkpoints" / "step5").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step5")
    log = open(out / "training.log", "w")  # the training scripts write their log here while main.py runs
    log.write("before save\n")
    log.flush()
    inode = (out / "training.log").stat().st_ino
    with save.atomic_dir(str(out)) as tmp:
        (tmp / "config.json").write_text("new")
        (tmp / "model.safetensors").write_text("new")
    log.write("after save\n")
    log.close()
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoints", "config.json", "model.safetensors", "notes.txt", "training.log"]
    assert (out / "config.json").read_text() == "new"  # old weights, adapters, shards and markers are gone
    assert (out / "checkpoints" / "latest").read_text() == "step5"
    assert (out / "training.log").stat().st_ino == inode
    assert (out / "training.log").read_text() == "before save\nafter save\n"
    assert temps(out) == []


def test_atomic_dir_failure_or_ctrl_c_leaves_the_old_folder(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")
    for exc in (RuntimeError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with save.atomic_dir(str(out)) as tmp:
                (tmp / "config.json").write_text("new")
                raise exc
        assert (out / "config.json").read_text() == "old" and temps(out) == []
    with save.atomic_dir(str(tmp_path / "fresh" / "model")) as tmp:  # a new path, parents created
        (tmp / "config.json").write_text("new")
        (tmp / "model.safetensors").touch(mode=0o600)  # as transformers' own atomic write leaves it
    assert (tmp_path / "fresh" / "model" / "config.json").read_text() == "new"
    # The saved folder gets the umask's permissions, not mkdtemp's 0700 (others on a shared box can read it).
    umask = os.umask(0o022)
    try:
        with save.atomic_dir(str(tmp_path / "shared")) as tmp:
            (tmp / "model.safetensors").touch(mode=0o600)
    finally:
        os.umask(umask)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "shared" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_stale_temps_are_removed_but_not_a_concurrent_save(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    out = tmp_path / "model"
    stale, old, current, mine = (tmp_path / f".model.{k}" for k in (f"tmp-{dead.pid}-x", f"old-{dead.pid}",
                                                                    f"tmp-{live.pid}-y", f"tmp-{os.getpid()}-z"))
    for d in (stale, old, current, mine):
        d.mkdir()
        (d / "config.json").write_text("x")
    try:
        # `out` is missing and a stale .old-* exists: killed between the two renames of the fallback swap.
        assert save.clean_stale_temps(out) == [stale]
        assert (out / "config.json").exists() and not old.exists()  # the old model is put back
        assert current.exists() and mine.exists()  # their processes still run: saves in progress
        assert save.clean_stale_temps(out) == []
    finally:
        live.kill()
        live.wait()


def test_a_folder_without_a_model_keeps_its_files(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "settings.json").write_text("mine")
    (out / "tokenizer.json").write_text("mine")
    with save.atomic_dir(str(out)) as tmp:
        (tmp / "config.json").write_text("new")
        (tmp / "tokenizer.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "settings.json", "tokenizer.json"]
    assert (out / "settings.json").read_text() == "mine" and (out / "tokenizer.json").read_text() == "new"


def test_check_output_dir(tmp_path):
    save.check_output_dir(str(tmp_path / "new"))  # absent: fine
    (tmp_path / "logs_only").mkdir()
    (tmp_path / "logs_only" / "training.log").write_text("x")
    (tmp_path / "logs_only" / "settings.json").write_text("x")
    save.check_output_dir(str(tmp_path / "logs_only"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(FlagError, match="not a folder"):
        save.check_output_dir(str(tmp_path / "file"))
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "SmolLM2.Q4_1.gguf").write_text("")  # e.g. the source model itself
    with pytest.raises(FlagError, match="holds weight files but no model"):
        save.check_output_dir(str(tmp_path / "gguf"))


# ---------------------------------------------------------------- 2. resume

@pytest.mark.parametrize("zero_stage", ["0", "2"])
def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path, data_dir, zero_stage, shm_cleanup):
    """Fixed seed, dropout 0.1 (so the RNG matters): SIGKILL right after the step-5 checkpoint, then
    --resume, gives bit-identical weights to an uninterrupted run (model, optimizer, LR schedule, RNG and
    data position all restored; ZeRO-2 checkpoints hold DeepSpeed types the safe loader must allow)."""
    flags = ["--save_interval", "5", "--dropout", "0.1", "--zero_stage", zero_stage]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    ref = start_step1([*flags, "--output_dir", str(full)], data_dir, tmp_path / "full.log")
    killed = start_step1([*flags, "--output_dir", str(resumed)], data_dir, tmp_path / "killed.log",
                         DSCHAT_TEST_KILL_AFTER_STEP="5")
    assert killed.wait(300) == -signal.SIGKILL
    # no model yet: the checkpoint and what the run logged (metrics.jsonl, TensorBoard) up to the kill
    assert sorted(p.name for p in resumed.iterdir()) == ["checkpoints", "metrics.jsonl", "step1_tensorboard"]
    assert (resumed / "checkpoints" / "latest").read_text() == "step5"
    assert run_step1([*flags, "--output_dir", str(resumed), "--resume"], data_dir, tmp_path / "resume.log") == 0
    assert ref.wait(300) == 0, (tmp_path / "full.log").read_text()[-3000:]
    assert "resuming from" in (tmp_path / "resume.log").read_text()

    from safetensors.torch import load_file

    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = json.loads((resumed / "dschat_metrics.json").read_text())
    assert metrics["steps"] == 15 and metrics["skipped_updates"] == 0
    # The eval history survives the kill: the resumed run reports the same start as the uninterrupted one.
    full_evals = json.loads((full / "dschat_metrics.json").read_text())["evals"]
    assert [e["when"] for e in metrics["evals"]] == [e["when"] for e in full_evals]
    assert metrics["evals"][0] == full_evals[0]
    # outputs are safetensors only; the checkpoints (DeepSpeed .pt files) are read with weights_only=True
    for folder in (full, resumed):
        assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")
                    and "checkpoints" not in p.parts]
        assert (folder / "checkpoints" / "step15" / "state.json").exists()


def test_resume_refuses_other_settings_and_rank_counts(tmp_path):
    folder = tmp_path / "checkpoints" / "step5"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"epoch": 0, "batch": 5, "step": 5, "world_size": 2,
                                                   "rng": [{}, {}]}))
    assert checkpoint.latest(str(tmp_path)) == folder
    with pytest.raises(checkpoint.CheckpointError, match="2 rank"):
        checkpoint.load(folder, {})
    state = {"resume_key": {"per_device_train_batch_size": 8, "seed": 1}}
    checkpoint.check_compatible(state, {"per_device_train_batch_size": 8, "seed": 1})
    with pytest.raises(checkpoint.CheckpointError, match="per_device_train_batch_size: checkpoint 8, now 4"):
        checkpoint.check_compatible(state, {"per_device_train_batch_size": 4, "seed": 1})
    (tmp_path / "checkpoints" / "step9").mkdir()  # a checkpoint killed while being written: no state.json
    assert checkpoint.latest(str(tmp_path)) == folder


@pytest.mark.parametrize("state, field", [({"epoch": 0, "batch": 1, "step": 1}, "'rng' missing"),
                                          ({"batch": 1, "step": 1, "rng": [{}]}, "'epoch' missing"),
                                          ({"epoch": 0, "batch": "x", "step": 1, "rng": [{}]}, "'batch' is 'x'"),
                                          ({"epoch": 0, "batch": 1, "step": 1, "rng": "abc"}, "'rng' is not a list"),
                                          ([1, 2], "a JSON list")])
def test_resume_refuses_a_corrupt_state_json_in_one_line(tmp_path, state, field):
    """A missing or corrupt state.json field is one CheckpointError line naming the file and field (was KeyError)."""
    folder = tmp_path / "checkpoints" / "step1"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps(state))
    for call in (lambda: checkpoint.check_resume(str(tmp_path), {}), lambda: checkpoint.load(folder, {}),
                 lambda: checkpoint.resume_state(str(tmp_path), {}, {})):
        with pytest.raises(checkpoint.CheckpointError) as err:
            call()
        assert "state.json" in str(err.value) and field in str(err.value) and "\n" not in str(err.value)


def test_resume_key_covers_data_lora_and_estimator(tmp_path):
    """Another --data_path or --data_split, LoRA added, another advantage estimator: refused before any model is
    built; the same data named another way (relative path, builtin alias) is not."""
    from dschat.data.phases import DataSettings
    from dschat.trainers.base import data_key, lora_key

    def key(split="2,4,4", path=("dschat/builtin",), lora=0, estimator="gae"):
        settings = DataSettings(data_path=path, data_split=split, phase=3, seed=1)
        return data_key(settings) | lora_key(argparse.Namespace(actor_lora_dim=lora, actor_lora_module_name="layers.",
                                                                actor_lora_target_modules=None), "actor_") \
            | {"advantage_estimator": estimator}

    (tmp_path / "rows.jsonl").write_text("{}\n")
    folder = tmp_path / "checkpoints" / "step1"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"epoch": 0, "batch": 1, "step": 1, "rng": [{}],
                                                   "resume_key": key(path=(str(tmp_path / "rows.jsonl"),))}))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        checkpoint.check_resume(str(tmp_path), key(path=("rows.jsonl",)))  # the same file, relative
        for changed, text in ((key(path=("rows.jsonl",), split="1,0,0"), "data_split: checkpoint '2,4,4', now '1,0,0'"),
                              (key(), "data_path"), (key(path=("rows.jsonl",), lora=8), "actor_lora_dim: checkpoint 0"),
                              (key(path=("rows.jsonl",), estimator="rloo"), "advantage_estimator: checkpoint 'gae'")):
            with pytest.raises(checkpoint.CheckpointError, match=re.escape(text)):
                checkpoint.check_resume(str(tmp_path), changed)
    finally:
        os.chdir(cwd)
    assert key(path=("builtin",)) == key()


def test_resume_names_lora_added_instead_of_a_state_dict_traceback(tmp_path):
    class Engine:
        checkpoint_engine = argparse.Namespace(load=None)

        def load_checkpoint(self, path, tag):
            raise RuntimeError('Error(s) in loading state_dict for PeftModelForCausalLM:\n\tMissing key(s) in '
                               'state_dict: "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"')

    with pytest.raises(checkpoint.CheckpointError, match="LoRA adapters .* differ") as err:
        checkpoint._load_engine(tmp_path, "train", Engine())
    assert "\n" not in str(err.value)


def test_safe_loader_allows_deepspeed_types_only_where_needed(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    path = tmp_path / "ok.pt"
    torch.save({"weights": torch.ones(2), "loss_scaler": LossScaler(1.0), "stages": {1, 2}}, path)
    loaded = checkpoint._safe_load(str(path))
    assert torch.equal(loaded["weights"], torch.ones(2)) and isinstance(loaded["loss_scaler"], LossScaler)
    with pytest.raises(Exception, match="LossScaler"):  # the allowlist does not leak to other torch.load calls
        torch.load(path, weights_only=True)
    torch.save({"weights": torch.zeros(2), "obj": Path("x")}, tmp_path / "evil.pt")  # not an allowed type
    with pytest.raises(checkpoint.CheckpointError, match="refused"):
        checkpoint._safe_load(str(tmp_path / "evil.pt"))


STEP3 = REPO / "training/step3_rlhf_finetuning/main.py"
# The critic is the tiny_reward_model fixture (tests/conftest.py): a causal LM is refused as critic.
TINY_STEP3 = ["--actor_model_name_or_path", "builtin", "--data_split",
              "2,4,4", "--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "4",
              "--max_answer_seq_len", "8", "--num_judge_prompts", "4", "--enable_test_mode", "--num_warmup_steps",
              "0", "--target_kl", "0.05", "--save_interval", "1", "--dtype", "fp32"]


@pytest.mark.parametrize("estimator", ["gae", "rloo"])
def test_step3_resume_matches_an_uninterrupted_run(tmp_path, data_dir, tiny_reward_model, estimator):
    """Step 3 (sampled rollouts, adaptive KL controller): a run stopped after 3 PPO steps and resumed from
    its last checkpoint ends with the same actor and critic as a run of 4 steps straight through; a
    critic-free estimator (groups of 2 answers, KL as a loss) resumes without a critic to restore."""
    critic_free = estimator != "gae"
    extra = ["--advantage_estimator", estimator, "--n_samples_per_prompt", "2", "--use_kl_loss",
             "--kl_estimator", "k3"] if critic_free else []

    def step3(out: Path, stop: int, *more: str) -> subprocess.Popen:
        with open(tmp_path / f"{out.name}-{stop}.log", "w") as log:
            STARTED.append(subprocess.Popen([sys.executable, str(STEP3), *TINY_STEP3, "--critic_model_name_or_path",
                                             str(tiny_reward_model), "--data_output_path",
                                             str(data_dir), "--test_stop_step", str(stop), "--output_dir", str(out),
                                             *extra, *more], stdout=log, stderr=subprocess.STDOUT, env=env(),
                                            cwd=REPO))
        return STARTED[-1]

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    ref = step3(full, 4)
    assert step3(resumed, 3).wait(300) == 0, (tmp_path / "resumed-3.log").read_text()[-3000:]
    assert step3(resumed, 4, "--resume").wait(300) == 0, (tmp_path / "resumed-4.log").read_text()[-3000:]
    assert ref.wait(300) == 0, (tmp_path / "full-4.log").read_text()[-3000:]
    assert "resuming from" in (tmp_path / "resumed-4.log").read_text()
    evals = [json.loads((d / "actor" / "dschat_metrics.json").read_text())["evals"] for d in (full, resumed)]
    assert evals[1][0] == evals[0][0] and evals[1][0]["when"] == "start (SFT)"
    # Resuming with settings that move the data position is refused, naming the setting.
    assert step3(resumed, 5, "--resume", "--seed", "7").wait(300) != 0
    assert "seed: checkpoint 1234, now 7" in (tmp_path / "resumed-5.log").read_text()

    from safetensors.torch import load_file

    for part in ("actor",) if critic_free else ("actor", "critic"):
        a, b = load_file(full / part / "model.safetensors"), load_file(resumed / part / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert (resumed / "critic").exists() != critic_free


# ---------------------------------------------------------------- 3. NaN guard

def test_nan_losses_are_skipped_then_the_run_stops_cleanly(tmp_path, data_dir):
    """An isolated NaN loss is skipped and counted; 3 in a row stop the run with one line and status 2,
    before any model is saved, and the last checkpoint (step 4) stays intact and finite."""
    out = tmp_path / "out"
    log = tmp_path / "nan.log"
    rc = run_step1(["--output_dir", str(out), "--save_interval", "2", "--max_bad_steps", "3"], data_dir, log,
                   DSCHAT_TEST_NAN_AT_STEPS="3,7,8,9")
    text = log.read_text()
    assert rc == 2, text[-3000:]
    assert "Traceback" not in text
    assert error_lines(text) == [text.strip().splitlines()[-1]]
    assert "3 updates in a row had a NaN/inf loss" in error_lines(text)[0]
    assert "1 in a row, 1 in all" in text and "2 in a row, 3 in all" in text  # skipped and counted
    # no final model, no temp folder: the checkpoint and the logged steps
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl", "step1_tensorboard"]
    assert (out / "checkpoints" / "latest").read_text() == "step4"
    state = json.loads((out / "checkpoints" / "step4" / "state.json").read_text())
    assert (state["step"], state["batch"]) == (4, 5)  # micro-batch 3 was skipped, so step 4 ends at batch 5
    weights = checkpoint._safe_load(str(out / "checkpoints/step4/train/state/mp_rank_00_model_states.pt"))
    assert all(torch.isfinite(t).all() for t in weights["module"].values())


# ---------------------------------------------------------------- 4. bad input

DRIVER = r'''
import json, os, runpy, sys, time, traceback
sys.path.insert(0, os.getcwd())
import deepspeed, transformers, datasets  # noqa: E401,F401  imported once; every case is a fork
import dschat.trainers.sft, dschat.cli.entry  # noqa: E401,F401
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed  # noqa: F401  (lazy modules)
from deepspeed.accelerator import get_accelerator
get_accelerator()
cases, results = json.loads(sys.argv[1]), {}
for name, (argv, extra_env) in cases.items():
    err_path = os.path.join(sys.argv[2], name + ".err")
    start = time.time()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.environ.update(extra_env)
            fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            def refuse(*a, **k):
                print("DSCHAT_TEST: deepspeed.initialize was called", file=sys.stderr, flush=True)
                raise SystemExit(99)
            deepspeed.initialize = refuse
            sys.argv = [argv[0], *argv[1:]]
            runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            import atexit
            atexit._run_exitfuncs()  # as a normal exit would (dschat.runtime.dist removes DeepSpeed's /dev/shm buffer)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    results[name] = {"rc": os.waitstatus_to_exitcode(status), "seconds": round(time.time() - start, 2),
                     "output": open(err_path).read()}
print("RESULTS " + json.dumps(results))
'''


def bad_input_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (flags, text the error line must contain)."""
    jsonl = tmp / "bad.jsonl"
    jsonl.write_text('{"prompt": " Human: hi Assistant:", "chosen": " hello", "rejected": " go"}\n{"prompt": oops}\n')
    (tmp / "missing.jsonl").write_text('{"prompt": " Human: hi Assistant:"}\n')
    (tmp / "empty.jsonl").write_text('{"prompt": "  ", "chosen": " hi", "rejected": " no"}\n')
    bad_cfg = tmp / "bad_config"
    bad_cfg.mkdir()
    (bad_cfg / "config.json").write_text('{"model_type": "llama", ')
    no_cfg = tmp / "no_config"
    no_cfg.mkdir()
    (no_cfg / "weights.bin").write_text("")
    reward = tmp / "reward_model"
    shutil.copytree(BUILTIN_MODEL_DIR, reward)
    cfg = json.loads((reward / "config.json").read_text())
    (reward / "config.json").write_text(json.dumps(cfg | {"architectures": ["LlamaForSequenceClassification"]}))
    step3_out = tmp / "step3_out"
    (step3_out / "critic").mkdir(parents=True)
    shutil.copytree(BUILTIN_MODEL_DIR, step3_out / "actor")
    (step3_out / "critic" / "config.json").write_text("{}")
    (tmp / "a_file").write_text("x")
    (tmp / "adapter_folder").mkdir()
    (tmp / "adapter_folder" / "adapter_model.safetensors").write_text("")
    return {
        "malformed_json": (["--data_path", str(jsonl)], f"{jsonl}:2: invalid JSON"),
        "missing_field": (["--data_path", str(tmp / "missing.jsonl")], "missing.jsonl: a 'train' row of phase 1 has no 'chosen' answer"),
        "empty_field": (["--data_path", str(tmp / "empty.jsonl")], "empty.jsonl:1: field 'prompt' is empty"),
        "all_rows_too_long": (["--max_seq_len", "4"], "rows, all dropped for length (--max_seq_len=4)"),
        "unknown_dataset": (["--data_path", "nosuch/dataset"], "unknown dataset 'nosuch/dataset'"),
        "bad_data_split": (["--data_split", "1,2"], "--data_split '1,2'"),
        "model_path_missing": (["--model_name_or_path", str(tmp / "nosuch")], "model path not found"),
        "model_hub_name_offline": (["--model_name_or_path", "nosuch-org/nosuch-model"], "not reachable"),
        "model_bad_config": (["--model_name_or_path", str(bad_cfg)], "not a valid JSON"),
        "model_no_config": (["--model_name_or_path", str(no_cfg)], "holds no config.json"),
        "step3_output_folder": (["--model_name_or_path", str(step3_out)], f"pass {step3_out / 'actor'}"),
        "reward_model_as_causal_lm": (["--model_name_or_path", str(reward)], "LlamaForSequenceClassification"),
        "fp16_on_cpu": (["--dtype", "fp16"], "--dtype fp16 is not supported on CPU"),
        "batch_size_0": (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1"),
        "only_optimize_lora_without_lora": (["--only_optimize_lora"], "--only_optimize_lora needs LoRA"),
        "lora_matches_nothing": (["--lora_dim", "4", "--lora_module_name", "nomatch"], "matches no Linear"),
        "resume_without_output_dir": (["--resume"], "--resume needs --output_dir"),
        "output_dir_is_a_file": (["--output_dir", str(tmp / "a_file")], "exists and is not a folder"),
        "output_dir_holds_other_weights": (["--output_dir", str(tmp / "adapter_folder")], "weight files but no model"),
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fp16 case expects a CPU-only machine")
def test_bad_input_gives_one_line_and_status_2(tmp_path, shm_cleanup):
    """Each case runs step 1's main.py as `__main__` in a forked child of one pre-imported driver process
    (imports cost ~7 s a process here); deepspeed.initialize is booby-trapped: every case must fail first."""
    data = tmp_path / "data"
    cases = bad_input_cases(tmp_path)
    argvs = {}
    for name, (flags, _) in cases.items():
        if "--output_dir" not in flags and name != "resume_without_output_dir":
            flags = [*flags, "--output_dir", str(tmp_path / f"out_{name}")]
        argvs[name] = ([str(STEP1), *TINY, "--data_output_path", str(data), *flags], {})
    logs = tmp_path / "logs"
    logs.mkdir()
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs), str(logs)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS ", 1)[1])
    for name, (_, expected) in cases.items():
        r = results[name]
        lines = error_lines(r["output"])
        assert r["rc"] == 2, f"{name}: status {r['rc']}\n{r['output'][-3000:]}"
        assert "Traceback" not in r["output"] and "DSCHAT_TEST" not in r["output"], name
        assert len(lines) == 1 and lines[0] == r["output"].strip().splitlines()[-1], f"{name}: {r['output']}"
        assert expected in lines[0], f"{name}: {lines[0]}"
        assert not (tmp_path / f"out_{name}").exists(), name  # nothing written
    assert not list(data.glob(".*")) if data.exists() else True  # no half-built data cache
    print({name: r["seconds"] for name, r in results.items()})


def load_step3_parse_args():
    spec = importlib.util.spec_from_file_location("step3_main", REPO / "training/step3_rlhf_finetuning/main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


def test_critic_defaults_are_filled_in_when_a_critic_trains():
    """The critic-only flags are None in the parser (to tell given from default) and filled in for gae."""
    args = load_step3_parse_args()(["--critic_weight_decay", "0.1"])
    assert (args.critic_learning_rate, args.critic_weight_decay) == (5e-4, 0.1)
    args = load_step3_parse_args()(["--advantage_estimator", "rloo", "--n_samples_per_prompt", "2"])
    assert (args.critic_learning_rate, args.critic_weight_decay) == (5e-4, 0.0)


@pytest.mark.parametrize("flags,expected", [
    (["--inference_tp_size", "2"], "--inference_tp_size > 1 requires --actor_zero_stage 3"),
    (["--inference_tp_size", "2", "--actor_zero_stage", "3"], "tensor-parallel generation is not supported"),
    (["--per_device_generation_batch_size", "3", "--per_device_training_batch_size", "2"], "must be a multiple"),
    (["--per_device_generation_batch_size", "0"], "must be at least 1"),
    (["--only_optimize_lora", "--actor_lora_dim", "0"], "--only_optimize_lora needs LoRA"),
    (["--resume"], "--resume needs --output_dir"),
    (["--align_overflow"], "--align_overflow is not supported"),
    (["--ppo_epochs", "0"], "--ppo_epochs must be at least 1"),
    (["--num_train_epochs", "0"], "--num_train_epochs must be at least 1"),
    (["--advantage_estimator", "grpo"], "set --n_samples_per_prompt 2 or more"),
    (["--advantage_estimator", "rloo", "--n_samples_per_prompt", "2", "--critic_lora_dim", "4"],
     "--critic_lora_dim: --advantage_estimator rloo trains no critic"),
    (["--advantage_estimator", "grpo", "--n_samples_per_prompt", "2", "--critic_learning_rate", "5e-4"],
     "--critic_learning_rate: --advantage_estimator grpo trains no critic"),
    (["--advantage_estimator", "reinforce_pp", "--critic_weight_decay", "0"],
     "--critic_weight_decay: --advantage_estimator reinforce_pp trains no critic"),
    (["--advantage_estimator", "reinforce_pp", "--recompute_critic_values"],
     "--recompute_critic_values: --advantage_estimator reinforce_pp trains no critic"),
    (["--n_samples_per_prompt", "3", "--per_device_generation_batch_size", "2",
      "--per_device_training_batch_size", "4"], "must be a multiple"),
])
def test_step3_flag_checks(flags, expected):
    parse_args = load_step3_parse_args()
    with pytest.raises(FlagError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        parse_args(flags)


# ---------------------------------------------------------------- 5. safe loading

SCANNED = ["dschat", "training", "inference", "e2e_rlhf.py", "chat.py", "bench", "scripts"]
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def python_files() -> list[Path]:
    files = []
    for entry in SCANNED:
        path = REPO / entry
        files += [path] if path.is_file() else sorted(path.rglob("*.py")) if path.is_dir() else []
    # our code only: not the virtual environments and caches benchmarks build under hidden folders
    return [f for f in files if not any(part.startswith(".") for part in f.relative_to(REPO).parts)]


def test_no_unsafe_loading_in_the_code():
    """Every torch.load passes weights_only=True; nothing imports pickle-like modules, passes
    allow_pickle=True or trust_remote_code=True, or defaults trust_remote_code to True."""
    problems = []
    for path in python_files():
        where = path.relative_to(REPO)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
                kw = {k.arg: k.value for k in node.keywords}
                if name == "load" and owner == "torch":
                    weights_only = kw.get("weights_only")
                    if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                        problems.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
                for key in ("allow_pickle", "trust_remote_code"):
                    if isinstance(kw.get(key), ast.Constant) and kw[key].value is True:
                        problems.append(f"{where}:{node.lineno}: {key}=True")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(m.split(".")[0] in PICKLE_MODULES for m in mods):
                    problems.append(f"{where}:{node.lineno}: imports {mods}")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults + \
                    node.args.kw_defaults
                for arg, default in zip(args, defaults):
                    if arg.arg == "trust_remote_code" and isinstance(default, ast.Constant) and default.value:
                        problems.append(f"{where}:{node.lineno}: {node.name}(trust_remote_code=True)")
    assert len(python_files()) > 20
    assert not problems, "\n".join(problems)


def test_remote_code_never_runs_without_the_flag(tmp_path):
    """A model folder whose config points at its own Python code: without --trust_remote_code loading
    fails with a clear ModelPathError and the code is never imported."""
    from transformers import AutoModelForCausalLM

    from dschat.models.loading import load_model, model_config

    folder = tmp_path / "remote"
    folder.mkdir()
    ran = tmp_path / "code_ran"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "dschat_evil", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                  "AutoModelForCausalLM": "evil.EvilModel"}}))
    (folder / "evil.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    for load in (lambda: model_config(str(folder)), lambda: load_model(AutoModelForCausalLM, str(folder))):
        with pytest.raises(ModelPathError):
            load()
    assert not ran.exists()


def test_trust_remote_code_is_off_by_default():
    spec = importlib.util.spec_from_file_location("step1_main", STEP1)
    step1 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step1)
    assert step1.parse_args([]).trust_remote_code is False
    assert load_step3_parse_args()([]).trust_remote_code is False


def test_ctrl_c_while_a_step_imports_is_one_line(tmp_path):
    """Ctrl-C in a step's first seconds, while torch and the rest load (issue 30 item 9): exit 130 with one
    `error: interrupted` line, no traceback, nothing written."""
    proc = subprocess.Popen([sys.executable, "-X", "importtime", str(STEP1), "--model_name_or_path", "builtin",
                             "--output_dir", str(tmp_path / "out")], cwd=REPO, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sent = False
    try:
        for line in proc.stderr:  # -X importtime: one line as each module finishes loading
            if line.split("|")[-1].strip() == "torch":  # torch is in; dschat's own modules are still loading
                proc.send_signal(signal.SIGINT)
                sent = True
                break
        err = proc.stderr.read() if sent else ""
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sent
    lines = [ln for ln in err.splitlines() if not ln.startswith("import time:")]
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and lines and lines[-1].startswith("error: interrupted"), lines[-20:]
    assert not (tmp_path / "out").exists()
