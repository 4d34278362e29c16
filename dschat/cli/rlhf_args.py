"""Step-3 flags: DeepSpeed-Chat's, its hard-coded PPO constants as flags, and our additions."""

from __future__ import annotations

import argparse
import math

from dschat.algos.advantages import ADVANTAGE_ESTIMATORS
from dschat.algos.kl import KL_ESTIMATORS
from dschat.algos.masked import LOSS_AGG_MODES
from dschat.algos.policy_losses import POLICY_LOSSES
from dschat.cli.args import check_common_args
from dschat.runtime.errors import FlagError

# Flags that only the critic's optimizer reads: None in the parser, so that a critic-free estimator can refuse
# them when given, and filled in with these defaults otherwise.
CRITIC_DEFAULTS = {"critic_learning_rate": 5e-4, "critic_weight_decay": 0.0}


def add_ppo_args(p: argparse.ArgumentParser) -> None:
    """Learning rates, hybrid-engine and memory flags, PPO constants, sampling and evaluation."""
    p.add_argument("--actor_learning_rate", type=float, default=2e-4,
                   help="DeepSpeed-Chat's 9.65e-6 suits 1B+ models; the tiny builtin actor needs more.")
    p.add_argument("--critic_learning_rate", type=float, default=None,
                   help=f"Default {CRITIC_DEFAULTS['critic_learning_rate']}. DeepSpeed-Chat uses 5e-6 for 350M critics; "
                        "the tiny builtin critic needs more. Refused with a critic-free --advantage_estimator.")
    he = p.add_argument_group("generation")
    he.add_argument("--enable_hybrid_engine", action="store_true",
                    help="Generate with a hook-free twin of the actor, refreshed once per rollout one layer at a "
                         "time (each ZeRO-3 layer gathered alone; LoRA adapters kept unmerged).")
    he.add_argument("--unpin_actor_parameters", action="store_true",
                    help="Accepted for DeepSpeed-Chat compatibility; no effect.")
    he.add_argument("--release_inference_cache", action="store_true",
                    help="Drop the generation twin after every rollout (saves memory, costs a rebuild).")
    he.add_argument("--inference_tp_size", type=int, default=1, help="Must be 1 (tensor-parallel generation is not built).")
    he.add_argument("--tp_gather_partition_size", type=int, default=8, help="Accepted for DeepSpeed-Chat compatibility; no effect.")
    he.add_argument("--temperature", type=float, default=1.0,
                    help="Sampling temperature for rollouts. Every step-3 log-prob (old, new, reference: PPO's "
                         "ratios and the KL) is taken at the same temperature (logits / T, as TRL does), so the "
                         "policy trained is the one that sampled. Rollouts use our flags only, never the model's "
                         "generation_config.json (its repetition_penalty, top_k, ...).")
    he.add_argument("--top_p", type=float, default=1.0,
                    help="Nucleus sampling for rollouts. The log-probs do not see the cut (as in TRL): below 1 the "
                         "answers come from a truncated distribution, slightly off-policy.")
    he.add_argument("--logprobs_from_generation", action="store_true",
                    help="Take the actor's old log-probs from the sampling pass's raw logits (as TRL does) instead "
                         "of a separate forward over each rollout: one actor forward fewer per PPO step, equal "
                         "up to float rounding; keeps [B, V] logits per answer token until the rollout ends.")
    mem = p.add_argument_group("memory")
    mem.add_argument("--offload", action="store_true",
                     help="ZeRO-Offload of the actor's and critic's optimizer state and parameters to CPU.")
    mem.add_argument("--offload_reference_model", action="store_true",
                     help="Keep a separate reference model with its parameters on CPU (ZeRO-3 parameter offload).")
    mem.add_argument("--offload_reward_model", action="store_true",
                     help="Keep a separate reward model with its parameters on CPU (ZeRO-3 parameter offload).")
    mem.add_argument("--no_shared_base", action="store_true",
                     help="With --only_optimize_lora the reference is the actor with its adapters off and the "
                          "reward model the critic with its adapters off (no second copy of either); this flag "
                          "builds separate frozen copies instead, as DeepSpeed-Chat does.")
    mem.add_argument("--enable_ema", action="store_true",
                     help="Keep an EMA (beta 0.992, one update per optimizer step) of the actor's trainable weights in "
                          "fp32 on the CPU (this rank's ZeRO-3 partition under ZeRO-3), saved as actor_ema.")
    mem.add_argument("--enable_mixed_precision_lora", action="store_true",
                     help="DeepSpeed-Chat's MixZ++ (quantised frozen weights); not supported here, refused.")
    ppo = p.add_argument_group("PPO (DeepSpeed-Chat hard-codes these; defaults are its values)")
    ppo.add_argument("--kl_ctl", type=float, default=0.1, help="KL penalty coefficient beta (initial if adaptive).")
    ppo.add_argument("--clip_reward_value", type=float, default=5.0,
                     help="Reward scores are clipped to [-this, this] (after --normalize_reward).")
    ppo.add_argument("--cliprange", type=float, default=0.2,
                     help="The policy ratio's clip range: [1 - this, 1 + --cliprange_high (default this)].")
    ppo.add_argument("--cliprange_value", type=float, default=0.2,
                     help="The critic's values are clipped to within this of their old values in its loss.")
    ppo.add_argument("--gamma", type=float, default=1.0, help="Discount of future rewards (GAE's gamma).")
    ppo.add_argument("--lam", type=float, default=0.95, help="GAE's lambda (bias-variance trade-off of advantages).")
    ppo.add_argument("--kl_estimator", type=str, default=None, choices=sorted(KL_ESTIMATORS),
                     help="Per-token KL estimate from actor samples, r = log pi - log ref (Schulman): k1 = r, "
                          "k2 = r^2 / 2, k3 = exp(-r) - 1 + r. In the reward (default k1) each estimates "
                          "KL(pi||ref). As a loss (--use_kl_loss; default k2) what counts is the gradient: "
                          "k2's is that of KL(pi||ref), k3's that of the reverse KL(ref||pi), and k1's is 0 in "
                          "expectation (refused there).")
    ppo.add_argument("--target_kl", type=float, default=None,
                     help="Use Ziegler et al.'s adaptive KL controller with this target (per sequence).")
    ppo.add_argument("--kl_horizon", type=int, default=10000,
                     help="Horizon of the adaptive KL controller (with --target_kl), in sequences.")
    ppo.add_argument("--entropy_coef", type=float, default=0.0,
                     help="Weight of the entropy bonus (the policy's mean token entropy, aggregated by "
                          "--loss_agg_mode); the entropy is logged as train/entropy every step whatever this is. "
                          "With --entropy_target, the coefficient's starting value.")
    ppo.add_argument("--entropy_target", type=float, default=None,
                     help="Adaptive entropy coefficient (Skywork-OR1): after each step the coefficient rises by "
                          "--entropy_coef_delta when the step's mean token entropy (over all ranks) is below this "
                          "target and falls by it above, clipped to [0, 1]; saved in checkpoints. Off by default.")
    ppo.add_argument("--entropy_coef_delta", type=float, default=None,
                     help="The adaptive entropy coefficient's step per PPO step (with --entropy_target; default "
                          "0.005).")
    pl = p.add_argument_group("policy loss (the GRPO-era menu)")
    pl.add_argument("--policy_loss", type=str, default="ppo", choices=sorted(POLICY_LOSSES),
                    help="ppo: the clipped surrogate (the default, with --cliprange_high and --dual_clip); gspo: "
                         "GSPO's sequence-level ratio exp(mean log(pi / pi_old)) over the answer, clipped to "
                         "[1 - --cliprange, 1 + --cliprange_high] (the paper uses clip ranges near 3e-4 and "
                         "seq-mean-token-mean); cispo: MiniMax's -sg[clip(r)] A log pi, clipped-weight REINFORCE.")
    pl.add_argument("--cliprange_high", type=float, default=None,
                    help="DAPO's clip-higher: the ratio's upper clip is 1 + this (default: --cliprange; DAPO uses "
                         "0.28 with --cliprange 0.2), so low-probability tokens can grow and entropy holds up.")
    pl.add_argument("--dual_clip", type=float, default=None,
                    help="Dual-clip PPO (Ye et al. 2020): the loss of a negative-advantage token is at most this "
                         "constant C > 1 times |A| (bounds the update when the ratio is far above 1). Off by "
                         "default; --policy_loss ppo only.")
    pl.add_argument("--loss_agg_mode", type=str, default="token-mean", choices=list(LOSS_AGG_MODES),
                    help="How the policy, KL and entropy terms reduce over tokens, normalised over the global batch "
                         "(all ranks): token-mean (every token weighs the same; DAPO's token-level loss and the "
                         "default), seq-mean-token-mean (GRPO's: each answer's token mean, then the mean over "
                         "answers), seq-mean-token-sum-norm (Dr. GRPO's: each answer's token sum divided by "
                         "--max_answer_seq_len, then the mean over answers: no length bias). The critic's loss "
                         "stays a token mean.")
    pl.add_argument("--dynamic_sampling", action="store_true",
                    help="DAPO's dynamic sampling (group estimators only): drop the prompts whose answers all got "
                         "the same reward (no gradient) and generate more batches until every rank has a full "
                         "training batch, at most --max_gen_batches per step (then the ranks train on the fewest "
                         "groups any rank kept). Logs train/ds_dropped_groups, ds_gen_batches and ds_rollouts.")
    pl.add_argument("--max_gen_batches", type=int, default=None,
                    help="With --dynamic_sampling: generation batches at most per PPO step (default 3 x "
                         "--generation_batches).")
    pl.add_argument("--mask_truncated_completions", action="store_true",
                    help="DAPO's overlong filtering: answers cut at --max_answer_seq_len (no end-of-turn token) "
                         "carry no loss (their rewards still count in their group's baseline).")
    ppo.add_argument("--normalize_reward", action=argparse.BooleanOptionalAction, default=True,
                     help="Standardise reward scores with the mean/std step 2 stored (reward_stats.json) before "
                          "--clip_reward_value clips them, so the clip means the same for any reward model's scale "
                          "(default on; --no_normalize_reward gives DeepSpeed-Chat's raw scores). Reward models "
                          "without reward_stats.json are used raw.")
    ppo.add_argument("--align_overflow", action="store_true",
                     help="DeepSpeed-Chat's fp16 flag; refused here: each engine's loss scaler skips its own "
                          "overflowed steps, and a non-finite actor or critic loss skips both updates.")
    ppo.add_argument("--advantage_estimator", type=str, default="gae", choices=sorted(ADVANTAGE_ESTIMATORS),
                     help="How advantages are computed; gae (PPO with a critic) is DeepSpeed-Chat's. Critic-free "
                          "estimators build no critic.")
    ppo.add_argument("--n_samples_per_prompt", type=int, default=1,
                     help="Answers sampled per prompt in one rollout (grpo, dr_grpo, rloo and reinforce_pp_baseline "
                          "compare them; they need at least 2).")
    ppo.add_argument("--recompute_critic_values", action="store_true",
                     help="Run the critic's old-value forward apart from its update forward, as DeepSpeed-Chat does. "
                          "By default, when one PPO epoch updates each rollout batch whole (--ppo_epochs 1, "
                          "--generation_batches 1, a training batch that holds the rollout batch) and the critic "
                          "has no dropout, the update reuses the experience forward (graph kept): one critic "
                          "forward fewer per PPO step, the same values.")
    ppo.add_argument("--use_kl_loss", action="store_true",
                     help="Put the KL to the reference in the actor's loss (coefficient --kl_ctl, estimator "
                          "--kl_estimator: k2 by default, k3 for the reverse KL; k1 is refused) instead of in the "
                          "reward.")
    rw = p.add_argument_group("rewards")
    rw.add_argument("--reward_fn", type=str, nargs="+", default=["reward_model"],
                    help="What scores a rollout: registered rewards (reward_model: the step-2 model at "
                         "--critic_model_name_or_path; builtin_judge: the builtin task's judge; accuracy: the final "
                         "answer against the row's answer/solution/ground_truth; overlong: DAPO's soft length "
                         "penalty) and/or your own functions as path/to/file.py:name or package.module:name, called "
                         "as TRL calls reward functions: fn(prompts=, completions=, completion_ids=, **row_columns) "
                         "-> one float (or None: no opinion) per completion. Several are summed with "
                         "--reward_weights. Without reward_model no reward model is loaded.")
    rw.add_argument("--reward_weights", type=float, nargs="+", default=None,
                    help="One weight per --reward_fn entry (default 1 each); the rollout's reward is the weighted "
                         "sum of the rewards that gave a value. With --advantage_estimator grpo the sum is divided "
                         "by its group's std, so in a group where a 0/1 reward is the same for every answer a small "
                         "shaping reward (overlong) is scaled up to +-1 whatever its weight: dr_grpo and rloo keep "
                         "the weights' meaning.")
    rw.add_argument("--overlong_buffer_len", type=int, default=None,
                    help="The overlong reward's L_cache: answers longer than --max_answer_seq_len minus this many "
                         "tokens are penalised linearly down to -1 at --max_answer_seq_len (default: a quarter of "
                         "--max_answer_seq_len).")
    rw.add_argument("--critic_from_actor", action="store_true",
                    help="With --advantage_estimator gae and no reward model: start the critic from the actor with "
                         "a fresh value head (the only case a fresh head is accepted).")
    out = p.add_argument_group("output")
    out.add_argument("--print_answers", action="store_true", help="Print a prompt and its sampled answer while training.")
    out.add_argument("--print_answers_interval", type=int, default=1,
                     help="With --print_answers: every this many steps.")
    out.add_argument("--enable_test_mode", action="store_true",
                     help="Stop after --test_stop_step steps (DeepSpeed-Chat's test switch).")
    out.add_argument("--test_stop_step", type=int, default=0,
                     help="With --enable_test_mode: stop training after this many PPO steps.")
    out.add_argument("--num_judge_prompts", type=int, default=64,
                     help="Held-out prompts answered (greedy) at the start and end: builtin ones, else the eval split.")
    out.add_argument("--eval_n_samples", type=int, default=1,
                     help="Answers per held-out prompt at each evaluation: 1 is greedy; more are sampled (--temperature, "
                          "--top_p) and give pass@k of 0/1 rewards (unbiased estimator) beside each reward's mean.")
    out.add_argument("--save_best_by", type=str, default=None,
                     help="Save the actor of the evaluation (after training began) with the highest value of this "
                          "held-out metric (judge, reward_score, gold_score, reward/<name>, pass@<k>/<name>) "
                          "instead of the last state; evaluate more often with --eval_interval. Off by default.")
    out.add_argument("--gold_reward_model", type=str, default=None,
                     help="A second step-2 reward model (e.g. trained on a disjoint half of the pairs) that scores the "
                          "held-out answers at every evaluation but never the training rollouts: if the trained "
                          "reward model's score rises while this one falls, PPO is hacking its reward model.")


