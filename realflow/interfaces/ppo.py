"""`ppo_actor` and `ppo_critic`: PPO with KL-shaped rewards, GAE and a clipped value function.

Both interfaces take the same keyword arguments (`PPOArgs`, the experiment's PPO
hyperparameters) and compute the same returns from the same batch with `PPOReturns`: each keeps
its own KL controller and value normaliser, which stay equal because they see the same data.

    actor_gen (generate)   packed_prompts -> packed_input_ids, logprobs, prompt_mask, no_eos_mask
    ref_inf   (inference)  packed_input_ids -> logprobs (remapped to ref_logprobs)
    critic_inf (inference) packed_input_ids -> values
    actor_train / critic_train (train_step) packed_input_ids, prompt_mask, logprobs,
        ref_logprobs, rewards, values, no_eos_mask -> stats
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from realflow.algorithms import (
    AdaptiveKLController,
    FixedKLController,
    RunningMeanStd,
    gae_packed,
    kl_shaped_rewards,
    masked_mean,
    masked_var,
    ppo_actor_loss,
    ppo_critic_loss,
    process_scores,
    segment_sum,
    shifted_cu_seqlens,
    should_skip_minibatch,
    split_critic_values,
)
from realflow.algorithms.ppo import PPOActorStats
from realflow.api.data import SequenceSample
from realflow.api.dfg import MicroBatchSpec
from realflow.api.interface import Model, ModelInterface
from realflow.api.registry import INTERFACES
from realflow.interfaces.common import (
    IDS,
    answer_mask_T1,
    build_args,
    map_micro_batches,
    packed,
    rollout,
    save_hf_dir,
    shifted_seqlens,
    token_logprobs,
    train_engine_of,
    train_minibatches,
)
from realflow.interfaces.dp_stats import dp_all, dp_masked_whiten


@dataclasses.dataclass
class PPOArgs:
    """Keyword arguments of ppo_actor / ppo_critic (see realflow.experiments.ppo for the docs)."""

    gen: dict[str, Any] = dataclasses.field(default_factory=dict)
    ppo_n_minibatches: int = 2
    kl_ctl: float = 0.05
    adaptive_kl_ctl: bool = False
    adaptive_kl_target: float = 6.0
    adaptive_kl_horizon: float = 10000.0
    discount: float = 1.0
    gae_lambda: float = 1.0
    eps_clip: float = 0.2
    value_eps_clip: float = 0.2
    max_reward_clip: float = 5.0
    reward_output_scaling: float = 1.0
    reward_output_bias: float = 0.0
    mask_no_eos_with_zero: bool = False
    no_eos_penalty: float = 0.0
    early_stop_imp_ratio: float = 0.0
    early_stop_kl: float = 0.0
    use_adv_norm: bool = True
    value_norm: bool = False

    def generation_config(self) -> Any:
        from realflow.models.generation import GenerationConfig

        return generation_config(self.gen, GenerationConfig)

    @property
    def temperature(self) -> float:
        """The temperature log-probs are computed at (1 for greedy decoding)."""
        return logprob_temperature(self.gen)


def generation_config(gen: dict[str, Any], cls: type) -> Any:
    """A GenerationConfig from the `gen` dict of the hyperparameters; unknown keys fail."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(gen) - known)
    if unknown:
        raise ValueError(f"unknown generation arguments {unknown}; known: {sorted(known)}")
    return cls(**gen)


def logprob_temperature(gen: dict[str, Any]) -> float:
    return 1.0 if gen.get("greedy", False) else float(gen.get("temperature", 1.0))


@dataclasses.dataclass
class PPOBatch:
    """What PPOReturns computes from a train batch (per-token tensors are [T1])."""

    mask_T1: torch.Tensor
    advantages_T1: torch.Tensor
    returns_T1: torch.Tensor
    stats: dict[str, float]


