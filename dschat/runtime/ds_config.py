"""DeepSpeed config builders: the only place that knows DeepSpeed's JSON config keys."""

from __future__ import annotations

from typing import Any


def _precision(dtype: str) -> dict[str, Any]:
    if dtype == "fp16":
        return {"fp16": {"enabled": True, "loss_scale_window": 100}}
    if dtype == "bf16":
        return {"bf16": {"enabled": True}}
    return {}


def get_train_ds_config(*, stage: int, dtype: str, micro_batch: int, world_size: int, grad_accum: int = 1,
                        offload: bool = False, tensorboard_path: str | None = None, tb_name: str = "",
                        gradient_clipping: float = 1.0) -> dict[str, Any]:
    """Config for a trained engine: ZeRO `stage`, optional CPU offload, batch sizes for `world_size` ranks.

    `tensorboard_path` (None: off) turns on DeepSpeed's own TensorBoard logs there, as job `tb_name`.
    """
    device = "cpu" if offload else "none"
    zero = {"stage": stage, "overlap_comm": True, "offload_param": {"device": device},
            "offload_optimizer": {"device": device}, "stage3_param_persistence_threshold": 1e4,
            "stage3_max_live_parameters": 3e7, "stage3_prefetch_bucket_size": 3e7,
            "memory_efficient_linear": False}
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
              "train_batch_size": micro_batch * grad_accum * world_size, "steps_per_print": 10 ** 9,
              "zero_optimization": zero, "gradient_clipping": gradient_clipping, "prescale_gradients": False,
              "wall_clock_breakdown": False, "zero_allow_untested_optimizer": True,
              "zero_force_ds_cpu_optimizer": False, **_precision(dtype)}
    if tensorboard_path:
        config["tensorboard"] = {"enabled": True, "output_path": f"{tensorboard_path}/ds_tensorboard_logs/",
                                 "job_name": f"{tb_name}_tensorboard"}
    return config


def get_eval_ds_config(*, stage: int, dtype: str, world_size: int = 1, micro_batch: int = 1,
                       offload: bool = False) -> dict[str, Any]:
    """Config for a frozen (inference-only) engine: ZeRO `stage`, optional parameter offload."""
    zero = {"stage": stage, "stage3_param_persistence_threshold": 1e4,
            "offload_param": {"device": "cpu" if offload else "none"}, "memory_efficient_linear": False}
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "train_batch_size": micro_batch * world_size, "steps_per_print": 10 ** 9,
            "zero_optimization": zero, "prescale_gradients": False, "wall_clock_breakdown": False,
            **_precision(dtype)}
