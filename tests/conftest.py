"""Keep in-process DeepSpeed set-up (a world of one) from leaking launcher variables into later tests; share one
tiny trained reward model between the tests that need a real step-2 output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import LAUNCHER_VARS, STEP2, run

# ~15 s here: a reward model trained from the builtin model on a small phase-2 share.
TINY_STEP2 = ["--data_split", "1,2,97", "--max_seq_len", "64", "--num_train_epochs", "1", "--eval_iters", "1"]


@pytest.fixture(autouse=True)
def _restore_launcher_env():
    saved = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def world_of_one() -> None:
    """An in-process process group of one for DeepSpeed engines built inside a test. The group outlives the
    test (it cannot be re-made in one process); its launcher variables, which DeepSpeed reads when an engine
    is built, are set again for every test that asks and removed afterwards by _restore_launcher_env."""
    from dschat.runtime import dist

    dist.init_distributed()
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_SIZE", "1")):
        os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory) -> Path:
    """A step-2 reward model (trained head, reward_stats.json) from the builtin model, trained once per session.

    Tests use it as step 3's --critic_model_name_or_path (a causal LM there is refused: its head would be
    random) and must not write into it."""
    root = tmp_path_factory.mktemp("tiny_reward")
    out = root / "rm"
    run([STEP2, *TINY_STEP2, "--data_output_path", root / "data", "--output_dir", out])
    return out