def set_step3_help(p: argparse.ArgumentParser) -> None:
    """Step 3's meaning of shared flags, once every flag is added: --compute_fp32_loss is always on here."""
    for action in p._actions:
        if action.dest == "compute_fp32_loss":
            action.help = ("Accepted for DeepSpeed-Chat compatibility; step 3 always computes its log-probs (old, new, "
                           "reference) and entropies from fp32 logits: bf16 new log-probs against fp32 old ones "
                           "put PPO's ratios off 1 at the on-policy step.")


def check_rlhf_args(args: argparse.Namespace) -> None:
    """Reject flag combinations that cannot work, naming the flags; derive the actor's accumulation."""
    check_common_args(args, model_dirs=("actor", "critic", "actor_ema"))
    if args.inference_tp_size > 1:
        if args.actor_zero_stage != 3:
            raise FlagError("--inference_tp_size > 1 requires --actor_zero_stage 3")
        raise FlagError("--inference_tp_size > 1: tensor-parallel generation is not supported; use 1")
    if args.align_overflow:
        raise FlagError("--align_overflow is not supported: each engine's fp16 loss scaler skips its own overflowed "
                        "steps, and a non-finite actor or critic loss already skips both updates; drop the flag")
    for name in ("ppo_epochs", "generation_batches", "n_samples_per_prompt", "max_answer_seq_len",
                 "max_prompt_seq_len", "num_train_epochs"):
        if getattr(args, name) < 1:
            raise FlagError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    check_ppo_numbers(args)
    resolve_kl_estimator(args)
    estimator = ADVANTAGE_ESTIMATORS[args.advantage_estimator]
    check_reward_args(args, estimator.needs_critic)
    check_policy_loss_args(args, estimator.needs_group)
    if estimator.needs_group and args.n_samples_per_prompt < 2:
        raise FlagError(f"--advantage_estimator {args.advantage_estimator} compares several answers to one prompt: "
                        f"set --n_samples_per_prompt 2 or more (got {args.n_samples_per_prompt})")
    if not estimator.needs_critic:
        used = [f for f, on in (("--critic_lora_dim", args.critic_lora_dim > 0),
                                ("--critic_gradient_checkpointing", args.critic_gradient_checkpointing),
                                ("--critic_dropout", args.critic_dropout is not None),
                                ("--recompute_critic_values", args.recompute_critic_values),
                                *((f"--{k}", getattr(args, k) is not None) for k in CRITIC_DEFAULTS)) if on]
        if used:
            raise FlagError(f"{', '.join(used)}: --advantage_estimator {args.advantage_estimator} trains no critic; "
                            f"drop the critic flags (--critic_model_name_or_path is still the reward model)")
        if args.critic_from_actor:
            raise FlagError(f"--critic_from_actor: --advantage_estimator {args.advantage_estimator} trains no critic")
    for name, default in CRITIC_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.enable_mixed_precision_lora:
        raise FlagError("--enable_mixed_precision_lora (MixZ++) is not supported; drop the flag")
    rollout = args.per_device_generation_batch_size * args.generation_batches * args.n_samples_per_prompt
    if rollout % args.per_device_training_batch_size:
        raise FlagError(f"--per_device_generation_batch_size x --generation_batches x --n_samples_per_prompt "
                        f"({rollout}) must be a multiple of --per_device_training_batch_size "
                        f"({args.per_device_training_batch_size})")
    if bool(args.unsupervised_dataset_name) != bool(args.unsupervised_dataset_config_name) and \
            args.unsupervised_dataset_name and not args.unsupervised_dataset_name.endswith((".txt", ".json", ".jsonl")):
        raise FlagError("a hub --unsupervised_dataset_name needs --unsupervised_dataset_config_name too")
    # PTX adds a second backward per step, so the actor accumulates twice as many micro-batches.
    args.actor_gradient_accumulation_steps = args.gradient_accumulation_steps * (2 if args.unsupervised_dataset_name else 1)


