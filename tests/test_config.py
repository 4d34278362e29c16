"""Issue 29 items 1, 4, 5: --config files and dschat_args.json, every flag's help with its default, the LoRA /
warmup / clipping flags, --output_dir required to train, and the installable wheel with its builtin model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from dschat.cli import steps
from dschat.cli.config import ARGS_FILE, HelpFormatter, write_args
from dschat.cli.entry import RECORDED, complete_parser
from dschat.runtime.errors import FlagError
from tests.helpers import REPO, STEP1, env, run

sys.path.insert(0, str(REPO))
import e2e_rlhf  # noqa: E402

# A step-1 run of a few seconds (one epoch over 1% of the builtin task, no judge).
TINY = ["--data_split", "1,2,97", "--max_seq_len", "32", "--eval_iters", "1", "--num_judge_prompts", "0",
        "--per_device_train_batch_size", "16", "--dtype", "fp32", "--seed", "7"]


def all_parsers() -> dict:
    """Every step's parser as it parses (DeepSpeed's flags and --config added), and e2e_rlhf.py's."""
    return {**{name: complete_parser(make()) for name, make in steps.PARSERS.items()}, "e2e": e2e_rlhf.build_parser()}


def test_every_flag_has_help_and_shows_its_default():
    for name, p in all_parsers().items():
        missing = [a.option_strings[0] for a in p._actions if a.option_strings and not (a.help or "").strip()]
        assert not missing, f"{name}: flags without help: {missing}"
        assert p.formatter_class is HelpFormatter, name
        text = " ".join(p.format_help().split())
        assert "(default: None)" not in text and "(default: False)" not in text, name
        assert "--config FILE" in text, name
    sft = " ".join(all_parsers()["sft"].format_help().split())
    assert "(default: 0.001)" in sft and "(default: 1.0)" in sft  # --learning_rate, --max_grad_norm
    assert "The default 1 keeps DeepSpeed-Chat's scale 1/r" in sft and "Required to train" in sft
    ppo = " ".join(all_parsers()["ppo"].format_help().split())
    assert ppo.count("(default: 1.0)") >= 2 and "--critic_lora_target_modules" in ppo


def test_config_file_sets_flags_the_command_line_wins_and_unknown_keys_are_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 1e-2\ndata_split: 1,2,97\nzero-stage: 1\nlora_dim: 4\n"
                      "lora_target_modules: all-linear\nversion: 0.0.1\n")
    args = steps.parse_sft_args(["--config", str(recipe), "--zero_stage", "2"])
    assert (args.learning_rate, args.data_split, args.zero_stage, args.lora_dim, args.lora_target_modules) == \
        (0.01, "1,2,97", 2, 4, ["all-linear"])
    for bad, words in (({"learnin_rate": 1}, ["unknown key 'learnin_rate'", "did you mean learning_rate"]),
                       ({"zero_stage": 7}, ["key 'zero_stage'", "not one of"]),
                       ({"gradient_checkpointing": "yes"}, ["true or false"]),
                       ({"config": "other.yaml"}, ["cannot name another"]),
                       ({"lora_module_name": "proj", "lora_target_modules": ["q_proj"]}, ["exclude each other"])):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(FlagError) as err:
            steps.parse_sft_args(["--config", str(path)])
        assert str(path) in str(err.value) or "exclude" in str(err.value)
        assert all(w in str(err.value) for w in words), (bad, str(err.value))
    with pytest.raises(SystemExit):  # e2e: the same check, through its parser's error
        e2e_rlhf.parse_args(["--config", str(tmp_path / "bad.json")])
    (tmp_path / "e2e.yaml").write_text("reward-fn: [builtin_judge]\nactor_model: builtin\n")
    e2e_args = e2e_rlhf.parse_args(["--config", str(tmp_path / "e2e.yaml"), "--output-dir", str(tmp_path / "o")])
    assert e2e_args.pipeline.name == "verifier" and e2e_args.step == [1, 3]
    write_args(e2e_args.recorded, tmp_path / "o")
    again = e2e_rlhf.parse_args(["--config", str(tmp_path / "o" / ARGS_FILE)])
    assert again.recorded == e2e_args.recorded


