"""Config keys that name a loss (`<exp>.loss`) and a loss scale (`<exp>.loss_scale`,
`<exp>.loss_scale_args`), shared by the sft, dpo and rw experiments.

The loss is handed to the training interface; the loss-scale rule to the dataset, which weighs
every token with it (realflow.data.loss_scale). With the default rule `answer` the weights are 0
or 1 and `prompt_mask` carries them; any other rule adds the dataset key `loss_scale`.
"""

from __future__ import annotations

from typing import Any

from realflow.api.config import field_
from realflow.api.registry import LOSS_SCALES, Registry

DEFAULT_LOSS_SCALE = "answer"
ANSWER_KEYS = ("packed_input_ids", "prompt_mask")


def loss_scale_field() -> Any:
    return field_(
        DEFAULT_LOSS_SCALE,
        "Weight of every token in the loss, a rule in LOSS_SCALES: 'answer' (every assistant "
        "answer), 'last_turn' (the last answer only), 'all' (prompt too), 'role_weights' (a "
        "weight per role, in loss_scale_args), 'field' (the data's own loss_scale fields), or "
        "your own (plugins=[...]); see realflow.data.loss_scale.",
    )


def loss_scale_args_field() -> Any:
    return field_({}, "Arguments of the loss_scale rule, e.g. loss_scale_args.user=0.1.")


def loss_problems(registry: Registry[Any], name: str) -> list[str]:
    """`loss: <miss message>` when `name` is not in `registry`."""
    return [] if name in registry else [f"loss: {registry.miss_message(name)}"]


def loss_scale_problems(name: str, args: dict[str, Any]) -> list[str]:
    """Problems with a loss-scale rule and its arguments (the rule is built to check them)."""
    if name not in LOSS_SCALES:
        return [f"loss_scale: {LOSS_SCALES.miss_message(name)}"]
    from realflow.data.loss_scale import build_rule

    try:
        build_rule(name, args)
    except ValueError as e:
        return [f"loss_scale_args: {e}"]
    return []


def answer_keys(loss_scale: str) -> tuple[str, ...]:
    """The dataset keys of prompt/answer samples under a loss-scale rule."""
    return ANSWER_KEYS if loss_scale == DEFAULT_LOSS_SCALE else (*ANSWER_KEYS, "loss_scale")


def loss_scale_kwargs(loss_scale: str, args: dict[str, Any]) -> dict[str, Any]:
    """Dataset keyword arguments for a loss-scale rule (none for the default)."""
    if loss_scale == DEFAULT_LOSS_SCALE:  # arguments for it are a problem validate() reports
        return {}
    return {"loss_scale": loss_scale, "loss_scale_args": dict(args)}
