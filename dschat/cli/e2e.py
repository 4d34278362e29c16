"""What e2e_rlhf.py needs besides its flags: model names to training scripts and output folders, completion
checks, running a step's script with one live progress line, and the final summary.

Kept free of torch/deepspeed imports so `e2e_rlhf.py --help` and the skip logic stay instant.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dschat.runtime import lock
from dschat.runtime.errors import FlagError

REPO = Path(__file__).resolve().parents[2]
DONE_MARKER = "dschat_complete.json"  # == dschat.models.export.DONE_MARKER (tests/test_e2e.py checks)
STEP_DIRS = {1: "training/step1_supervised_finetuning", 2: "training/step2_reward_model_finetuning",
             3: "training/step3_rlhf_finetuning"}
OUT_KINDS = {1: "actor-models", 2: "reward-models", 3: "step3-models"}
STEP_NAMES = {1: "SFT", 2: "Reward model", 3: "RLHF"}
BUILTIN_NAMES = ("builtin", "dschat/builtin")
PACKAGED_MODELS = ("smollm2-135m",)  # == dschat.models.builtin.PACKAGED_MODELS (tests/test_e2e.py checks)
EXTRA_ARGS_ENV = "DSCHAT_E2E_EXTRA_ARGS_STEP{}"
PROGRESS_RE = re.compile(r"step\d[^:\r\n]{0,40}:\s*\d+%\|")
WHAT_CHANGED = {1: "start: base model, end: SFT", 2: "start: untrained head, end: trained",
                3: "start: SFT actor, end: RLHF actor"}
# --algo dpo: step 1 (SFT), then DPO from the SFT model as step 2; no reward model, no step 3.
ALGOS = ("ppo", "dpo")
DPO_STEP_DIR = "training/step2_dpo_finetuning"
DPO_OUT_KIND = "dpo-models"
DPO_STEP_NAME = "DPO"
DPO_WHAT_CHANGED = "start: SFT model, end: DPO"
VERIFIER_SUFFIX = "_verifier"  # step 3 scripts that train against rule-based rewards: run_<x>_verifier.sh


@dataclass(frozen=True)
class Pipeline:
    """One e2e pipeline: its steps, each step's training folder, output kind, name, what its metrics compare,
    which earlier steps it starts from and which --*-zero-stage it takes; `final` is the step whose model is
    the result, `script_suffix` picks its step-3 scripts."""

    name: str
    steps: tuple[int, ...]
    step_dirs: dict[int, str]
    out_kinds: dict[int, str]
    step_names: dict[int, str]
    what_changed: dict[int, str]
    needs: dict[int, tuple[int, ...]]
    zero_stage: dict[int, str]  # "actor" or "reward"
    final: int
    script_suffix: str = ""


PIPELINES = {
    # DeepSpeed-Chat's: SFT, reward model, PPO against it.
    "ppo": Pipeline("ppo", (1, 2, 3), STEP_DIRS, OUT_KINDS, STEP_NAMES, WHAT_CHANGED, {3: (1, 2)},
                    {1: "actor", 2: "reward", 3: "actor"}, 3),
    # --algo dpo: SFT, then DPO from the SFT model as step 2 (the actor's ZeRO stage, no step 3).
    "dpo": Pipeline("dpo", (1, 2), {1: STEP_DIRS[1], 2: DPO_STEP_DIR}, {1: OUT_KINDS[1], 2: DPO_OUT_KIND},
                    {1: STEP_NAMES[1], 2: DPO_STEP_NAME}, {1: WHAT_CHANGED[1], 2: DPO_WHAT_CHANGED}, {2: (1,)},
                    {1: "actor", 2: "actor"}, 2),
    # --reward-fn without reward_model: SFT, then step 3 against rule-based rewards (no reward model, no step 2).
    "verifier": Pipeline("verifier", (1, 3), {1: STEP_DIRS[1], 3: STEP_DIRS[3]}, {1: OUT_KINDS[1], 3: OUT_KINDS[3]},
                         {1: STEP_NAMES[1], 3: "RLHF (rules)"}, {1: WHAT_CHANGED[1], 3: WHAT_CHANGED[3]}, {3: (1,)},
                         {1: "actor", 3: "actor"}, 3, VERIFIER_SUFFIX),
}


def pipeline_for(algo: str, reward_fn: list[str] | None) -> Pipeline:
    """The pipeline e2e runs: DPO for --algo dpo, "verifier" when --reward-fn leaves out reward_model, else PPO."""
    if algo == "dpo":
        return PIPELINES["dpo"]
    if reward_fn and "reward_model" not in reward_fn:
        return PIPELINES["verifier"]
    return PIPELINES["ppo"]


@dataclass(frozen=True)
class ModelSpec:
    """A --actor-model/--reward-model value: its family, size, output-folder name and path to train from."""

    arg: str
    family: str  # "builtin", "opt", "llama2", "smollm2" or "other"
    size: str  # "1.3b", "7b", ... ("" for builtin/other)
    name: str  # folder name under <out>/{actor,reward,step3}-models
    path: str  # what a generic script trains from


DATA_FILE_SUFFIXES = (".json", ".jsonl", ".gz", ".csv", ".parquet", ".arrow", ".txt")


def check_flags(num_gpus: int | None, data_split: str | None, data_path: list[str] | None,
                reward_weights: list[float] | None) -> None:
    """e2e's own flags before any work starts (FlagError naming the flag): a positive rank count, a --data-split of
    three finite non-negative shares with a positive sum, local data files that exist, finite reward weights (main()
    checks --output-dir can be made before any step runs)."""
    if num_gpus is not None and num_gpus < 1:
        raise FlagError(f"--num-gpus must be at least 1 (got {num_gpus})")
    if data_split is not None:
        try:
            parts = [float(x) for x in data_split.split(",")]
        except ValueError:
            parts = []
        if len(parts) != 3 or not all(math.isfinite(x) and x >= 0 for x in parts) or sum(parts) <= 0:
            raise FlagError(f"--data-split '{data_split}': expected three finite non-negative numbers with a positive "
                            f"sum, like 2,4,4")
    for entry in data_path or []:
        if entry.lower().endswith(DATA_FILE_SUFFIXES) and not os.path.exists(entry):
            raise FlagError(f"--data-path {entry}: no such file")
    for w in reward_weights or []:
        if not math.isfinite(w):
            raise FlagError(f"--reward-weights must be finite numbers (got {w})")


def sanitize(name: str) -> str:
    """A safe folder name from a model path or hub name (its basename, odd characters replaced)."""
    base = Path(name.rstrip("/")).name or "model"
    base = re.sub(r"\.gguf$", "", base, flags=re.I)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "model"


def resolve_model(arg: str) -> ModelSpec:
    """Classify a model name: builtin, an OPT size (1.3b, opt-1.3b, facebook/opt-1.3b), Llama-2, or other."""
    if arg in BUILTIN_NAMES:
        return ModelSpec(arg, "builtin", "", "builtin", "builtin")
    if os.path.exists(arg):  # a local folder or file is always trained as given
        return ModelSpec(arg, "other", "", sanitize(os.path.abspath(arg)), os.path.abspath(arg))
    if arg.lower() in PACKAGED_MODELS:  # a real model from PyPI, with CPU- and GPU-sized scripts
        family, size = arg.lower().split("-", 1)
        return ModelSpec(arg, family, size, arg.lower(), arg.lower())
    m = re.fullmatch(r"(?:facebook/)?(?:opt-)?(\d+(?:\.\d+)?[mb])", arg, flags=re.I)
    if m:
        size = m.group(1).lower()
        return ModelSpec(arg, "opt", size, size, f"facebook/opt-{size}")
    m = re.fullmatch(r"(?:meta-llama/)?llama-?2-(\d+b)(?:-hf)?", arg, flags=re.I)
    if m:
        size = m.group(1).lower()
        return ModelSpec(arg, "llama2", size, f"llama2-{size}", arg)
    return ModelSpec(arg, "other", "", sanitize(arg), arg)


def output_dirs(out: Path, actor: ModelSpec, reward: ModelSpec, algo: str | Pipeline = "ppo") -> dict[int, Path]:
    """DeepSpeed-Chat's output layout: <out>/actor-models/<a>, <out>/reward-models/<r>, <out>/step3-models/<a>;
    with algo "dpo": <out>/actor-models/<a> and <out>/dpo-models/<a> (no reward model, no step 3); the
    verifier pipeline: <out>/actor-models/<a> and <out>/step3-models/<a>."""
    pipe = algo if isinstance(algo, Pipeline) else PIPELINES[algo]
    return {s: out / pipe.out_kinds[s] / (reward.name if pipe.zero_stage[s] == "reward" else actor.name)
            for s in pipe.steps}


def step_name(step: int, algo: str | Pipeline = "ppo") -> str:
    """A step's name in progress lines and the summary table ("DPO" for step 2 with algo "dpo")."""
    pipe = algo if isinstance(algo, Pipeline) else PIPELINES[algo]
    return pipe.step_names[step]


