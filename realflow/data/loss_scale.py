"""Loss scales: the weight of every token in the loss (ms-swift's `loss_scale`).

A dataset cuts each sample into spans (realflow.data.chat.Span: a prompt, an answer, the
messages of a conversation, its generation prompts) and asks a rule, by name from
`realflow.api.registry.LOSS_SCALES`, for the weight of each:

    rule(span) -> float | list[tuple[str, float]]

A float weighs every token of the span; a list splits `span.text` into pieces (they must
concatenate to it) with a weight each, e.g. `[("The answer is ", 0.0), ("42", 2.0)]`. A token
takes the largest weight among the characters it covers (a token never straddles a span boundary
in the built-in templates). Token ids added around a text (BOS, EOS of prompt/answer rows) take
the weight of the text's first or last character. Weights are finite and >= 0; tokens of weight
0 are prompt (`prompt_mask`), the others are trained with their weight.

Rules are classes built with keyword arguments (`sft.loss_scale_args.*`):

| name | weight |
| --- | --- |
| `answer` (default) | 1 on every answer (assistant message), 0 elsewhere |
| `last_turn` | 1 on the last answer of each sequence only |
| `all` | 1 on every token (prompt included) |
| `role_weights` | per role: `role_weights(user=0.1)` trains user messages at 0.1 and answers at 1; `assistant=` sets the answers' weight; generation prompts and roles not named keep 0 |
| `field` | the data's own: a message's `loss_scale` number, a prompt/answer row's `loss_scale` (a number for the answer, or one weight per answer token and EOS); elsewhere as `answer` |

A rule of your own:

    from realflow.api.registry import LOSS_SCALES
    from realflow.data.loss_scale import LossScale

    @LOSS_SCALES.register("numbers_x2")
    class NumbersTwice(LossScale):
        def __call__(self, span):
            if not span.answer:
                return 0.0
            return [(piece, 2.0 if piece.strip().isdigit() else 1.0)
                    for piece in re.split(r"(\\d+)", span.text) if piece]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

from realflow.api.registry import LOSS_SCALES
from realflow.data.chat import ANSWER_ROLE, Span
from realflow.data.sources import RowError

Pieces = list[tuple[int, float]]  # (number of characters, weight), in text order


class LossScale:
    """The `answer` rule, and the base of every rule: 1 on answers, 0 elsewhere.

    Subclasses override `__call__`; `__init__` takes the rule's keyword arguments (the base takes
    none). `reads_fields` says whether the rule uses the data's own `loss_scale` fields: a row
    that has them under a rule that does not is an error, never silently ignored.
    """

    reads_fields: ClassVar[bool] = False

    def __init__(self, **args: Any):
        if args:
            raise ValueError(
                f"loss scale rule {type(self).__name__} takes no arguments, got {sorted(args)}"
            )

    def __call__(self, span: Span) -> float | list[tuple[str, float]]:
        return 1.0 if span.answer else 0.0


LOSS_SCALES.register("answer", LossScale)


@LOSS_SCALES.register("last_turn")
class LastTurnLossScale(LossScale):
    """1 on the last answer of each sequence only (earlier assistant turns are context)."""

    def __call__(self, span: Span) -> float:
        return 1.0 if span.answer and span.is_last else 0.0


@LOSS_SCALES.register("all")
class AllTokensLossScale(LossScale):
    """1 on every token: prompts, templates and answers (language-model pretraining style)."""

    def __call__(self, span: Span) -> float:
        return 1.0


@LOSS_SCALES.register("role_weights")
class RoleWeightsLossScale(LossScale):
    """A weight per role: `assistant` (default 1) weighs answers; any other role named weighs
    its messages' tokens; roles not named and generation prompts weigh 0."""

    def __init__(self, **weights: Any):
        self.weights = {}
        for role, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < math.inf:
                raise ValueError(
                    f"role_weights: weight of '{role}' must be a number >= 0, got {w!r}"
                )
            self.weights[role] = float(w)

    def __call__(self, span: Span) -> float:
        if span.answer:
            return self.weights.get(ANSWER_ROLE, 1.0)
        if span.role == ANSWER_ROLE:  # a generation prompt, a trailer, or an untrained answer
            return 0.0
        return self.weights.get(span.role, 0.0)


@LOSS_SCALES.register("field")
class FieldLossScale(LossScale):
    """The data's own weights (see the module doc); spans without one weigh as `answer`."""

    reads_fields = True

    def __call__(self, span: Span) -> float:
        if span.scale is not None:
            return span.scale
        return 1.0 if span.answer else 0.0


def build_rule(name: str, args: dict[str, Any] | None = None) -> LossScale:
    """The rule registered as `name`, built with `args`; ValueError for bad arguments."""
    cls = LOSS_SCALES.get(name)
    try:
        return cls(**dict(args or {}))
    except TypeError as e:
        raise ValueError(f"loss scale rule '{name}': bad arguments {dict(args or {})}: {e}") from e


def span_pieces(rule: Any, span: Span) -> Pieces:
    """The rule's weights of one span as (length, weight) pieces; RowError for a bad answer."""
    out = rule(span)
    if not isinstance(out, list):
        return [(len(span.text), _weight(out, span))]
    if "".join(text for text, _ in out) != span.text:
        raise RowError(
            f"loss scale rule {type(rule).__name__} split {span.text!r:.60} into pieces that do "
            "not concatenate to it"
        )
    return [(len(text), _weight(w, span)) for text, w in out]


def _weight(w: Any, span: Span) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < math.inf:
        raise RowError(
            f"loss scale weight {w!r} for {span.text!r:.40} ({span.role}); weights are numbers >= 0"
        )
    return float(w)


def unit_weights(
    pieces: Pieces, offsets: Sequence[tuple[int, int]], n_before: int, n_after: int
) -> list[float]:
    """Weights of the tokens of one text: `n_before` added ids, the text's tokens (character
    `offsets` into the text, which `pieces` cover), `n_after` added ids."""
    chars: list[float] = []
    for n, w in pieces:
        chars.extend([w] * n)
    first = pieces[0][1] if pieces else 0.0
    last = pieces[-1][1] if pieces else 0.0
    out = [first] * n_before
    for start, end in offsets:
        if end > start:
            out.append(max(chars[start:end]))
        else:  # a zero-width token: the weight where it sits
            out.append(chars[min(start, len(chars) - 1)] if chars else first)
    return out + [last] * n_after
