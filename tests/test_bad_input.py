"""Bad input never costs a model: each of the bad inputs below, given to step 1, step 2, step 3, rw_eval.py,
chat.py or e2e_rlhf.py, ends with a non-zero status (2 for user errors), a message that names the flag or
file, no Python traceback, and every file that existed before byte-identical after (nothing new is written
but the tokenised-data cache and, for e2e, its own new output folder).

All cases run in one pre-imported driver process, each as `__main__` in a forked child (imports cost ~7 s a
process here), with deepspeed.initialize booby-trapped: every case must fail before an engine is built.
The driver records a stat snapshot (size, mtime, inode) of every file around each case; the test also
compares SHA-256 hashes of everything before and after the whole run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, STEP1, STEP2, STEP3, env, run

# One xdist worker runs every case: the module fixtures (a step-1 run, the driver over all cases) then run once.
pytestmark = pytest.mark.xdist_group("bad_input")

RW_EVAL = REPO / "training" / "step2_reward_model_finetuning" / "rw_eval.py"
CHAT = REPO / "chat.py"
E2E = REPO / "e2e_rlhf.py"

# The step-1 fixture trains with exactly these data settings, so the cases' phase-1 cache is warm.
TINY1 = ["--data_split", "1,2,97", "--max_seq_len", "64", "--eval_iters", "1", "--num_judge_prompts", "0",
         "--per_device_train_batch_size", "8", "--dtype", "fp32", "--data_output_path", "{data}"]
S1 = [str(STEP1), *TINY1, "--model_name_or_path", "{sft}"]
S2 = [str(STEP2), "--data_split", "1,2,97", "--max_seq_len", "64", "--eval_iters", "1", "--num_train_epochs", "1",
      "--dtype", "fp32", "--data_output_path", "{data}", "--model_name_or_path", "{sft}"]
S3 = [str(STEP3), "--actor_model_name_or_path", "{sft}", "--critic_model_name_or_path", "{rm}", "--data_split",
      "2,4,4", "--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "4",
      "--max_answer_seq_len", "8", "--num_judge_prompts", "4", "--enable_test_mode", "--test_stop_step", "1",
      "--num_warmup_steps", "0", "--dtype", "fp32", "--data_output_path", "{data}"]
RW = [str(RW_EVAL), "--num_examples", "1"]
CH = [str(CHAT), "--prompt", "hi", "--max_new_tokens", "4"]
EX = "DSCHAT_E2E_EXTRA_ARGS_STEP{}"
STDIN = "DSCHAT_TEST_STDIN"  # the driver gives the case this file as its standard input
OUT = ["--output_dir", "{out}"]  # a fresh path: it must not exist after the case
KEEP = ["--output_dir", "{existing}"]  # an earlier run's output: it must stay byte-identical

# name -> (argv, extra environment, texts the error must contain, exit status)
CASES: dict[str, tuple[list[str], dict[str, str], list[str], int]] = {
    # 1. a step never writes over its own input
    "s1_output_is_the_input": ([*S1, "--output_dir", "{sft}"], {}, ["--output_dir", "is the input model folder",
                                                                   "--model_name_or_path"], 2),
    "s1_output_inside_the_input": ([*S1, "--output_dir", "{sft}/again"], {}, ["--output_dir", "lies inside"], 2),
    "s1_output_contains_the_input": ([str(STEP1), *TINY1, "--model_name_or_path", "{nested}/model", "--output_dir",
                                      "{nested}"], {}, ["--output_dir", "contains"], 2),
    "s1_output_is_a_link_to_the_input": ([*S1, "--output_dir", "{link}"], {}, ["--output_dir", "is the input"], 2),
    "s2_output_is_the_input": ([*S2, "--output_dir", "{sft}"], {}, ["--output_dir", "is the input model folder"], 2),
    "s3_output_is_the_actor": ([*S3, "--output_dir", "{sft}"], {}, ["--output_dir", "--actor_model_name_or_path"], 2),
    "s3_output_is_the_critic": ([*S3, "--output_dir", "{rm}"], {}, ["--output_dir", "--critic_model_name_or_path"], 2),
    "s3_output_contains_the_critic": ([*S3, "--critic_model_name_or_path", "{nested_rm}/rm", "--output_dir",
                                       "{nested_rm}"], {}, ["--output_dir", "contains", "--critic_model_name_or_path"],
                                      2),
    # 2. step 3 never trains against a random reward
    "s3_critic_is_a_causal_lm": ([*S3, "--critic_model_name_or_path", "{sft}", *OUT], {},
                                 ["--critic_model_name_or_path", "{sft}", "not a trained reward model"], 2),
    "s3_critic_is_builtin": ([*S3, "--critic_model_name_or_path", "builtin", *OUT], {},
                             ["--critic_model_name_or_path", "LlamaForCausalLM"], 2),
    "s3_critic_weights_lack_the_head": ([*S3, "--critic_model_name_or_path", "{rm_nohead}", *KEEP], {},
                                        ["--critic_model_name_or_path", "{rm_nohead}", "no score/classifier head"], 2),
    "rw_eval_weights_lack_the_head": ([*RW, "--model_name_or_path", "{rm_nohead}"], {},
                                      ["{rm_nohead}", "no trained score head"], 2),
    "rw_eval_causal_lm": ([*RW, "--model_name_or_path", "{sft}"], {}, ["{sft}", "holds no reward model"], 2),
    "s1_weight_missing": ([*S1, "--model_name_or_path", "{sft_missing}", *KEEP], {},
                          ["{sft_missing}", "model.layers.0.mlp.up_proj.weight"], 2),
    "s2_weight_missing_besides_the_head": ([*S2, "--model_name_or_path", "{sft_missing}", *OUT], {},
                                           ["{sft_missing}", "model.layers.0.mlp.up_proj.weight"], 2),
    "chat_weight_missing": ([*CH, "--path", "{sft_missing}"], {}, ["{sft_missing}", "up_proj"], 2),
    "s1_no_weight_files": ([*S1, "--model_name_or_path", "{sft_noweights}", *OUT], {}, ["{sft_noweights}"], 2),
    "s1_model_without_tokenizer": ([*S1, "--model_name_or_path", "{sft_notok}", *OUT], {},
                                   ["{sft_notok} holds no tokenizer files", "copy them"], 2),
    "s1_lora_adapter_only": ([*S1, "--model_name_or_path", "{adapter_only}", *OUT], {},
                             ["{adapter_only} holds a LoRA adapter only (its base: {sft})", "merge it", "pass its base"],
                             2),
    "chat_lora_adapter_only": ([*CH, "--path", "{adapter_only}"], {}, ["{adapter_only} holds a LoRA adapter only"], 2),
    "s1_reward_model_as_policy": ([*S1, "--model_name_or_path", "{rm}", *OUT], {},
                                  ["{rm}", "LlamaForSequenceClassification"], 2),
    "chat_reward_model": ([*CH, "--path", "{rm}"], {}, ["{rm}", "LlamaForSequenceClassification"], 2),
    # 3. a run that could not save is refused before it trains
    "s1_output_under_a_file": ([*S1, "--output_dir", "{file}/out"], {}, ["--output_dir", "{file} is a file"], 2),
    "s1_output_is_a_file": ([*S1, "--output_dir", "{file}"], {}, ["--output_dir", "not a folder"], 2),
    "s1_output_in_a_read_only_folder": ([*S1, "--output_dir", "{read_only}/out"], {},
                                        ["--output_dir", "cannot write in {read_only}"], 2),
    "s1_output_is_a_read_only_folder": ([*S1, "--output_dir", "{read_only}"], {},
                                        ["--output_dir", "cannot write in {read_only}"], 2),
    "s2_output_under_a_file": ([*S2, "--output_dir", "{file}/rm"], {}, ["--output_dir", "{file} is a file"], 2),
    "s3_output_under_a_file": ([*S3, "--output_dir", "{file}/s3"], {}, ["--output_dir", "{file} is a file"], 2),
    "s3_output_in_a_read_only_folder": ([*S3, "--output_dir", "{read_only}/s3"], {},
                                        ["--output_dir", "cannot write in"], 2),
    # 4. a rerun never deletes the checkpoints of an interrupted run (issue 30)
    "s1_rerun_over_checkpoints": ([*S1, "--output_dir", "{interrupted}"], {},
                                  ["--output_dir {interrupted} holds a checkpoint", "step65", "--resume",
                                   "--overwrite_checkpoints"], 2),
    "s3_rerun_over_checkpoints": ([*S3, "--output_dir", "{interrupted}"], {},
                                  ["holds a checkpoint", "--resume", "--overwrite_checkpoints"], 2),
    "s1_resume_and_overwrite_checkpoints": ([*S1, "--output_dir", "{interrupted}", "--resume",
                                             "--overwrite_checkpoints"], {}, ["--resume", "--overwrite_checkpoints"],
                                            2),
    # --resume: a corrupt state.json, or a checkpoint of a run that trained something else (issue 30 items 6, 11)
    "s1_resume_corrupt_state_json": ([*S1, "--output_dir", "{interrupted}", "--resume"], {},
                                     ["step65/state.json", "corrupt checkpoint state", "'rng' missing"], 2),
    "s1_resume_other_data_split": ([*S1, "--data_split", "2,2,96", "--output_dir", "{resumable}", "--resume"], {},
                                   ["--resume", "data_split: checkpoint '1,2,97', now '2,2,96'"], 2),
    "s1_resume_lora_added": ([*S1, "--lora_dim", "4", "--output_dir", "{resumable}", "--resume"], {},
                             ["--resume", "lora_dim: checkpoint 0, now 4"], 2),
    "s3_resume_other_estimator": ([*S3, "--advantage_estimator", "reinforce_pp", "--output_dir", "{resumable}",
                                   "--resume"], {}, ["--resume", "advantage_estimator: checkpoint 'gae', now "
                                                     "'reinforce_pp'"], 2),
    # an accumulation window longer than the run: no optimizer step would be applied (issue 30 item 4)
    "s1_accumulation_longer_than_the_run": ([*S1, "--gradient_accumulation_steps", "100000", *OUT], {},
                                            ["--gradient_accumulation_steps 100000", "no optimizer step"], 2),
    "s3_accumulation_longer_than_the_run": ([*S3, "--gradient_accumulation_steps", "100000", *OUT], {},
                                            ["--gradient_accumulation_steps 100000", "no optimizer step"], 2),
    # 5. flags checked when parsed
    "s1_learning_rate_0": ([*S1, "--learning_rate", "0", *KEEP], {}, ["--learning_rate", "> 0"], 2),
    "s1_learning_rate_nan": ([*S1, "--learning_rate", "nan", *KEEP], {}, ["--learning_rate"], 2),
    "s1_learning_rate_negative": ([*S1, "--learning_rate", "-0.001", *KEEP], {}, ["--learning_rate"], 2),
    "s1_lora_learning_rate_inf": ([*S1, "--lora_dim", "4", "--lora_learning_rate", "inf", *KEEP], {},
                                  ["--lora_learning_rate"], 2),
    "s1_dropout_1": ([*S1, "--dropout", "1", *KEEP], {}, ["--dropout", "[0, 1)"], 2),
    "s1_dropout_negative": ([*S1, "--dropout", "-0.1", *KEEP], {}, ["--dropout"], 2),
    "s1_dropout_nan": ([*S1, "--dropout", "nan", *KEEP], {}, ["--dropout"], 2),
    "s1_lora_dim_negative": ([*S1, "--lora_dim", "-1", *KEEP], {}, ["--lora_dim"], 2),
    "s1_eval_iters_0": ([*S1, "--eval_iters", "0", *KEEP], {}, ["--eval_iters"], 2),
    "s1_max_new_tokens_0": ([*S1, "--max_new_tokens", "0", *KEEP], {}, ["--max_new_tokens"], 2),
    "s1_max_seq_len_0": ([*S1, "--max_seq_len", "0", *KEEP], {}, ["--max_seq_len"], 2),
    "s1_weight_decay_nan": ([*S1, "--weight_decay", "nan", *KEEP], {}, ["--weight_decay"], 2),
    "s1_warmup_negative": ([*S1, "--num_warmup_steps", "-1", *KEEP], {}, ["--num_warmup_steps"], 2),
    "s1_data_split_nan": ([*S1, "--data_split", "1,nan,1", *KEEP], {}, ["--data_split", "finite"], 2),
    "s1_data_split_inf": ([*S1, "--data_split", "inf,1,1", *KEEP], {}, ["--data_split", "finite"], 2),
    "s1_data_split_two_parts": ([*S1, "--data_split", "1,2", *KEEP], {}, ["--data_split '1,2'"], 2),
    "s1_data_path_twice": ([*S1, "--data_path", "dschat/builtin", "dschat/builtin", *KEEP], {},
                           ["--data_path", "dschat/builtin twice"], 2),
    "s1_data_path_same_file_twice": ([*S1, "--data_path", "{rows}", "{w}/./rows.jsonl", *KEEP], {},
                                     ["--data_path", "twice", "rows.jsonl"], 2),
    "s2_learning_rate_0": ([*S2, "--learning_rate", "0", *OUT], {}, ["--learning_rate"], 2),
    "s2_margin_nan": ([*S2, "--margin", "nan", *OUT], {}, ["--margin"], 2),
    "s2_lora_dim_negative": ([*S2, "--lora_dim", "-4", *OUT], {}, ["--lora_dim"], 2),
    "s3_actor_learning_rate_0": ([*S3, "--actor_learning_rate", "0", *KEEP], {}, ["--actor_learning_rate"], 2),
    "s3_critic_learning_rate_nan": ([*S3, "--critic_learning_rate", "nan", *KEEP], {}, ["--critic_learning_rate"], 2),
    "s3_temperature_0": ([*S3, "--temperature", "0", *KEEP], {}, ["--temperature"], 2),
    "s3_temperature_inf": ([*S3, "--temperature", "inf", *KEEP], {}, ["--temperature"], 2),
    "s3_top_p_0": ([*S3, "--top_p", "0", *KEEP], {}, ["--top_p", "(0, 1]"], 2),
    "s3_top_p_above_1": ([*S3, "--top_p", "1.5", *KEEP], {}, ["--top_p"], 2),
    "s3_actor_lora_dim_negative": ([*S3, "--actor_lora_dim", "-2", *KEEP], {}, ["--actor_lora_dim"], 2),
    "s3_critic_dropout_1": ([*S3, "--critic_dropout", "1.0", *KEEP], {}, ["--critic_dropout"], 2),
    "s3_max_answer_seq_len_0": ([*S3, "--max_answer_seq_len", "0", *KEEP], {}, ["--max_answer_seq_len"], 2),
    "s3_max_prompt_seq_len_0": ([*S3, "--max_prompt_seq_len", "0", *KEEP], {}, ["--max_prompt_seq_len"], 2),
    "s3_eval_iters_0": ([*S3, "--eval_iters", "0", *KEEP], {}, ["--eval_iters"], 2),
    "s3_gamma_nan": ([*S3, "--gamma", "nan", *KEEP], {}, ["--gamma"], 2),
    "s3_kl_ctl_negative": ([*S3, "--kl_ctl", "-0.1", *KEEP], {}, ["--kl_ctl"], 2),
    "s3_data_path_twice": ([*S3, "--data_path", "dschat/builtin", "builtin", *KEEP], {}, ["--data_path", "twice"], 2),
    "rw_eval_max_seq_len_0": ([*RW, "--model_name_or_path", "{rm}", "--max_seq_len", "0"], {}, ["--max_seq_len"], 2),
    "rw_eval_untrained_head_without_data": ([*RW, "--model_name_or_path", "{sft}", "--untrained_head"], {},
                                            ["--untrained_head needs --data_path"], 2),
    "rw_eval_untrained_head_on_a_reward_model": ([*RW, "--model_name_or_path", "{rm}", "--untrained_head",
                                                  "--data_path", "dschat/builtin"], {}, ["{rm}", "already holds"], 2),
    "rw_eval_missing_data_file": ([*RW, "--model_name_or_path", "{rm}", "--data_path", "{w}/nope.jsonl"], {},
                                  ["nope.jsonl"], 2),
    "chat_temperature_0": ([*CH, "--path", "{sft}", "--do_sample", "--temperature", "0"], {}, ["--temperature"], 2),
    "chat_top_p_0": ([*CH, "--path", "{sft}", "--do_sample", "--top_p", "0"], {}, ["--top_p"], 2),
    "chat_max_new_tokens_0": ([*CH, "--path", "{sft}", "--max_new_tokens", "0"], {}, ["--max_new_tokens"], 2),
    "s1_seed_negative": ([*S1, "--seed", "-1", *KEEP], {}, ["--seed", "[0, 2**32 - 1]", "-1"], 2),
    "chat_seed_negative": ([*CH, "--path", "{sft}", "--seed", "-1"], {}, ["--seed", "-1"], 2),
    "chat_stdin_not_utf8": ([str(CHAT), "--path", "{sft}", "--max_new_tokens", "2"], {STDIN: "{latin1}"},
                            ["standard input is not utf-8", "\\xe9"], 2),
    "chat_unknown_device": ([*CH, "--path", "{sft}", "--device", "banana"], {}, ["--device banana"], 2),
    # 6. corrupt files are named
    "s1_truncated_weights": ([*S1, "--model_name_or_path", "{sft_trunc}", *KEEP], {},
                             ["{sft_trunc}/model.safetensors", "truncated or corrupt"], 2),
    "s1_garbage_weights": ([*S1, "--model_name_or_path", "{sft_garbage}", *OUT], {},
                           ["{sft_garbage}/model.safetensors"], 2),
    "s1_config_not_json": ([*S1, "--model_name_or_path", "{sft_badjson}", *KEEP], {},
                           ["{sft_badjson}/config.json", "not a valid JSON"], 2),
    "s1_config_wrong_type": ([*S1, "--model_name_or_path", "{sft_badtype}", *OUT], {},
                             ["{sft_badtype}/config.json", "hidden_size"], 2),
    "s1_config_not_an_object": ([*S1, "--model_name_or_path", "{sft_list}", *OUT], {},
                                ["{sft_list}/config.json", "list"], 2),
    "s1_data_cache_is_a_file": ([*S1, "--data_output_path", "{file}", *KEEP], {}, ["--data_output_path", "{file}"], 2),
    "s1_data_cache_under_a_file": ([*S1, "--data_output_path", "{file}/cache", *OUT], {},
                                   ["--data_output_path", "{file}"], 2),
    "s2_truncated_weights": ([*S2, "--model_name_or_path", "{sft_trunc}", *OUT], {},
                             ["{sft_trunc}/model.safetensors"], 2),
    "s2_config_not_json": ([*S2, "--model_name_or_path", "{sft_badjson}", *OUT], {}, ["{sft_badjson}/config.json"], 2),
    "s2_data_cache_is_a_file": ([*S2, "--data_output_path", "{file}", *OUT], {}, ["--data_output_path"], 2),
    "s3_truncated_actor": ([*S3, "--actor_model_name_or_path", "{sft_trunc}", *KEEP], {},
                           ["{sft_trunc}/model.safetensors"], 2),
    "s3_truncated_critic": ([*S3, "--critic_model_name_or_path", "{rm_trunc}", *OUT], {},
                            ["{rm_trunc}/model.safetensors"], 2),
    "s3_critic_config_not_json": ([*S3, "--critic_model_name_or_path", "{rm_badjson}", *OUT], {},
                                  ["{rm_badjson}/config.json"], 2),
    "s3_actor_config_wrong_type": ([*S3, "--actor_model_name_or_path", "{sft_badtype}", *OUT], {},
                                   ["{sft_badtype}/config.json"], 2),
    "s3_reward_stats_not_json": ([*S3, "--critic_model_name_or_path", "{rm_stats_garbage}", *KEEP], {},
                                 ["{rm_stats_garbage}/reward_stats.json"], 2),
    "s3_reward_stats_wrong_types": ([*S3, "--critic_model_name_or_path", "{rm_stats_types}", *OUT], {},
                                    ["{rm_stats_types}/reward_stats.json", "mean"], 2),
    "s3_reward_stats_a_list": ([*S3, "--critic_model_name_or_path", "{rm_stats_list}", *OUT], {},
                               ["{rm_stats_list}/reward_stats.json"], 2),
    "s3_data_cache_is_a_file": ([*S3, "--data_output_path", "{file}", *KEEP], {}, ["--data_output_path"], 2),
    "rw_eval_truncated_weights": ([*RW, "--model_name_or_path", "{rm_trunc}"], {}, ["{rm_trunc}/model.safetensors"], 2),
    "rw_eval_config_not_json": ([*RW, "--model_name_or_path", "{rm_badjson}"], {}, ["{rm_badjson}/config.json"], 2),
    "chat_truncated_weights": ([*CH, "--path", "{sft_trunc}"], {}, ["{sft_trunc}/model.safetensors"], 2),
    "chat_garbage_weights": ([*CH, "--path", "{sft_garbage}"], {}, ["{sft_garbage}/model.safetensors"], 2),
    "chat_config_not_json": ([*CH, "--path", "{sft_badjson}"], {}, ["{sft_badjson}/config.json"], 2),
    "chat_config_wrong_type": ([*CH, "--path", "{sft_badtype}"], {}, ["{sft_badtype}/config.json"], 2),
    # e2e: a step's bad flag fails that step (its log names the flag); the pipeline stops with status 1
    "e2e_step1_bad_learning_rate": ([str(E2E), "--step", "1", "--output-dir", "{w}/e2e_step1_bad_learning_rate"],
                                    {EX.format(1): "--learning_rate nan --data_output_path {data}"},
                                    ["Step 1 failed", "error line: error: --learning_rate must be"], 2),
    "e2e_step2_bad_dropout": ([str(E2E), "--step", "2", "--output-dir", "{w}/e2e_step2_bad_dropout"],
                              {EX.format(2): "--dropout 2 --data_output_path {data}"},
                              ["Step 2 failed", "error line: error: --dropout must be"], 2),
    # e2e checks its own flags before it starts work (issue 30 item 9)
    "e2e_num_gpus_negative": ([str(E2E), "--num-gpus", "-1", "--output-dir", "{w}/e2e_num_gpus_negative"], {},
                              ["--num-gpus must be at least 1", "-1"], 2),
    "e2e_data_split_two_parts": ([str(E2E), "--data-split", "1,2", "--output-dir", "{w}/e2e_data_split_two_parts"],
                                 {}, ["--data-split '1,2'"], 2),
    "e2e_data_file_missing": ([str(E2E), "--data-path", "{w}/nope.jsonl", "--output-dir", "{w}/e2e_data_file_missing"],
                              {}, ["--data-path {w}/nope.jsonl: no such file"], 2),
    "e2e_step3_without_its_models": ([str(E2E), "--step", "3", "--output-dir", "{w}/e2e_step3_without_its_models"],
                                     {}, ["Step 1 model has not been trained", "actor-models"], 1),
}
READ_ONLY_CASES = [n for n, (argv, _, _, _) in CASES.items() if any("{read_only}" in a for a in argv)]

DRIVER = r'''
import json, os, runpy, stat, sys, time, traceback
sys.path.insert(0, os.getcwd())
import deepspeed, transformers, datasets  # noqa: E401,F401  imported once; every case is a fork
import dschat.trainers.sft, dschat.trainers.reward, dschat.trainers.ppo_run, dschat.cli.entry  # noqa: E401,F401
import inference.chatbot  # noqa: F401
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,  # noqa: F401
                          AutoTokenizer, set_seed)
from deepspeed.accelerator import get_accelerator
get_accelerator()
cases, logs, roots = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])


def snapshot():
    """path -> (kind, size, mtime_ns, inode) of every file; folders by existence and mode only."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                out[path] = ("dir", st.st_mode) if stat.S_ISDIR(st.st_mode) else \
                    ("file", st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
    return out