def resolve_kl_estimator(args: argparse.Namespace) -> None:
    """--kl_estimator: k2 by default with --use_kl_loss (k1 refused there: its gradient is 0 in expectation), k1
    in the reward."""
    if args.use_kl_loss and args.kl_estimator == "k1":
        raise FlagError("--kl_estimator k1 with --use_kl_loss regularises nothing: the gradient of k1 = log pi - "
                        "log ref is grad log pi, whose expectation under the actor's samples is 0; use k2 "
                        "(KL(pi||ref)'s gradient, the default) or k3 (the reverse KL(ref||pi))")
    if args.kl_estimator is None:
        args.kl_estimator = "k2" if args.use_kl_loss else "k1"


DEFAULT_REWARD_MODEL = "output/reward-models/builtin"  # e2e's step-2 output folder
EVAL_METRICS = ("reward_score", "judge", "gold_score")


def check_reward_args(args: argparse.Namespace, needs_critic: bool) -> None:
    """--reward_fn and friends: weights per reward, a reward model path only where one is used, metric names."""
    if args.reward_weights is not None:
        if len(args.reward_weights) != len(args.reward_fn):
            raise FlagError(f"--reward_weights has {len(args.reward_weights)} values for {len(args.reward_fn)} "
                            f"--reward_fn entries ({' '.join(args.reward_fn)})")
        if not all(math.isfinite(w) for w in args.reward_weights):
            raise FlagError(f"--reward_weights must be finite numbers (got {args.reward_weights})")
    if len(set(args.reward_fn)) != len(args.reward_fn):
        raise FlagError(f"--reward_fn names a reward twice ({' '.join(args.reward_fn)})")
    uses_rm = "reward_model" in args.reward_fn
    if args.critic_from_actor and uses_rm:
        raise FlagError("--critic_from_actor: the critic starts from the reward model when --reward_fn has "
                        "reward_model; drop the flag")
    needs_path = uses_rm or (needs_critic and not args.critic_from_actor)
    if args.critic_model_name_or_path is None:
        args.critic_model_name_or_path = DEFAULT_REWARD_MODEL if needs_path else None
    elif not needs_path:
        raise FlagError(f"--critic_model_name_or_path {args.critic_model_name_or_path} is not used: --reward_fn "
                        f"{' '.join(args.reward_fn)} needs no reward model and --advantage_estimator "
                        f"{args.advantage_estimator} {'starts its critic from the actor' if needs_critic else 'trains no critic'}"
                        f"; drop the flag or add reward_model to --reward_fn")
    if not uses_rm and not args.normalize_reward:
        raise FlagError("--no_normalize_reward: only the reward model's scores are normalised, and --reward_fn has "
                        "no reward_model; drop the flag")
    if args.overlong_buffer_len is not None:
        if "overlong" not in args.reward_fn:
            raise FlagError("--overlong_buffer_len is the overlong reward's setting: add overlong to --reward_fn")
        if not 1 <= args.overlong_buffer_len <= args.max_answer_seq_len:
            raise FlagError(f"--overlong_buffer_len must be in [1, --max_answer_seq_len={args.max_answer_seq_len}] "
                            f"(got {args.overlong_buffer_len})")
    if args.eval_n_samples < 1:
        raise FlagError(f"--eval_n_samples must be at least 1 (got {args.eval_n_samples})")
    if args.save_best_by is not None:
        if not args.output_dir:
            raise FlagError("--save_best_by needs --output_dir (the best actor is kept there)")
        metric, _, name = args.save_best_by.partition("/")
        names = [f.rpartition(":")[2] for f in args.reward_fn]
        ok = (args.save_best_by in EVAL_METRICS
              or (metric == "reward" and name in names)
              or (metric.startswith("pass@") and metric[5:].isdigit() and name in names))
        if not ok or (args.save_best_by == "gold_score" and not args.gold_reward_model):
            raise FlagError(f"--save_best_by {args.save_best_by}: expected a held-out metric where higher is better: "
                            f"{', '.join(EVAL_METRICS)} (gold_score needs --gold_reward_model), reward/<name> or "
                            f"pass@<k>/<name> for a --reward_fn name ({', '.join(names)})")


