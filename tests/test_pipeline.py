"""The project's central claim, end to end on the builtin task: RLHF raises the ground-truth judge.

Steps 1-3 run as a user runs them (separate processes, default flags except a shorter step 2 and step 3),
and the held-out judge of the PPO actor must beat the SFT model's by the 0.15 issue 4 asks for, and beat
the chosen demonstrations the SFT model imitated. Takes ~2 minutes on 2 CPU cores.
"""

from __future__ import annotations

from tests.helpers import STEP1, STEP2, STEP3, metrics, run


def test_ppo_raises_the_judge_beyond_sft_and_the_demonstrations(tmp_path):
    data = ["--data_output_path", tmp_path / "data"]
    sft, rm, rlhf = tmp_path / "sft", tmp_path / "rm", tmp_path / "rlhf"
    run([STEP1, "--output_dir", sft, *data])
    run([STEP2, "--model_name_or_path", sft, "--output_dir", rm, "--num_train_epochs", "2", *data])
    assert metrics(rm)["evals"][-1]["accuracy"] >= 0.85
    run([STEP3, "--actor_model_name_or_path", sft, "--critic_model_name_or_path", rm, "--output_dir", rlhf,
         "--enable_hybrid_engine", "--enable_test_mode", "--test_stop_step", "150", *data])
    result = metrics(rlhf / "actor")
    start, end = result["evals"][0], result["evals"][-1]
    assert abs(start["judge"] - metrics(sft)["evals"][-1]["judge"]) < 0.05  # step 3 starts from the SFT model
    assert end["judge"] >= start["judge"] + 0.15, result["evals"]
    assert end["judge"] > result["chosen_judge"], result
    assert 0.0 < end["kl"] < 10.0  # it moved, within the KL penalty's reach