def pick_script(step: int, spec: ModelSpec, deployment: str, num_gpus: int | None = None,
                step_dir: str | None = None, suffix: str = "") -> tuple[Path, list[str]]:
    """The training script for `spec` in `step` and the positional args it takes after OUTPUT ZERO_STAGE:
    the model path for run_generic.sh and for every step-2 script (their optional $3 BASE_MODEL, passed
    always so that extra flags never land in $3). Step 3 is given the actor's spec and takes none.
    `step_dir` replaces STEP_DIRS[step] (DPO's folder for its step 2); `suffix` picks run_<x><suffix>.sh (the
    verifier pipeline's step-3 scripts, which take ACTOR [ACTOR_ZERO_STAGE] [OUTPUT])."""
    scripts = REPO / (step_dir or STEP_DIRS[step]) / "training_scripts"
    candidates: list[Path] = []
    if spec.family == "builtin":
        if num_gpus and num_gpus > 1:
            candidates.append(scripts / f"run_tiny_cpu_{num_gpus}ranks{suffix}.sh")
        candidates.append(scripts / f"run_tiny_cpu{suffix}.sh")
    elif spec.family == "opt":
        candidates.append(scripts / "opt" / deployment / f"run_{spec.size}{suffix}.sh")
    elif spec.family == "llama2":
        candidates.append(scripts / "llama2" / f"run_llama2_{spec.size}{suffix}.sh")
    elif spec.family == "smollm2":
        candidates.append(scripts / "smollm2" / f"run_smollm2_{spec.size}{suffix}.sh")
    for script in candidates:
        if script.is_file():
            return script, ([spec.path] if step == 2 else [])
    generic = scripts / f"run_generic{suffix}.sh"
    if not generic.is_file():
        raise FileNotFoundError(f"no training script for {spec.arg!r} in {scripts} (looked for "
                                f"{', '.join(str(c.relative_to(scripts)) for c in candidates + [generic])})")
    return generic, ([] if step == 3 else [spec.path])


