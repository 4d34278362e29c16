"""dschat: a DeepSpeed-Chat-style RLHF pipeline (SFT, reward model, PPO and its successors, DPO)."""

__version__ = "0.1.0"  # pyproject.toml reads it (the one place the version is written)