results = {}
for name, (argv, extra_env) in cases.items():
    err_path = os.path.join(logs, name + ".log")
    before = snapshot()
    start = time.time()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.environ.update(extra_env)
            if "DSCHAT_TEST_STDIN" in extra_env:
                os.dup2(os.open(extra_env["DSCHAT_TEST_STDIN"], os.O_RDONLY), 0)
            fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            def refuse(*a, **k):
                print("DSCHAT_TEST: deepspeed.initialize was called", file=sys.stderr, flush=True)
                raise SystemExit(99)
            deepspeed.initialize = refuse
            sys.argv = list(argv)
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
    after = snapshot()
    results[name] = {"rc": os.waitstatus_to_exitcode(status), "seconds": round(time.time() - start, 2),
                     "output": open(err_path, errors="replace").read(),
                     "changed": sorted(p for p in before if p in after and before[p] != after[p]),
                     "removed": sorted(p for p in before if p not in after),
                     "new": sorted(p for p in after if p not in before)}
print("RESULTS " + json.dumps(results))
'''


def sha_tree(roots: list[Path]) -> dict[str, str]:
    """path -> SHA-256 of every regular file under `roots` (symlinks by their target text)."""
    out = {}
    for root in roots:
        for dirpath, _, filenames in os.walk(root):
            for name in filenames:
                path = Path(dirpath) / name
                out[str(path)] = f"link:{os.readlink(path)}" if path.is_symlink() else \
                    hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def copy_model(src: Path, dst: Path) -> Path:
    """A copy of a model folder (to corrupt one of its files)."""
    shutil.copytree(src, dst)
    return dst


def is_writable(folder: Path) -> bool:
    """Whether this process can create a folder in `folder` (root ignores permission bits)."""
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_reward_model) -> Iterator[dict[str, Any]]:
    """The inputs of all cases: one trained tiny step-1 model, the session's tiny reward model, corrupt copies,
    an earlier run's output, a regular file and a read-only folder."""
    w = tmp_path_factory.mktemp("bad_input_world")
    data = w / "data"
    sft = w / "sft"
    run([STEP1, *[a.replace("{data}", str(data)) for a in TINY1], "--output_dir", sft])
    rm = Path(tiny_reward_model)
    paths = {"w": w, "data": data, "sft": sft, "rm": rm}

    from safetensors.torch import load_file, save_file

    weights = (sft / "model.safetensors").read_bytes()
    paths["sft_trunc"] = copy_model(sft, w / "sft_trunc")
    (paths["sft_trunc"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    paths["sft_garbage"] = copy_model(sft, w / "sft_garbage")
    (paths["sft_garbage"] / "model.safetensors").write_bytes(b"not a safetensors file\n" * 1000)
    config = json.loads((sft / "config.json").read_text())
    paths["sft_badjson"] = copy_model(sft, w / "sft_badjson")
    (paths["sft_badjson"] / "config.json").write_text(json.dumps(config)[:-40])
    paths["sft_badtype"] = copy_model(sft, w / "sft_badtype")
    (paths["sft_badtype"] / "config.json").write_text(json.dumps(config | {"hidden_size": "big"}))
    paths["sft_list"] = copy_model(sft, w / "sft_list")
    (paths["sft_list"] / "config.json").write_text(json.dumps([config]))
    paths["sft_missing"] = copy_model(sft, w / "sft_missing")
    state = load_file(str(sft / "model.safetensors"))
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, str(paths["sft_missing"] / "model.safetensors"), metadata={"format": "pt"})
    paths["sft_notok"] = copy_model(sft, w / "sft_notok")  # weights and config, no tokenizer files
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (paths["sft_notok"] / name).unlink(missing_ok=True)
    paths["adapter_only"] = w / "adapter_only"  # what peft's save_pretrained of a LoRA model writes
    paths["adapter_only"].mkdir()
    (paths["adapter_only"] / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": str(sft), "r": 4}))
    (paths["adapter_only"] / "adapter_model.safetensors").write_bytes(b"adapter weights")
    paths["sft_noweights"] = copy_model(sft, w / "sft_noweights")
    (paths["sft_noweights"] / "model.safetensors").unlink()

    paths["rm_trunc"] = copy_model(rm, w / "rm_trunc")
    rm_weights = (rm / "model.safetensors").read_bytes()
    (paths["rm_trunc"] / "model.safetensors").write_bytes(rm_weights[:-1000])
    paths["rm_badjson"] = copy_model(rm, w / "rm_badjson")
    (paths["rm_badjson"] / "config.json").write_text("{'architectures': ['LlamaForSequenceClassification']}")
    paths["rm_nohead"] = copy_model(rm, w / "rm_nohead")  # a reward config over causal-LM weights: no score head
    shutil.copy(sft / "model.safetensors", paths["rm_nohead"] / "model.safetensors")
    for name, text in (("rm_stats_garbage", "{mean: 0.1, std"), ("rm_stats_types", '{"mean": "high", "std": 1}'),
                       ("rm_stats_list", "[0.1, 0.5]")):
        paths[name] = copy_model(rm, w / name)
        (paths[name] / "reward_stats.json").write_text(text)

    paths["nested"] = w / "nested"
    copy_model(sft, paths["nested"] / "model")
    paths["nested_rm"] = w / "nested_rm"
    copy_model(rm, paths["nested_rm"] / "rm")
    paths["link"] = w / "link_to_sft"
    paths["link"].symlink_to(sft, target_is_directory=True)
    paths["existing"] = copy_model(sft, w / "existing_output")  # what an earlier run left, plus the user's notes
    (paths["existing"] / "notes.json").write_text('{"mine": true}')
    (paths["existing"] / "training.log").write_text("an earlier run\n")
    paths["interrupted"] = copy_model(sft, w / "interrupted")  # a run stopped after its step-65 checkpoint
    (paths["interrupted"] / "checkpoints" / "step65").mkdir(parents=True)
    (paths["interrupted"] / "checkpoints" / "step65" / "state.json").write_text('{"step": 65}')
    (paths["interrupted"] / "checkpoints" / "latest").write_text("step65")
    paths["resumable"] = copy_model(sft, w / "resumable")  # a run stopped after a valid-looking step-3 checkpoint
    (paths["resumable"] / "checkpoints" / "step3").mkdir(parents=True)
    key = {"data_split": "1,2,97", "data_path": ["dschat/builtin"], "lora_dim": 0, "advantage_estimator": "gae"}
    (paths["resumable"] / "checkpoints" / "step3" / "state.json").write_text(json.dumps(
        {"epoch": 0, "batch": 3, "step": 3, "world_size": 1, "rng": [{}], "resume_key": key}))
    (paths["resumable"] / "checkpoints" / "latest").write_text("step3")
    paths["latin1"] = w / "latin1.txt"
    paths["latin1"].write_bytes("caf\u00e9 au lait?\n".encode("latin-1"))
    paths["file"] = w / "a_file"
    paths["file"].write_text("not a folder\n")
    paths["rows"] = w / "rows.jsonl"
    paths["rows"].write_text('{"prompt": " Human: hi Assistant:", "chosen": " hello", "rejected": " go away"}\n')
    paths["read_only"] = w / "read_only"
    paths["read_only"].mkdir()
    (paths["read_only"] / "keep.txt").write_text("keep\n")
    paths["read_only"].chmod(0o555)
    immutable = False
    if is_writable(paths["read_only"]) and shutil.which("chattr"):  # root: permission bits do not stop it
        immutable = subprocess.run(["chattr", "+i", str(paths["read_only"])], capture_output=True).returncode == 0
    paths["read_only_works"] = not is_writable(paths["read_only"])
    yield paths
    if immutable:
        subprocess.run(["chattr", "-i", str(paths["read_only"])], check=True)
    paths["read_only"].chmod(0o755)


def fill(text: str, paths: dict[str, Any], name: str) -> str:
    """A case's text with {placeholders} replaced by the world's paths ({out}: the case's fresh output)."""
    values = {k: str(v) for k, v in paths.items()} | {"out": str(paths["w"] / f"out_{name}")}
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


@pytest.fixture(scope="module")
def results(world, tmp_path_factory, request) -> tuple[dict[str, dict], dict[str, str], dict[str, str]]:
    """Run every case once in the driver (only the selected ones when `-k` picks some test_bad_input rows alone);
    returns (results by case name, hashes before, hashes after)."""
    logs = tmp_path_factory.mktemp("bad_input_logs")
    roots = [world["w"], world["rm"]]
    items = request.session.items
    chosen = {i.callspec.params["name"] for i in items if i.originalname == "test_bad_input"}
    if any(i.originalname != "test_bad_input" for i in items if i.module is request.module):
        chosen = set(CASES)  # the whole-run checks need every case
    cases = {name: ([fill(a, world, name) for a in argv], {k: fill(v, world, name) for k, v in extra.items()})
             for name, (argv, extra, _, _) in CASES.items()
             if (world["read_only_works"] or name not in READ_ONLY_CASES) and name in chosen}
    before = sha_tree(roots)
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases), str(logs),
                           json.dumps([str(r) for r in roots])],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULTS ", 1)[1])
    print({name: r["seconds"] for name, r in out.items()})
    return out, before, sha_tree(roots)


def allowed_new(path: str, world: dict[str, Any], name: str) -> bool:
    """Paths a failed case may create: tokenised-data cache entries, and an e2e case's own new output root."""
    inside = [str(world["data"])] + ([str(world["w"] / name)] if name.startswith("e2e_") else [])
    return any(path == p or path.startswith(p + os.sep) for p in inside)


def test_at_least_40_cases_across_all_entry_points() -> None:
    assert len(CASES) >= 40
    scripts = {Path(argv[0]).name for argv, _, _, _ in CASES.values()}
    assert scripts == {"main.py", "rw_eval.py", "chat.py", "e2e_rlhf.py"}
    steps = {Path(argv[0]).parent.name for argv, _, _, _ in CASES.values() if argv[0].endswith("main.py")}
    assert len(steps) == 3


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, world: dict[str, Any], results) -> None:
    if name in READ_ONLY_CASES and not world["read_only_works"]:
        pytest.skip("no folder here is read-only for this user (root without chattr)")
    argv, _, expected, status = CASES[name]
    r = results[0][name]
    output = r["output"]
    assert r["rc"] == status, f"{name}: status {r['rc']}\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    assert "DSCHAT_TEST" not in output, f"{name} reached deepspeed.initialize:\n{output[-3000:]}"
    if name.startswith("e2e_"):
        text = output
    else:
        lines = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and lines[0] == output.strip().splitlines()[-1], output[-3000:]
        text = lines[0]
    for part in expected:
        assert fill(part, world, name) in text, f"{name}: {fill(part, world, name)!r} not in {text!r}"
    # every file that existed before is untouched; nothing but the data cache (e2e: its own root) is new
    assert not r["changed"] and not r["removed"], (r["changed"], r["removed"])
    assert [p for p in r["new"] if not allowed_new(p, world, name)] == []
    assert not (world["w"] / f"out_{name}").exists()


def test_every_file_that_existed_is_byte_identical(results, world: dict[str, Any]) -> None:
    _, before, after = results
    assert {p: h for p, h in after.items() if p in before} == before
    new = [p for p in after if p not in before and not allowed_new(p, world, "")
           and not any(allowed_new(p, world, n) for n in CASES if n.startswith("e2e_"))]
    assert new == []
    assert (world["existing"] / "notes.json").read_text() == '{"mine": true}'


def test_a_save_replaces_the_model_and_keeps_everything_else(tmp_path: Path) -> None:
    """A save over an earlier model keeps the user's own files (notes.json, settings) byte-identical and drops
    only files a model loader reads (a stale shard, adapter or chat template would change the new model)."""
    from dschat.models import export

    out = tmp_path / "model"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "model-00002-of-00002.safetensors", "adapter_config.json",
                 "chat_template.jinja", "tokenizer_config.json", export.DONE_MARKER):
        (out / name).write_text("old")
    mine = {"notes.json": '{"mine": true}', "eval_settings.json": "{}", "README.md": "# mine\n", "prompts.txt": "hi"}
    for name, text in mine.items():
        (out / name).write_text(text)
    with export.atomic_dir(str(out)) as tmp:
        (tmp / "config.json").write_text("new")
        (tmp / "model.safetensors").write_text("new")
    assert {name: (out / name).read_text() for name in mine} == mine
    assert sorted(p.name for p in out.iterdir()) == sorted([*mine, "config.json", "model.safetensors"])
    assert (out / "config.json").read_text() == "new"