def pick_dpo_script(actor: ModelSpec, sft_dir: Path, deployment: str,
                    num_gpus: int | None = None) -> tuple[Path, list[str]]:
    """DPO's script for the actor's family (run_tiny_cpu.sh for builtin, else run_generic.sh) and its
    positional arg after OUTPUT ZERO_STAGE: the step-1 output it starts from (and copies as reference)."""
    script, _ = pick_script(2, actor, deployment, num_gpus, step_dir=DPO_STEP_DIR)
    return script, [str(sft_dir)]


def step_command(step: int, script: Path, model_args: list[str], dirs: dict[int, Path],
                 zero_stages: tuple[str, str], flags: list[str] = ()) -> list[str]:
    """`bash script ...` with DeepSpeed-Chat's positional args (a verifier step 3: ACTOR ZERO OUTPUT), then
    `flags` (e2e's own, e.g. --reward_fn), then $DSCHAT_E2E_EXTRA_ARGS_STEP<N>."""
    extra = shlex.split(os.environ.get(EXTRA_ARGS_ENV.format(step), ""))
    if step == 3 and 2 not in dirs:
        positional = [str(dirs[1]), zero_stages[0], str(dirs[3])]
    elif step == 3:
        positional = [str(dirs[1]), str(dirs[2]), zero_stages[0], zero_stages[1], str(dirs[3])]
    else:
        positional = [str(dirs[step]), zero_stages[step - 1], *model_args]
    return ["bash", str(script), *positional, *flags, *extra]


def marker_paths(step: int, out_dir: Path) -> list[Path]:
    """Completion markers that must exist for a step to count as done.

    Step 3 saves its critic (when its estimator has one) and EMA before the actor, so the actor's marker,
    written last, stands for the whole step.
    """
    return [(out_dir / "actor" if step == 3 else out_dir) / DONE_MARKER]


def is_done(step: int, out_dir: Path) -> bool:
    """Whether the step's output holds its completion marker(s), written last by an atomic save."""
    return all(p.is_file() for p in marker_paths(step, out_dir))


def done_time(step: int, out_dir: Path) -> float:
    """When the step finished (mtime of its newest marker); 0 if not done."""
    return max(p.stat().st_mtime for p in marker_paths(step, out_dir)) if is_done(step, out_dir) else 0.0


LOG = "training.log"  # where every training script writes its step's log (`&> $OUTPUT/training.log`)