# (flag, lowest, highest, whether the lowest is allowed); None: unbounded on that side.
PPO_RANGES = (("kl_ctl", 0.0, None, True), ("clip_reward_value", 0.0, None, False), ("cliprange", 0.0, None, False),
              ("cliprange_value", 0.0, None, False), ("gamma", 0.0, 1.0, True), ("lam", 0.0, 1.0, True),
              ("unsup_coef", 0.0, None, True), ("entropy_coef", None, None, True), ("target_kl", 0.0, None, False),
              ("cliprange_high", 0.0, None, False), ("entropy_target", 0.0, None, True),
              ("entropy_coef_delta", 0.0, None, False),
              ("temperature", 0.0, None, False), ("top_p", 0.0, 1.0, False))


def check_ppo_numbers(args: argparse.Namespace) -> None:
    """PPO constants finite and in range (a NaN coefficient would silently poison every update)."""
    for name, low, high, low_ok in PPO_RANGES:
        value = getattr(args, name, None)
        if value is None:
            continue
        ok = math.isfinite(value) and (low is None or value > low or (low_ok and value == low)) and \
            (high is None or value <= high)
        if not ok:
            bounds = f"{'[' if low_ok else '('}{'-inf' if low is None else low}, {'inf)' if high is None else f'{high}]'}"
            raise FlagError(f"--{name} must be a finite number in {bounds} (got {value})")
    if args.kl_horizon < 1:
        raise FlagError(f"--kl_horizon must be at least 1 (got {args.kl_horizon})")


