"""Entry-point wrapper: expected failures become one clear line on stderr, not a library traceback.

User errors (bad flags, bad data, bad model paths, a run of NaN losses, an unreadable checkpoint) exit
with status 2. SIGTERM (what `kill`, schedulers and the deepspeed launcher send) is turned into an
exception like Ctrl-C, so cleanup code runs: a model save in progress removes its temporary folder and
the previous output stays whole. Interrupted runs exit with 128 + the signal number (130 Ctrl-C, 143 SIGTERM).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dschat.cli.config import HelpFormatter, add_config_arg, parse_with_config, recorded_flags, write_args
from dschat.runtime.errors import DschatError, FlagError

# The flags each parsed step ran with (before its checks fill in derived values), written as dschat_args.json.
RECORDED: dict[int, dict[str, Any]] = {}


def complete_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A step's parser as it parses: DeepSpeed's config flags (with our help), --config, the help format."""
    import deepspeed

    if not any(a.dest == "deepspeed" for a in p._actions):
        deepspeed.add_config_arguments(p)
    for action in p._actions:  # DeepSpeed's own flags: say what they do here
        if action.dest in DEEPSPEED_HELP:
            action.help = DEEPSPEED_HELP[action.dest]
    add_config_arg(p)
    p.formatter_class = HelpFormatter
    return p


def parse_step_args(p: argparse.ArgumentParser, argv: list[str] | None,
                    check: Callable[[argparse.Namespace], None]) -> argparse.Namespace:
    """Parse `argv` with a step's completed parser (a --config file's values under the command line's), then
    run the step's flag checks; the flags as parsed are kept for dschat_args.json."""
    args = parse_with_config(complete_parser(p), argv)
    check_deepspeed_config(args)
    flags = recorded_flags(args)
    check(args)
    RECORDED[id(args)] = flags
    return args


DEEPSPEED_HELP = {
    "deepspeed": "Accepted for DeepSpeed-Chat's scripts (a no-op switch: DeepSpeed is always on).",
    "deepspeed_config": "Refused: the step writes its DeepSpeed config from its own flags.",
    "deepscale": "Accepted for compatibility (DeepSpeed's old name for --deepspeed).",
    "deepscale_config": "Refused: the step writes its DeepSpeed config from its own flags.",
}


def require_output_dir(args: argparse.Namespace) -> None:
    """Refuse a training run without --output_dir (one line, before anything loads)."""
    if not getattr(args, "output_dir", None):
        raise FlagError("--output_dir is required: the trained model is saved there (the next step reads it); "
                        "--print_examples needs none")


# The DeepSpeed config keys the steps write, and the flags that set them (where a step has the flag).
DS_CONFIG_FLAGS = (("ZeRO stage", ("zero_stage", "actor_zero_stage", "critic_zero_stage")),
                   ("offload", ("offload", "offload_reference_model", "offload_reward_model")),
                   ("precision", ("dtype",)),
                   ("micro-batch", ("per_device_train_batch_size", "per_device_training_batch_size")),
                   ("accumulation", ("gradient_accumulation_steps",)),
                   ("TensorBoard", ("enable_tensorboard",)))


def check_deepspeed_config(args: argparse.Namespace) -> None:
    """Refuse --deepspeed_config/--deepscale_config FILE: the steps build their DeepSpeed config from their flags."""
    # deepspeed.add_config_arguments adds the flags (DeepSpeed-Chat's scripts pass --deepspeed, which stays a
    # harmless switch); a file given there would be silently ignored, so a user's ZeRO or batch settings in it
    # would not apply.
    for flag in ("deepspeed_config", "deepscale_config"):
        value = getattr(args, flag, None)
        if value:
            keys = "; ".join(f"{what}: {', '.join('--' + f for f in flags if hasattr(args, f))}"
                             for what, flags in DS_CONFIG_FLAGS if any(hasattr(args, f) for f in flags))
            raise FlagError(f"--{flag} {value} is not read: this step writes its DeepSpeed config from its own "
                            f"flags ({keys}); drop --{flag} and set those flags")


def run_step(run: Any, start: str = "start") -> None:
    """Every step's body: evaluate the starting model, train, save, print the summary (rank 0)."""
    from dschat.runtime import dist

    run.evaluate(start)
    run.train()
    run.save()
    flags = RECORDED.get(id(run.args))
    if flags is not None and dist.is_rank0() and getattr(run.args, "output_dir", None):
        write_args(flags, run.args.output_dir)  # beside the model: `--config <output_dir>/dschat_args.json` repeats it
    if dist.is_rank0() and getattr(run.args, "output_dir", None):
        draw_plots(run.args.output_dir, getattr(run, "name", ""))
    dist.print_rank0(run.summary())


def draw_plots(output_dir: str, title: str = "") -> Path | None:
    """<output_dir>/training_curves.png from its metrics.jsonl; a drawing failure is a note, never a failed run."""
    from dschat.runtime.logger import METRICS_FILE
    from dschat.runtime.plots import plot_metrics

    try:
        return plot_metrics(Path(output_dir) / METRICS_FILE, title=title)
    except Exception as err:  # the model is saved by now: a plot must not turn that into a failure
        print(f"note: no training plots in {output_dir} ({type(err).__name__}: {one_line(str(err))})", flush=True)
        return None


USER_ERRORS = (DschatError,)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""


def _on_sigterm(signum: int, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def one_line(message: str) -> str:
    """A message with its line breaks (library errors have many) folded into " | "."""
    return " | ".join(line.strip() for line in message.strip().splitlines() if line.strip())


def _end_progress_bars() -> None:
    """Close open tqdm bars, so an error line starts on a line of its own."""
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", [])):
            bar.close()
    except Exception:  # never let cosmetics hide the error itself
        pass


def resume_hint(argv: list[str]) -> str:
    """", the last checkpoint too (rerun with --resume ...)" when --output_dir holds one, else ""."""
    out = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--output_dir"), None)
    out = out or next((a.split("=", 1)[1] for a in argv if a.startswith("--output_dir=")), None)
    if out and (Path(out) / "checkpoints" / "latest").is_file():
        return f", and so is the last checkpoint in {out}/checkpoints (rerun with --resume to continue from it)"
    return ""


def run_main(main: Callable[[], None]) -> None:
    """Call `main()`; a user error prints `error: <message>` and exits with status 2."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        main()
    except USER_ERRORS as err:
        _end_progress_bars()
        print(f"error: {one_line(str(err))}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt as err:
        name, code = ("SIGTERM", 143) if isinstance(err, Terminated) else ("Ctrl-C", 130)
        _end_progress_bars()
        print(f"error: interrupted ({name}); partial saves were removed, finished outputs are intact"
              f"{resume_hint(sys.argv[1:])}", file=sys.stderr, flush=True)
        sys.exit(code)