class PPOReturns:
    """KL-shaped rewards, GAE advantages and returns of a PPO batch, with the KL controller and
    the value normaliser they need. Actor and critic each own one (see the module docstring)."""

    def __init__(self, args: PPOArgs):
        self.args = args
        if args.adaptive_kl_ctl:
            self.kl_ctl: Any = AdaptiveKLController(
                args.kl_ctl, args.adaptive_kl_target, args.adaptive_kl_horizon
            )
        else:
            self.kl_ctl = FixedKLController(args.kl_ctl)
        self.value_rms = RunningMeanStd() if args.value_norm else None

    @torch.no_grad()
    def compute(self, data: SequenceSample, dp_group: Any = None) -> PPOBatch:
        """Rewards, advantages and returns (in the critic's unnormalised scale) of `data`; then
        update the KL controller and the value normaliser with this batch: with `dp_group` (the
        train engine's), with the whole batch of its ranks, as one process would (`data` is
        this rank's part; every rank of the group calls this)."""
        a, d = self.args, data.data
        cu_B1 = data.cu_seqlens(IDS)
        mask_T1 = answer_mask_T1(d["prompt_mask"], cu_B1)
        score_B = d["rewards"].float()
        no_eos_B = d["no_eos_mask"].bool()
        old_logp_T1, ref_logp_T1 = d["logprobs"].float(), d["ref_logprobs"].float()
        kl_coef = self.kl_ctl.value
        rewards_T1 = kl_shaped_rewards(
            score_B, old_logp_T1, ref_logp_T1, mask_T1, cu_B1, kl_coef, no_eos_B,
            reward_scale=a.reward_output_scaling, reward_bias=a.reward_output_bias,
            reward_clip=a.max_reward_clip, mask_no_eos_with_zero=a.mask_no_eos_with_zero,
            no_eos_penalty=-a.no_eos_penalty if a.no_eos_penalty else None,
        )  # fmt: skip
        total_B = score_B  # the task reward: sequence score plus process-reward steps
        if "dense_rewards" in d:  # process rewards: each step's score on its own token
            dense_T1 = d["dense_rewards"].float() * mask_T1
            rewards_T1 = rewards_T1 + a.reward_output_scaling * dense_T1
            total_B = score_B + segment_sum(dense_T1, shifted_cu_seqlens(cu_B1))
        values_T = d["values"].float()
        if self.value_rms is not None:
            values_T = self.value_rms.denormalize(values_T)
        values_T1, bootstrap_B = split_critic_values(values_T, cu_B1, no_eos_B)
        adv_T1, ret_T1 = gae_packed(
            rewards_T1, values_T1, cu_B1, bootstrap_B, a.discount, a.gae_lambda, mask_T1
        )
        if self.value_rms is not None:
            self.value_rms.update(dp_all(ret_T1[mask_T1.bool()], dp_group))
        cu1_B1 = shifted_cu_seqlens(cu_B1)
        kl_B = segment_sum((old_logp_T1 - ref_logp_T1) * mask_T1, cu1_B1)
        n_rewards = torch.tensor([float(data.total_tokens("rewards"))])
        self.kl_ctl.update(
            float(dp_all(kl_B, dp_group).mean()),
            n_steps=int(dp_all(n_rewards, dp_group).sum()),
        )
        n_answer_B = segment_sum(mask_T1.float(), cu1_B1)
        processed_B = process_scores(
            score_B, no_eos_B, a.reward_output_scaling, a.reward_output_bias, a.max_reward_clip,
            a.mask_no_eos_with_zero, -a.no_eos_penalty if a.no_eos_penalty else None,
        )  # fmt: skip
        stats = {
            "reward/mean": float(total_B.mean()),
            "reward/processed_mean": float(processed_B.mean()),
            "kl": float(kl_B.mean()),
            "kl_coef": kl_coef,
            "kl_reward/mean": float((-kl_coef * kl_B).mean()),
            "advantages/mean": float(masked_mean(adv_T1, mask_T1)),
            "returns/mean": float(masked_mean(ret_T1, mask_T1)),
            "values/mean": float(masked_mean(values_T1, mask_T1)),
            "values/explained_var": explained_variance(values_T1, ret_T1, mask_T1),
            "answer_len/mean": float(n_answer_B.mean()),
            "no_eos_ratio": float(no_eos_B.float().mean()),
        }
        return PPOBatch(mask_T1, adv_T1, ret_T1, stats)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"kl_ctl": self.kl_ctl.state_dict()}
        if self.value_rms is not None:
            state["value_rms"] = self.value_rms.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        if self.value_rms is not None:
            self.value_rms.load_state_dict(state["value_rms"])


