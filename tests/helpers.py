"""Shared helpers for tests that run the real entry points in subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP1 = REPO / "training" / "step1_supervised_finetuning" / "main.py"
STEP2 = REPO / "training" / "step2_reward_model_finetuning" / "main.py"
STEP3 = REPO / "training" / "step3_rlhf_finetuning" / "main.py"
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")

# Small, quick settings for the builtin task (phase shares keep each step to a few dozen updates).
QUICK_STEP1 = ["--data_split", "1,2,97", "--max_seq_len", "64", "--eval_iters", "4", "--num_judge_prompts", "8",
               "--max_new_tokens", "12"]


# What the deepspeed launcher (or an in-process world of one) puts in the environment.
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "CROSS_RANK", "CROSS_SIZE")


def env(**extra: str) -> dict[str, str]:
    """Subprocess environment: one thread per process (2 cores shared by ranks), no hub, no tokenizer threads,
    this interpreter's bin first on PATH, without test hooks or launcher variables; plus `extra`."""
    # This interpreter's bin first: DeepSpeed's JIT-built CPU op is rebuilt whenever the ninja on PATH changes.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # In-process tests start a world of one; its RANK/MASTER_PORT must not leak into child runs.
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("DSCHAT_TEST_")}
    return base | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                   "HF_HUB_OFFLINE": "1", "PATH": path} | extra


def free_port() -> int:
    """An unused TCP port for a launcher's --master_port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: int = 600, ranks: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """Run an entry point (`ranks` > 1: through the deepspeed launcher); fail with its output tail."""
    if ranks > 1:
        cmd = [DEEPSPEED, "--master_port", str(free_port()), "--num_gpus", str(ranks), *cmd]
    else:
        cmd = [sys.executable, *cmd]
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metrics(model_dir: Path) -> dict:
    """The dschat_metrics.json a step wrote beside its model."""
    return json.loads((Path(model_dir) / "dschat_metrics.json").read_text())
