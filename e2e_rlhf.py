"""Run the three RLHF steps end to end: SFT (step 1), reward model (step 2), PPO (step 3); or, with
--algo dpo, SFT (step 1) then DPO from the SFT model (step 2), with no reward model and no step 3; or, with
--reward-fn naming only rule-based rewards (builtin_judge, accuracy, your own file.py:function), SFT (step 1)
then step 3 against those rewards (GRPO by default), with no reward model and no step 2.

Each step runs its training script (DeepSpeed-Chat's layout and calling convention) with its whole log in
<step output>/training.log, while this shows one live progress line per step. A step whose output holds
the completion marker is skipped, so re-running the same command after a crash or kill resumes at the
step that was interrupted. At the end: a table of times and metrics, also written to <output-dir>/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    from dschat.cli import config, e2e, report  # noqa: E402
    from dschat.runtime.errors import FlagError  # noqa: E402
except KeyboardInterrupt:  # Ctrl-C while the libraries load: one line and 130, as at any later moment
    print("error: interrupted (Ctrl-C) while starting; nothing was written", file=sys.stderr)
    sys.exit(130)

EPILOG = f"""\
models:
  --actor-model/--reward-model take "builtin" (the tiny model shipped in dschat/assets; run_tiny_cpu.sh),
  an OPT size (1.3b, 6.7b, 13b, 66b, 350m, or opt-1.3b / facebook/opt-1.3b; the script
  opt/<deployment-type>/run_<size>.sh where one exists), meta-llama/Llama-2-7b-hf (llama2/run_llama2_7b.sh),
  or any model folder, .gguf file or hub name (run_generic.sh with that path).

