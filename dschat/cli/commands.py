"""`dschat <command> [flags]`: one console command for every entry point (pyproject.toml's [project.scripts]).

    dschat sft ...   step 1 (training/step1_supervised_finetuning/main.py)
    dschat rm ...    step 2, reward model (training/step2_reward_model_finetuning/main.py)
    dschat dpo ...   step 2', DPO (training/step2_dpo_finetuning/main.py)
    dschat ppo ...   step 3, PPO/GRPO/... (training/step3_rlhf_finetuning/main.py)
    dschat e2e ...   the whole pipeline (e2e_rlhf.py; runs the training scripts of a source checkout)
    dschat chat ...  talk to a model (chat.py)

One command with subcommands (as `trl sft`, `accelerate launch`): one name on PATH, `dschat --help` lists
the steps, and each subcommand runs the very function its main.py runs, with the same flags.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Callable

from dschat.cli.config import PACKAGE_ROOT

STEPS = {"sft": "sft_main", "rm": "rm_main", "dpo": "dpo_main", "ppo": "ppo_main"}
CHECKOUT = {"e2e": "e2e_rlhf.py", "chat": "chat.py"}  # entry points that live in the source checkout
SUMMARY = {"sft": "step 1: supervised fine-tuning", "rm": "step 2: reward model", "dpo": "step 2': DPO",
           "ppo": "step 3: PPO and the GRPO-era estimators", "e2e": "steps 1-3 end to end (a source checkout)",
           "chat": "chat with a trained model (a source checkout)"}


def usage() -> str:
    """The command list `dschat --help` prints."""
    rows = "\n".join(f"  {name:<5} {what}" for name, what in SUMMARY.items())
    return f"usage: dschat <command> [flags]   (dschat <command> --help: its flags)\n\ncommands:\n{rows}\n"


def step_main(name: str) -> Callable[[list[str] | None], None]:
    """The body of step `name` (dschat.cli.steps)."""
    from dschat.cli import steps

    return getattr(steps, STEPS[name])


def run_checkout_script(name: str, argv: list[str]) -> int:
    """Run e2e_rlhf.py / chat.py of the source checkout as __main__ (they drive its training scripts)."""
    script = PACKAGE_ROOT / CHECKOUT[name]
    if not script.is_file():
        print(f"error: dschat {name} runs {CHECKOUT[name]} of a source checkout (the training scripts live there); "
              f"clone the repository and install it with `pip install -e .`", file=sys.stderr)
        return 2
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch `dschat <command> ...`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `deepspeed --module dschat.cli.commands sft ...` puts --local_rank=N before the subcommand: move it after.
    launcher = [a for a in argv[:1] if a.startswith("--local_rank=")]
    argv = argv[len(launcher):][:1] + launcher + argv[len(launcher) + 1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name in STEPS:
        from dschat.cli.entry import run_main

        sys.argv = [f"dschat {name}", *rest]
        try:
            run_main(lambda: step_main(name)(rest))
        except SystemExit as stop:
            return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        return 0
    if name in CHECKOUT:
        return run_checkout_script(name, rest)
    print(f"error: unknown command {name!r}\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