def explained_variance(
    values_T1: torch.Tensor, returns_T1: torch.Tensor, mask_T1: torch.Tensor
) -> float:
    """`1 - Var(returns - values) / Var(returns)` over answer tokens: 1 for a perfect critic, 0
    for one that predicts the mean, negative for one that is worse (nan when returns are
    constant)."""
    var_returns = float(masked_var(returns_T1, mask_T1))
    if var_returns == 0.0:
        return float("nan")
    return 1.0 - float(masked_var(returns_T1 - values_T1, mask_T1)) / var_returns


def train_sample(data: SequenceSample, tensors: dict[str, torch.Tensor]) -> SequenceSample:
    """packed_input_ids plus per-token [T1] training tensors, split together by sample."""
    seqlens = {IDS: data.seqlens[IDS], **{k: shifted_seqlens(data) for k in tensors}}
    return SequenceSample(
        ids=list(data.ids), seqlens=seqlens, data={IDS: data.data[IDS], **tensors}
    )


def n_loss_tokens(mb: SequenceSample) -> float:
    return float(mb.data["loss_mask"].sum())


# ---- actor ---------------------------------------------------------------------------------------


def policy_loss_stats(s: PPOActorStats) -> dict[str, float]:
    return {
        "pg_loss": float(s.pg_loss),
        "clip_frac": float(s.clip_frac),
        "importance_ratio": float(s.ratio_mean),
        "importance_ratio_max": float(s.ratio_max),
        "approx_kl": float(s.approx_kl_k3),
    }


def early_stop_fn(
    engine: Any,
    mb_spec: MicroBatchSpec,
    temperature: float,
    max_ratio: float,
    max_kl: float,
) -> Any:
    """A `skip_fn` for train_minibatches: a no-grad pass over a minibatch, skipped when its mean
    importance ratio exceeds `max_ratio` or its approx KL exceeds `max_kl` (0: not checked).
    None when both checks are off."""
    if max_ratio <= 0 and max_kl <= 0:
        return None

    def skip(minibatch: SequenceSample) -> bool:
        fn = lambda m, mb, dev: token_logprobs(m, mb, dev, temperature)  # noqa: E731
        model = Model("early_stop", engine)
        logp_T1 = map_micro_batches(model, minibatch, mb_spec, fn, "early_stop")
        d = minibatch.data
        _, stats = ppo_actor_loss(
            logp_T1, d["old_logprobs"], d["advantages"], d["loss_mask"], eps_clip=1.0
        )
        return should_skip_minibatch(stats, max_ratio or None, max_kl or None)

    return skip