def invalidate(step: int, out_dir: Path) -> None:
    """Before (re)running a step: set its markers aside (`<marker>.prev`), so a killed re-run never counts as
    done; a finished step's log too (`training.log.prev`: the script's `&>` would truncate it), any other
    log is removed."""
    done = is_done(step, out_dir)
    for p in marker_paths(step, out_dir):
        if p.is_file():
            os.replace(p, p.with_name(p.name + ".prev"))
    log = out_dir / LOG
    if done and log.is_file():
        os.replace(log, log.with_name(LOG + ".prev"))
    else:
        log.unlink(missing_ok=True)


def in_use(step: int, out_dir: Path) -> str | None:
    """A one-line refusal when a live run (an earlier step's trainer orphaned by a killed e2e, a second e2e) holds
    the step's output folder, else None; checked before the step's markers and log are touched."""
    owner = lock.holder(out_dir)
    if owner is None:
        return None
    return (f"Step {step}'s output {out_dir} is in use by another run (pid {owner.get('pid', '?')} on "
            f"{owner.get('host', '?')}); wait for it to end or stop it, then run the same command again")


def checkpoint_of(out_dir: Path) -> str | None:
    """The newest complete resumable checkpoint a step left in its output folder ("step65"; as
    runtime/checkpoint.latest sees it, without torch), or None."""
    root = Path(out_dir) / "checkpoints"
    named = (root / "latest").read_text().strip() if (root / "latest").is_file() else ""
    if named and (root / named / "state.json").is_file():
        return named
    done = [p.name for p in root.glob("step*") if p.name[4:].isdigit() and (p / "state.json").is_file()]
    return max(done, key=lambda n: int(n[4:])) if done else None


def resume_flags(step: int, out_dir: Path) -> tuple[list[str], str | None]:
    """What a step (re)run gets over a checkpoint in its output: --resume when the step is unfinished (a rerun of
    an interrupted e2e continues there), --overwrite_checkpoints when --force reruns a finished one; and a note."""
    found = checkpoint_of(out_dir)
    if found is None:
        return [], None
    if is_done(step, out_dir):
        return ["--overwrite_checkpoints"], f"Step {step}: --force starts it over; its checkpoint {found} is deleted"
    return ["--resume"], f"Step {step} resumes from its checkpoint {found} in {out_dir}/checkpoints"


def failed_log(out_dir: Path) -> Path:
    """Where the log of a re-run that failed before saving is kept (the finished step's stays training.log)."""
    return out_dir / f"{LOG}.failed"


def settle_markers(step: int, out_dir: Path, ok: bool) -> bool:
    """After a step ran: drop the set-aside markers and log, or, when it failed without saving a new model, put
    them back (saves are atomic, so the earlier output is still whole; this run's log goes to `failed_log`);
    True when an earlier marker came back."""
    restored = False
    for p in marker_paths(step, out_dir):
        prev = p.with_name(p.name + ".prev")
        if not ok and not p.exists() and prev.is_file():
            os.replace(prev, p)
            restored = True
        elif prev.is_file():
            prev.unlink()  # a new save may have carried it into the new folder
    log, prev_log = out_dir / LOG, out_dir / f"{LOG}.prev"
    if restored and prev_log.is_file():
        if log.is_file():
            os.replace(log, failed_log(out_dir))
        os.replace(prev_log, log)
    else:
        prev_log.unlink(missing_ok=True)
    if ok:
        failed_log(out_dir).unlink(missing_ok=True)
    return restored


def latest_progress(text: str) -> str | None:
    """The newest tqdm segment ("step1 SFT:  45%|...| 67/150 [...]") in a log tail, or None."""
    for segment in reversed(re.split(r"[\r\n]", text)):
        m = PROGRESS_RE.search(segment)
        if m:
            return segment[m.start():].strip()
    return None