def test_args_round_trip_for_every_step(tmp_path):
    """Written flags -> --config -> the same flags (step 3 critic-free: its derived critic defaults stay unwritten)."""
    cases = {"sft": ["--lora_dim", "2", "--lora_alpha", "4", "--warmup_ratio", "0.1"],
             "rm": ["--margin", "0.5", "--max_grad_norm", "0.5"],
             "dpo": ["--beta", "0.2", "--lora_target_modules", "q_proj", "v_proj"],
             "ppo": ["--reward_fn", "builtin_judge", "--advantage_estimator", "grpo", "--n_samples_per_prompt", "2",
                     "--warmup_ratio", "0.2", "--actor_lora_dim", "2", "--actor_lora_target_modules", "all-linear"]}
    for name, flags in cases.items():
        parse = getattr(steps, f"parse_{name}_args")
        first = parse([*flags, "--output_dir", str(tmp_path / name)])
        path = write_args(RECORDED[id(first)], first.output_dir)
        record = json.loads(path.read_text())
        assert record["version"] and "commit" in record and "local_rank" not in record
        second = parse(["--config", str(path)])
        assert RECORDED[id(second)] == RECORDED[id(first)], name
        assert {**vars(second), "config": None} == vars(first), name


def test_warmup_longer_than_the_run_warns_with_both_numbers(capsys):
    """--num_warmup_steps beyond the run's optimizer steps: a warning naming both, once (issue 30 item 8)."""
    from dschat.runtime.engine import warmup_steps

    assert warmup_steps(500, None, 40) == 500 and warmup_steps(500, None, 40) == 500  # actor and critic
    out = capsys.readouterr().out
    assert out.count("warning: --num_warmup_steps 500 is beyond the run's 40 optimizer steps") == 1
    assert "ends at 8% of the peak" in out
    warmup_steps(40, None, 40)
    warmup_steps(0, 0.5, 40)
    assert capsys.readouterr().out == ""


def test_offload_on_cpu_says_it_changes_nothing(monkeypatch):
    """--offload on a CPU run is accepted and does nothing: said in one note (issue 30 item 12)."""
    import torch

    from dschat.runtime import engine
    from dschat.runtime.engine import offload_note

    monkeypatch.setattr(engine, "device", lambda: torch.device("cpu"))
    note = offload_note({"offload": True, "offload_reference_model": True, "offload_reward_model": False, "seed": 1})
    assert note.startswith("note: --offload, --offload_reference_model changes nothing on this CPU run")
    assert offload_note({"offload": False}) is None
    monkeypatch.setattr(engine, "device", lambda: torch.device("cuda", 0))
    assert offload_note({"offload": True}) is None


def test_warmup_ratio_and_num_warmup_steps_exclude_each_other():
    from dschat.runtime.engine import warmup_steps

    assert warmup_steps(5, None, 100) == 5 and warmup_steps(5, 0.1, 95) == 10 and warmup_steps(0, 0.0, 9) == 0
    with pytest.raises(FlagError, match="--warmup_ratio and --num_warmup_steps exclude each other"):
        steps.parse_sft_args(["--warmup_ratio", "0.1", "--num_warmup_steps", "3"])
    with pytest.raises(FlagError, match="--warmup_ratio must be in"):
        steps.parse_sft_args(["--warmup_ratio", "1.5"])
    with pytest.raises(FlagError, match="--max_grad_norm"):
        steps.parse_sft_args(["--max_grad_norm", "-1"])
    args = steps.parse_ppo_args(["--warmup_ratio", "0.1"])  # step 3's default of 10 warmup steps is not "explicit"
    assert (args.warmup_ratio, args.num_warmup_steps, args.max_grad_norm) == (0.1, 10, 1.0)


def test_lora_alpha_and_target_modules():
    from transformers import AutoModelForCausalLM

    from dschat.models.builtin import BUILTIN_MODEL_DIR
    from dschat.models.lora import apply_lora, lora_targets

    model = AutoModelForCausalLM.from_pretrained(BUILTIN_MODEL_DIR)
    linear = lora_targets(model, "", ["all-linear"])
    assert linear and "lm_head" not in linear and all("layers." in n for n in linear)
    assert lora_targets(model, "layers.") == linear  # the old flag's default picks the same layers here
    qv = lora_targets(model, "", ["q_proj", "v_proj"])
    assert qv and all(n.endswith((".q_proj", ".v_proj")) for n in qv)
    with pytest.raises(FlagError, match="--lora_target_modules nope matches no Linear"):
        apply_lora(model, 2, "layers.", True, target_modules=["nope"])
    wrapped = apply_lora(model, 4, "layers.", True, alpha=8.0, target_modules=["q_proj"])
    scales = {m.scaling["default"] for m in wrapped.modules() if isinstance(getattr(m, "scaling", None), dict)
              and "default" in m.scaling}
    assert scales == {2.0}  # alpha / r