@INTERFACES.register("ppo_actor")
class PPOActorInterface(ModelInterface):
    """generate: answers to packed_prompts; inference: `logprobs` (L-1 per sequence) under the
    current weights; train_step: PPO policy update (see the module docstring)."""

    def __init__(self, **kwargs: Any):
        self.args = build_args(PPOArgs, kwargs, "ppo_actor")
        self.gconfig = self.args.generation_config()
        self.returns = PPOReturns(self.args)

    def generate(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample:
        return rollout(model, data, mb_spec, self.gconfig, 1, self.args.temperature)

    def inference(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample:
        t = self.args.temperature
        fn = lambda m, mb, dev: token_logprobs(m, mb, dev, t)  # noqa: E731
        logprobs = map_micro_batches(model, data, mb_spec, fn, "ppo_actor")
        return SequenceSample(
            ids=list(data.ids),
            seqlens={"logprobs": shifted_seqlens(data)},
            data={"logprobs": logprobs},
            metadata=dict(data.metadata),
        )

    def loss(self, module: torch.nn.Module, mb: SequenceSample) -> tuple[torch.Tensor, dict]:
        device = next(module.parameters()).device
        logp_T1 = token_logprobs(module, mb, device, self.args.temperature)
        d = {k: v.to(device) for k, v in mb.data.items()}
        loss, s = ppo_actor_loss(
            logp_T1, d["old_logprobs"], d["advantages"], d["loss_mask"], self.args.eps_clip
        )
        return loss, policy_loss_stats(s)

    def train_step(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, float]:
        engine = train_engine_of(model, "ppo_actor")
        group = getattr(engine, "dp_group", None)
        batch = self.returns.compute(data, group)
        adv_T1 = batch.advantages_T1
        if self.args.use_adv_norm:
            adv_T1 = dp_masked_whiten(adv_T1, batch.mask_T1, group)
        sample = train_sample(
            data,
            {
                "old_logprobs": data.data["logprobs"].float(),
                "advantages": adv_T1.float(),
                "loss_mask": batch.mask_T1,
            },
        )
        a = self.args
        skip = early_stop_fn(
            engine, mb_spec, a.temperature, a.early_stop_imp_ratio, a.early_stop_kl
        )
        stats = train_minibatches(
            engine, sample, a.ppo_n_minibatches, mb_spec, self.loss, n_loss_tokens, skip
        )
        return {**batch.stats, **stats}

    def save(self, model: Model, save_dir: str) -> None:
        save_hf_dir(model, save_dir)

    def state_dict(self) -> dict[str, Any]:
        return self.returns.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.returns.load_state_dict(state)


# ---- critic --------------------------------------------------------------------------------------


def token_values(module: torch.nn.Module, mb: SequenceSample, device: torch.device) -> torch.Tensor:
    """Critic value at every token of packed_input_ids: `values_T` float32."""
    return module(*packed(mb, device)).float()


def drop_last_token(values_T: torch.Tensor, cu_seqlens_B1: torch.Tensor) -> torch.Tensor:
    """The first L-1 values of each sequence ([T] -> [T1])."""
    keep = torch.ones(values_T.shape[0], dtype=torch.bool, device=values_T.device)
    keep[cu_seqlens_B1[1:].long() - 1] = False
    return values_T[keep]


@INTERFACES.register("ppo_critic")
class PPOCriticInterface(ModelInterface):
    """inference: `values` (L per sequence); train_step: clipped value regression onto the GAE
    returns (normalised with running statistics when value_norm)."""

    def __init__(self, **kwargs: Any):
        self.args = build_args(PPOArgs, kwargs, "ppo_critic")
        self.returns = PPOReturns(self.args)

    def inference(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample:
        values = map_micro_batches(model, data, mb_spec, token_values, "ppo_critic")
        return SequenceSample(
            ids=list(data.ids),
            seqlens={"values": [list(x) for x in data.seqlens[IDS]]},
            data={"values": values},
            metadata=dict(data.metadata),
        )

    def loss(self, module: torch.nn.Module, mb: SequenceSample) -> tuple[torch.Tensor, dict]:
        device = next(module.parameters()).device
        values_T1 = drop_last_token(token_values(module, mb, device), mb.cu_seqlens(IDS, device))
        d = {k: v.to(device) for k, v in mb.data.items()}
        loss, s = ppo_critic_loss(
            values_T1, d["old_values"], d["returns"], d["loss_mask"], self.args.value_eps_clip
        )
        return loss, {
            "value_clip_frac": float(s.clip_frac),
            "value_pred_mean": float(s.value_mean),
            "value_target_mean": float(s.returns_mean),
        }

    def train_step(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, float]:
        engine = train_engine_of(model, "ppo_critic")
        batch = self.returns.compute(data, getattr(engine, "dp_group", None))
        returns_T1 = batch.returns_T1
        if self.returns.value_rms is not None:
            returns_T1 = self.returns.value_rms.normalize(returns_T1)
        old_values_T1 = drop_last_token(data.data["values"].float(), data.cu_seqlens(IDS))
        sample = train_sample(
            data,
            {
                "old_values": old_values_T1,
                "returns": returns_T1.float(),
                "loss_mask": batch.mask_T1,
            },
        )
        stats = train_minibatches(
            engine, sample, self.args.ppo_n_minibatches, mb_spec, self.loss, n_loss_tokens
        )
        # Reward and KL statistics are the actor's to report; the critic adds its own.
        own = {k: batch.stats[k] for k in ("returns/mean", "values/mean", "values/explained_var")}
        return {**own, **stats}

    def save(self, model: Model, save_dir: str) -> None:
        save_hf_dir(model, save_dir)

    def state_dict(self) -> dict[str, Any]:
        return self.returns.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.returns.load_state_dict(state)