outputs (DeepSpeed-Chat's layout): <output-dir>/actor-models/<name>, <output-dir>/reward-models/<name>,
  <output-dir>/step3-models/<name>/{{actor,critic}}, each with training.log and dschat_metrics.json; <name> is
  "builtin", the OPT size, or the model's folder name. <output-dir>/summary.json holds the final table.
  --reward-fn without reward_model: <output-dir>/actor-models/<name> and <output-dir>/step3-models/<name>
  (steps 1 and 3; step 3's scripts are training_scripts/run_<x>_verifier.sh, e.g. run_tiny_cpu_verifier.sh:
  GRPO, 4 answers per prompt; the e2e flag's rewards replace the script's default builtin_judge).
  --algo dpo: <output-dir>/actor-models/<name> and <output-dir>/dpo-models/<name> (the actor's name); the
  DPO step is "step 2" (--step 1 2, {e2e.EXTRA_ARGS_ENV.format(2)}, --actor-zero-stage; --reward-model and
  --reward-zero-stage are not used). Builtin actor: step2_dpo_finetuning/training_scripts/run_tiny_cpu.sh,
  any other: its run_generic.sh.

extra flags for a step:
  {e2e.EXTRA_ARGS_ENV.format('N')}="..." (N = 1, 2, 3) appends main.py flags to step N's script command
  line; they override the script's own values (the scripts run main.py from the step's folder, so give
  files as absolute paths). Example for a quick smoke run:
    DSCHAT_E2E_EXTRA_ARGS_STEP1="--data_split 2,4,4 --max_seq_len 64 --eval_iters 2 --num_judge_prompts 8" \\
    python e2e_rlhf.py --step 1 2

environment passed to the scripts: DSCHAT_DEPLOYMENT (from --deployment-type), DSCHAT_NUM_GPUS (from
--num-gpus), HOSTFILE (multi_node; default /job/hostfile).
"""


def build_parser() -> argparse.ArgumentParser:
    """DeepSpeed-Chat's e2e flags, any model name or path, plus --algo, --force, --num-gpus and --config."""
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=config.HelpFormatter)
    p.add_argument("--algo", choices=list(e2e.ALGOS), default="ppo",
                   help="ppo: SFT, reward model, PPO (DeepSpeed-Chat); dpo: SFT, then DPO from the SFT model.")
    p.add_argument("--step", type=int, nargs="+", choices=[1, 2, 3], default=None,
                   help="Steps to run (default: 1 2 3; with --algo dpo: 1 2, where 2 is DPO; with rule-based "
                        "--reward-fn: 1 3).")
    p.add_argument("--reward-fn", nargs="+", default=None,
                   help="Step 3's rewards (its --reward_fn): registered names (reward_model, builtin_judge, accuracy, "
                        "overlong) or file.py:function / module:function. Without reward_model, step 2 is not run "
                        "and step 3 trains against the rules alone.")
    p.add_argument("--reward-weights", nargs="+", type=float, default=None,
                   help="Step 3's --reward_weights, one per --reward-fn entry.")
    p.add_argument("--data-path", nargs="+", default=None,
                   help="Every step's --data_path (files, folders, dschat/builtin, dschat/arith, hub names); default: "
                        "each step script's own (the builtin task).")
    p.add_argument("--data-split", default=None,
                   help="Every step's --data_split (e.g. 2,4,4); default: each step script's own.")
    p.add_argument("--actor-model", default="builtin", help="Model to fine-tune in step 1 (see 'models').")
    p.add_argument("--reward-model", default="builtin", help="Model to train as reward model in step 2.")
    p.add_argument("--actor-zero-stage", type=str, default="", choices=["", "0", "1", "2", "3"],
                   help="ZeRO stage for step 1 and the step-3 actor; empty = the script's default.")
    p.add_argument("--reward-zero-stage", type=str, default="", choices=["", "0", "1", "2", "3"],
                   help="ZeRO stage for step 2 and the step-3 critic; empty = the script's default.")
    p.add_argument("--output-dir", default="./output", help="Root of all outputs (made absolute).")
    p.add_argument("--deployment-type", default="single_gpu", choices=["single_gpu", "single_node", "multi_node"],
                   help="Picks opt/<type>/run_<size>.sh for OPT models and the launcher of run_generic.sh.")
    p.add_argument("--num-gpus", type=int, default=None,
                   help="Ranks per node for run_generic.sh (DSCHAT_NUM_GPUS); with the builtin model, >1 picks "
                        "run_tiny_cpu_<N>ranks.sh where it exists.")
    p.add_argument("--force", action="store_true", help="Re-run steps whose output is already complete.")
    config.add_config_arg(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The e2e flags parsed (a --config file's values under the command line's) and checked."""
    p = build_parser()
    try:
        args = config.parse_with_config(p, argv)  # --config FILE: its values under the command line's
    except FlagError as err:
        p.error(str(err))
    args.recorded = config.recorded_flags(args)
    if args.algo == "dpo" and args.reward_fn:
        p.error("--reward-fn is step 3's; --algo dpo has no step 3")
    if args.reward_weights and not args.reward_fn:
        p.error("--reward-weights needs --reward-fn")
    if args.reward_weights and len(args.reward_weights) != len(args.reward_fn):
        p.error(f"--reward-weights has {len(args.reward_weights)} values for {len(args.reward_fn)} --reward-fn entries")
    try:
        e2e.check_flags(args.num_gpus, args.data_split, args.data_path, args.reward_weights)
    except FlagError as err:
        p.error(str(err))
    args.pipeline = e2e.pipeline_for(args.algo, args.reward_fn)
    pipe = args.pipeline
    if args.step is None:
        args.step = list(pipe.steps)
    missing = [s for s in args.step if s not in pipe.steps]
    if missing:
        what = {"dpo": "--algo dpo has no step 3 (DPO is step 2, trained from step 1's model)",
                "verifier": "rule-based --reward-fn trains no reward model (no step 2)"}.get(pipe.name, "")
        p.error(f"{what}; use --step {' '.join(map(str, pipe.steps))}")
    return args


def step_flags(args: argparse.Namespace, step: int) -> list[str]:
    """The e2e flags a step's command line carries: --data_path/--data_split for every step, and step 3's
    --reward_fn/--reward_weights."""
    flags = ["--data_path", *args.data_path] if args.data_path else []
    if args.data_split:
        flags += ["--data_split", args.data_split]
    if step == 3 and args.reward_fn:
        flags += ["--reward_fn", *args.reward_fn]
    if step == 3 and args.reward_weights:
        flags += ["--reward_weights", *map(str, args.reward_weights)]
    return flags


def script_env(args: argparse.Namespace) -> dict[str, str]:
    """The scripts' environment: this Python's bin folder first on PATH, deployment and rank count."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["DSCHAT_DEPLOYMENT"] = args.deployment_type
    if args.num_gpus:
        env["DSCHAT_NUM_GPUS"] = str(args.num_gpus)
    return env


def skip_reason(step: int, dirs: dict[int, Path], force: bool, algo: str | e2e.Pipeline = "ppo") -> str | None:
    """Why `step` need not run (its output is complete and not older than its inputs), or None to run it."""
    pipe = algo if isinstance(algo, e2e.Pipeline) else e2e.PIPELINES[algo]
    if force or not e2e.is_done(step, dirs[step]):
        return None
    needs = pipe.needs.get(step, ())
    if needs and e2e.done_time(step, dirs[step]) < max(e2e.done_time(n, dirs[n]) for n in needs):
        inputs = "/".join(map(str, needs))
        print(f"{pipe.step_names[step]} output at {dirs[step]} is older than the step {inputs} model"
              f"{'s' if len(needs) > 1 else ''}; re-running it", flush=True)
        return None
    return f"Step {step} already done at {dirs[step]}, skipping; --force to re-run"


def report_failure(step: int, status: int, log: Path) -> None:
    """Print the end of the failed step's log, where the log is, and what to try."""
    lines = e2e.last_lines(log, 20)
    print(f"\n---=== Step {step} failed (exit status {status}) ===---", flush=True)
    print(f"Last {len(lines)} lines of {log}:")
    print("\n".join("  " + ln for ln in lines))
    print(f"Full log: {log}")
    for hint in e2e.failure_hints(lines, step):
        print(f"  - {hint}")
    print("Fix it and re-run the same command: finished steps are skipped.", flush=True)


def run_steps(args: argparse.Namespace, dirs: dict[int, Path], scripts: dict[int, tuple[Path, list[str]]],
              results: dict[int, dict]) -> int:
    """Run (or skip) each requested step in order; returns 0, or after a failed step 2 (it refused its input)
    or 1."""
    env = script_env(args)
    pipe = args.pipeline
    # Each step takes the ZeRO stage of the model it trains (DPO's step 2 trains the actor).
    stage = {"actor": args.actor_zero_stage, "reward": args.reward_zero_stage}
    zero_stages = (stage[pipe.zero_stage[1]], stage[pipe.zero_stage.get(2, "reward")])
    for step in sorted(set(args.step)):
        for needed in pipe.needs.get(step, ()):
            if not e2e.is_done(needed, dirs[needed]):
                print(f"Step {needed} model has not been trained (no complete model at {dirs[needed]}); "
                      f"{pipe.step_names[step]} starts from it: run --step {needed}", file=sys.stderr, flush=True)
                return 1
        reason = skip_reason(step, dirs, args.force, pipe)
        if reason:
            print(reason, flush=True)
            metrics = e2e.read_metrics(step, dirs[step])
            results[step] = {"status": "skipped", "output": str(dirs[step]), "metrics": metrics,
                             "wall_time_s": metrics.get("wall_time_s")}
            continue
        script, model_args = scripts[step]
        again, note = e2e.resume_flags(step, dirs[step])  # an interrupted step's checkpoint: continue from it
        cmd = e2e.step_command(step, script, model_args, dirs, zero_stages, step_flags(args, step) + again)
        if note:
            print(note, flush=True)
        busy = e2e.in_use(step, dirs[step])
        if busy:  # before its markers and log are touched: the run holding it may still be writing them
            print(f"error: {busy}", file=sys.stderr, flush=True)
            return 2
        dirs[step].mkdir(parents=True, exist_ok=True)
        e2e.invalidate(step, dirs[step])
        log = dirs[step] / "training.log"
        print(f"---=== Running Step {step} ({e2e.step_name(step, pipe)}) ===---\nRunning:\n{shlex.join(cmd)}\n"
              f"Log: {log}", flush=True)
        status, seconds = e2e.run_with_progress(cmd, e2e.REPO, log, f"Step {step}", env)
        results[step] = {"status": "ran", "output": str(dirs[step]), "script": str(script), "command": cmd,
                         "wall_time_s": seconds, "exit_status": status}
        if status == 0 and not e2e.is_done(step, dirs[step]):
            print(f"Step {step}'s script exited 0 but wrote no complete model at {dirs[step]}", flush=True)
            status = 1
        if e2e.settle_markers(step, dirs[step], ok=status == 0):
            log = e2e.failed_log(dirs[step])  # the finished step's own training.log is back in place
            print(f"Step {step} failed before saving: the earlier complete output at {dirs[step]} is kept, its "
                  f"training.log too (this run's log: {log})", flush=True)
        if status != 0:
            results[step]["status"] = "failed"
            report_failure(step, status, log)
            return 2 if status == 2 else 1  # 2: the step refused its input (a flag, a file), as the steps say
        results[step]["metrics"] = e2e.read_metrics(step, dirs[step])
        print(f"---=== Finished Step {step} in {e2e.fmt_time(seconds)} ===---", flush=True)
    return 0


def finish(args: argparse.Namespace, out: Path, dirs: dict[int, Path], results: dict[int, dict],
           total: float, status: int) -> None:
    """Print the table, TensorBoard folders and chat command; write <out>/summary.json and <out>/report.html."""
    if results:
        print("\n" + e2e.summary_table(results, args.pipeline))
    print(f"Total wall time: {e2e.fmt_time(total)}")
    chat = None
    pipe = args.pipeline
    final = (pipe.final, dirs[pipe.final] / "actor" if pipe.final == 3 else dirs[pipe.final],
             pipe.step_names[pipe.final].split(" ")[0])
    for step, path, kind in (final, (1, dirs[1], "SFT")):
        if e2e.is_done(step, dirs[step]):
            chat = f"python chat.py --path {shlex.quote(str(path))}"
            print(f"Chat with the {kind} model: {chat}")
            break
    tb = e2e.tensorboard_dirs(list(dirs.values()))
    if tb:
        print("TensorBoard logs: " + ", ".join(map(str, tb)) + f"\n  tensorboard --logdir {out}")
    summary = {"output_dir": str(out), "status": "ok" if status == 0 else "failed", "algo": args.algo,
               "pipeline": pipe.name, "reward_fn": args.reward_fn,
               "actor_model": args.actor_model, "reward_model": args.reward_model if 2 in dirs and pipe.name == "ppo"
               else None,
               "deployment_type": args.deployment_type, "total_wall_time_s": total,
               "steps": {str(k): v for k, v in sorted(results.items())}, "chat_command": chat,
               "tensorboard_dirs": [str(p) for p in tb]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"Summary: {out / 'summary.json'}", flush=True)
    print(f"Report (table, plots, answers): {report.write_report(out, pipe, dirs, summary)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Resolve models and scripts, run the steps, summarise; returns the exit status."""
    args = parse_args(argv)
    out = Path(args.output_dir).expanduser().resolve()
    actor, reward = e2e.resolve_model(args.actor_model), e2e.resolve_model(args.reward_model)
    pipe = args.pipeline
    dirs = e2e.output_dirs(out, actor, reward, pipe)
    try:
        scripts = {}
        for s in set(args.step):
            if pipe.name == "dpo" and s == 2:  # DPO's script takes the SFT model it starts from
                scripts[s] = e2e.pick_dpo_script(actor, dirs[1], args.deployment_type, args.num_gpus)
            else:
                spec = reward if pipe.zero_stage[s] == "reward" else actor
                scripts[s] = e2e.pick_script(s, spec, args.deployment_type, args.num_gpus, pipe.step_dirs[s],
                                             pipe.script_suffix if s == 3 else "")
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a regular file on the way, no permission, read-only file system
        print(f"error: --output-dir {args.output_dir}: cannot create it ({err.strerror})", file=sys.stderr)
        return 2
    config.write_args(args.recorded, out)  # `e2e_rlhf.py --config <output-dir>/dschat_args.json` repeats the run
    print(f"Actor: {args.actor_model} -> {dirs[1]}", flush=True)
    for s in pipe.steps[1:]:
        source = f"{args.reward_model} " if pipe.zero_stage[s] == "reward" else ""
        print(f"{pipe.step_names[s]}: {source}-> {dirs[s]}", flush=True)
    results: dict[int, dict] = {}
    start = time.time()
    current = "?"
    try:
        status = run_steps(args, dirs, scripts, results)
    except (KeyboardInterrupt, SystemExit) as stop:
        current = next((s for s in sorted(set(args.step)) if not e2e.is_done(s, dirs[s])), current)
        found = e2e.checkpoint_of(dirs[current]) if current in dirs else None
        where = f"from its checkpoint {found}" if found else \
            "from its start: it saved no checkpoint (a step saves them with --save_interval N)"
        print(f"\nInterrupted during step {current}; run the same command again to resume there, {where}.",
              file=sys.stderr, flush=True)
        return stop.code if isinstance(stop, SystemExit) and isinstance(stop.code, int) else 130
    finish(args, out, dirs, results, time.time() - start, status)
    return status


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # clean up the running step
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # outside a step (parsing, summarising): one line, as during one
        print("\nerror: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