def fmt_time(seconds: float) -> str:
    """H:MM:SS."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def read_tail(path: Path, size: int = 16384) -> str:
    """The last `size` bytes of a log as text ("" while it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - size))
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def terminate_tree(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the script and everything it started, then SIGKILL what is left after `grace` seconds."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def run_with_progress(cmd: list[str], cwd: Path, log: Path, label: str, env: dict[str, str],
                      interval: float | None = None) -> tuple[int, float]:
    """Run `cmd`, showing one live line (the log's latest progress bar or the elapsed time); (status, seconds).

    On a terminal the line is redrawn with \\r; otherwise a line is printed every `interval` seconds (30).
    """
    tty = sys.stdout.isatty()
    interval = interval if interval is not None else (0.5 if tty else 30.0)
    start, last_print, last_line = time.time(), 0.0, ""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env)
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            now = time.time()
            if now - last_print < interval:
                continue
            last_print = now
            bar = latest_progress(read_tail(log))
            line = f"[{label} {fmt_time(now - start)}] {bar or 'running (no progress bar yet)'}"
            if tty:
                width = shutil.get_terminal_size().columns - 1
                print("\r" + line[:width] + "\x1b[K", end="", flush=True)
            elif line != last_line:
                print(line, flush=True)
            last_line = line
    except BaseException:
        terminate_tree(proc)
        raise
    finally:
        if tty and last_line:
            print(flush=True)
    return proc.returncode, time.time() - start


def last_lines(path: Path, n: int = 20) -> list[str]:
    """The last `n` lines of a log, each progress-bar line reduced to its final \\r segment."""
    try:
        text = path.read_bytes()[-65536:].decode("utf-8", "replace")
    except FileNotFoundError:
        return [f"(no log at {path})"]
    return [line.split("\r")[-1].rstrip() for line in text.splitlines()][-n:]


def failure_hints(lines: list[str], step: int) -> list[str]:
    """What to try after a failed step: the error line, and memory advice when it looks like OOM."""
    hints = []
    errors = [ln for ln in lines if re.search(r"(^error:|Error\b|Exception\b|Killed)", ln)]
    if errors:
        hints.append(f"error line: {errors[-1].strip()}")
    text = "\n".join(lines).lower()
    oom = any(k in text for k in ("out of memory", "outofmemory", "cannot allocate memory", "killed"))
    env = EXTRA_ARGS_ENV.format(step)
    flag = "--per_device_generation_batch_size/--per_device_training_batch_size" if step == 3 \
        else "--per_device_train_batch_size"
    tips = (f"a smaller batch ({flag}), a higher ZeRO stage (--actor-zero-stage/--reward-zero-stage), "
            f"{'--actor_gradient_checkpointing' if step == 3 else '--gradient_checkpointing'}, or LoRA with "
            f"--only_optimize_lora; pass main.py flags through {env}=\"...\"")
    hints.append(("it looks like it ran out of memory; try " if oom else "if it ran out of memory, try ") + tips)
    return hints


def read_metrics(step: int, out_dir: Path) -> dict[str, Any]:
    """The dschat_metrics.json a step wrote ({} if absent or unreadable)."""
    path = (out_dir / "actor" if step == 3 else out_dir) / "dschat_metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def metric_rows(metrics: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(name, start, end) for every number in the first and last evaluation, plus step-level numbers."""
    evals = [e for e in metrics.get("evals", []) if isinstance(e, dict)]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    rows = []
    for key in dict.fromkeys([*first, *last]):
        a, b = first.get(key), last.get(key)
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
            rows.append((key, a, b))
    if "chosen_judge" in metrics:
        rows.append(("chosen_judge", None, metrics["chosen_judge"]))
    return rows


def fmt_value(v: Any) -> str:
    """A number with 4 significant digits; '-' for missing."""
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def summary_table(results: dict[int, dict[str, Any]], algo: str | Pipeline = "ppo") -> str:
    """The end-of-run table: each step's wall time and its start/end metrics."""
    lines = [f"{'Step':<16}{'Wall time':<20}{'Metric':<18}{'Start':>12}{'End':>12}"]
    for step, r in sorted(results.items()):
        when = r.get("status", "")
        wall = r.get("wall_time_s")
        time_col = (fmt_time(wall) if wall is not None else "-") + (f" ({when})" if when != "ran" else "")
        rows = metric_rows(r.get("metrics", {})) or [("(no metrics)", None, None)]
        for i, (name, a, b) in enumerate(rows):
            head = (f"{step} {step_name(step, algo)}", time_col) if i == 0 else ("", "")
            lines.append(f"{head[0]:<16}{head[1]:<20}{name:<18}{fmt_value(a):>12}{fmt_value(b):>12}")
        what = (algo if isinstance(algo, Pipeline) else PIPELINES[algo]).what_changed[step]
        lines.append(f"{'':<36}({what})")
    return "\n".join(lines)


def tensorboard_dirs(dirs: list[Path]) -> list[Path]:
    """Folders under the step outputs that hold TensorBoard event files."""
    found = {p.parent for d in dirs if d.is_dir() for p in d.rglob("events.out.tfevents*")}
    return sorted(found)
