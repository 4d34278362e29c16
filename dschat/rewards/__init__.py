"""Rewards for step 3: a registry of functions of text, `fn(prompts, completions, **row_fields) -> list[float | None]`.

The calling convention is TRL's (`reward_funcs` of its GRPOTrainer), so a reward function written for TRL runs
here unchanged. Registered: `reward_model` (a trained step-2 model; the one code path for training, evaluation
and --gold_reward_model), `builtin_judge`, `accuracy` and `overlong`; a user's own function comes in through
`--reward_fn file.py:name` or `--reward_fn package.module:name`. Adding one is one function and its
registration in `registry.py`'s style (see `rules.py`).
"""