def test_a_training_run_needs_output_dir():
    with pytest.raises(FlagError, match="--output_dir is required"):
        steps.sft_main(["--num_train_epochs", "1"])
    with pytest.raises(FlagError, match="--output_dir is required"):
        steps.ppo_main(["--reward_fn", "builtin_judge", "--advantage_estimator", "grpo", "--n_samples_per_prompt", "2"])


def test_a_run_writes_dschat_args_json_that_repeats_it(tmp_path):
    """A tiny step-1 run writes its flags beside the model; --config of that file parses to the same flags, and a
    run from it (another --output_dir) trains the same weights."""
    out = tmp_path / "sft"
    run([STEP1, *TINY, "--data_output_path", tmp_path / "data", "--output_dir", out])
    recorded = json.loads((out / ARGS_FILE).read_text())
    assert (recorded["seed"], recorded["output_dir"], recorded["max_seq_len"], recorded["dtype"]) == (7, str(out), 32, "fp32")
    assert recorded["version"] and "config" not in recorded and (out / "model.safetensors").is_file()
    again = steps.parse_sft_args(["--config", str(out / ARGS_FILE)])
    assert {"version": recorded["version"], "commit": recorded["commit"], **RECORDED[id(again)]} == recorded
    repeat = tmp_path / "repeat"
    run([STEP1, "--config", out / ARGS_FILE, "--output_dir", repeat])
    from safetensors.torch import load_file

    first, second = load_file(out / "model.safetensors"), load_file(repeat / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_wheel_holds_the_builtin_model_and_its_command_runs(tmp_path):
    """pip wheel (no network, no isolation) of a copy of the package; its dschat command's module runs from it."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "dschat", src / "dschat", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=120,
                          env=env(PIP_NO_INDEX="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("dschat-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        site = tmp_path / "site"
        z.extractall(site)
    assets = {p.relative_to(REPO).as_posix() for p in (REPO / "dschat" / "assets").rglob("*") if p.is_file()}
    assert assets and assets <= names, assets - names
    meta = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "dschat = dschat.cli.commands:main" in (site / meta).read_text()
    requires = (site / meta.replace("entry_points.txt", "METADATA")).read_text()
    assert "Requires-Dist: torch>=2.4" in requires and "+cu" not in requires
    # Run from the unpacked wheel, not the checkout: the package alone must carry what `--help` needs.
    proc = subprocess.run([sys.executable, "-m", "dschat.cli.commands", "sft", "--help"], cwd=site,
                          capture_output=True, text=True, timeout=120, env={**env(), "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--config FILE" in proc.stdout and "(default: 0.001)" in proc.stdout
    code = "import dschat.models.builtin as b, os; print(b.BUILTIN_MODEL_DIR)"
    where = subprocess.run([sys.executable, "-c", code], cwd=site, capture_output=True, text=True, timeout=60,
                           env={**env(), "PYTHONPATH": str(site)}).stdout.strip()
    assert where.startswith(str(site)) and os.path.isfile(os.path.join(where, "model.safetensors")), where


def test_recipes_are_e2e_configs():
    """recipes/*.yaml: one per documented e2e pipeline, each a valid e2e_rlhf.py --config."""
    pipelines = {}
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        args = e2e_rlhf.parse_args(["--config", str(recipe)])
        pipelines[recipe.stem] = (args.pipeline.name, args.actor_model)
    assert pipelines == {"builtin_dpo": ("dpo", "builtin"), "builtin_ppo": ("ppo", "builtin"),
                         "builtin_verifier": ("verifier", "builtin"), "smollm2_ppo": ("ppo", "smollm2-135m")}


def test_dschat_command_dispatch(capsys):
    """`dschat <command>`: the step's own parser (the launcher's --local_rank=N moved after the command)."""
    import signal

    from dschat.cli import commands

    assert commands.main([]) == 2 and commands.main(["nope"]) == 2 and "dschat sft" not in capsys.readouterr().out
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert commands.main(["--local_rank=0", "ppo", "--help"]) == 0
    finally:
        signal.signal(signal.SIGTERM, handler)
    out = capsys.readouterr().out
    assert "usage: dschat ppo" in out and "--actor_lora_alpha" in out and "--config FILE" in out