def check_policy_loss_args(args: argparse.Namespace, needs_group: bool) -> None:
    """--policy_loss and the DAPO / Dr. GRPO options: ranges and the combinations that cannot work."""
    if args.dual_clip is not None:
        if not (math.isfinite(args.dual_clip) and args.dual_clip > 1.0):
            raise FlagError(f"--dual_clip must be a finite number > 1 (got {args.dual_clip})")
        if args.policy_loss != "ppo":
            raise FlagError(f"--dual_clip is a bound of PPO's clipped loss: it needs --policy_loss ppo (got "
                            f"{args.policy_loss})")
    if args.cliprange >= 1.0 and args.policy_loss in ("gspo", "cispo"):
        raise FlagError(f"--cliprange must be below 1 with --policy_loss {args.policy_loss} (a ratio clipped at "
                        f"1 - {args.cliprange} <= 0; got {args.cliprange})")
    if args.entropy_target is not None and not 0.0 <= args.entropy_coef <= 1.0:
        raise FlagError(f"--entropy_target adapts --entropy_coef within [0, 1]: start it there (got {args.entropy_coef})")
    if args.entropy_coef_delta is not None and args.entropy_target is None:
        raise FlagError("--entropy_coef_delta is --entropy_target's step: add --entropy_target or drop it")
    if args.entropy_coef_delta is None:
        args.entropy_coef_delta = 0.005
    if args.max_gen_batches is not None and not args.dynamic_sampling:
        raise FlagError("--max_gen_batches is --dynamic_sampling's budget: add --dynamic_sampling or drop it")
    if args.dynamic_sampling:
        if not needs_group:
            raise FlagError(f"--dynamic_sampling drops groups of answers to one prompt whose rewards are equal: it "
                            f"needs a group estimator (grpo, dr_grpo, rloo, reinforce_pp_baseline), not "
                            f"--advantage_estimator {args.advantage_estimator}")
        if args.max_gen_batches is None:
            args.max_gen_batches = 3 * args.generation_batches
        if args.max_gen_batches < args.generation_batches:
            raise FlagError(f"--max_gen_batches ({args.max_gen_batches}) must be at least --generation_batches "
                            f"({args.generation_batches}): a full training batch needs that many")
