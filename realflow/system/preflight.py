"""Checks of the roles' models and tokenizers, run before any worker starts.

Roles pass token ids to each other (the actor's rollout is read by ref, critic and the reward
model; a DPO batch tokenized once is read by actor and ref), so they must agree on what an id
means, and every model must have an embedding row for every id its tokenizer can produce.
`check_roles(cfg)` reads only tokenizers and config.json files and raises `RoleCheckError`
listing every problem:

- a role with weights and no path (an empty rew.path with a scorer that reads a reward model);
- a path that is not a local HF checkpoint directory, or a tokenizer that does not load;
- a model whose config vocab_size is smaller than its tokenizer (or than the tokenizer of the
  role it reads from): ids past the embedding would crash the first forward pass;
- a tokenizer that differs from the actor's: other ids for the same tokens, another BOS put
  before prompts, another EOS id (`<role>.check_tokenizer=false` skips this one).

A dedicated pad token is left out of the comparison: realflow packs sequences, so pad ids never
reach a model, and exported reward models carry their own (see `realflow.models.hf_io`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from realflow.experiments.common import (
    SAME_AS_ACTOR,
    ExperimentConfig,
    ModelRole,
    tokenizer_source,
)
from realflow.system.models import BUILTIN_RANDOM

logger = logging.getLogger(__name__)


class RoleCheckError(ValueError):
    """Roles whose models or tokenizers cannot work together; `problems` lists each one."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"the roles' models and tokenizers do not fit together:\n{lines}")


@dataclasses.dataclass
class RoleView:
    """What one role reads: its tokenizer (and where from) and its model's vocab_size."""

    tokenizer_source: str
    tokenizer: Any
    model_vocab: int | None  # None: a weightless role


def check_roles(cfg: ExperimentConfig) -> None:
    """Raise RoleCheckError when the roles of `cfg` cannot share token ids (see module doc).
    Works on a config as the user wrote it (role defaults, unresolved built-in models) or as the
    runner resolved it."""
    cfg = cfg.with_role_defaults()
    roles = cfg.roles()
    trained = {m.model_name for m in cfg.mfcs() if m.is_train}
    empty = [n for n, r in roles.items() if r.head != "none" and r.config.path == SAME_AS_ACTOR]
    if "actor" in empty:  # the roles that follow it say nothing more
        empty = [n for n in empty if n == "actor" or roles[n].head == "reward"]
    problems = [_empty_path(n, roles[n], n in trained) for n in empty]
    seen: dict[str, Any] = {}  # path or tokenizer source -> what it gave (None: reported)
    views = {
        name: _view(name, role, seen, problems)
        for name, role in roles.items()
        if role.head == "none" or role.config.path != SAME_AS_ACTOR
    }
    ref = "actor" if "actor" in roles else next(iter(roles), None)
    pairs_seen = set()
    for name, view in views.items():
        if view is None:
            continue
        if (roles[name].config.path, view.tokenizer_source) not in pairs_seen:
            pairs_seen.add((roles[name].config.path, view.tokenizer_source))
            problems.extend(_vocab_problems(name, roles[name], view))
        ref_view = views.get(ref) if ref is not None else None
        if name != ref and ref_view is not None:
            problems.extend(_pair_problems(name, roles[name], view, ref, ref_view))
    if problems:
        raise RoleCheckError(problems)


# ---- one role -----------------------------------------------------------------------------


def _view(name: str, role: ModelRole, seen: dict[str, Any], problems: list[str]) -> RoleView | None:
    """The role's tokenizer and vocab size; None when they cannot be read (the problem is in
    `problems`, once per path or tokenizer however many roles share it)."""
    from realflow.data.tokenizer import TokenizerError, load_tokenizer

    path = role.config.path
    source = tokenizer_source(role.config)
    key = f"tokenizer:{source}"
    vocab: int | None = None
    if role.head != "none":
        if path not in seen:
            try:
                seen[path] = model_vocab_size(path)
            except ValueError as e:
                seen[path] = None
                problems.append(f"{name}.path: {e}")
                if source == path:  # the same problem; say it once
                    seen[key] = None
        vocab = seen[path]
    if not source:  # a weightless role following an empty actor.path: reported for the actor
        return None
    if key not in seen:
        try:
            seen[key] = load_tokenizer(source)
        except TokenizerError as e:
            seen[key] = None
            hint = "" if role.config.tokenizer_path else f" (or set {name}.tokenizer_path)"
            problems.append(f"{name}: {e}{hint}")
    if seen[key] is None or (role.head != "none" and vocab is None):
        return None
    return RoleView(source, seen[key], vocab)


def _empty_path(name: str, role: ModelRole, trained: bool) -> str:
    if name == "actor" or trained:
        return (
            f"{name}.path is empty: name the model {name} starts from (an HF directory, "
            "builtin:tiny or builtin:<task>-sft)"
        )
    if role.head == "reward":
        return (
            f"{name}.path is empty, but a reward scorer (such as 'model') reads the weights of "
            f"role '{name}': set {name}.path to a trained reward model directory (the rw "
            "experiment writes one to <output_dir>/checkpoints/step_<N>/rew); a reward model is "
            "trained separately, so it has no default"
        )
    return (
        f"{name}.path is empty (same as actor.path), but this experiment has no actor role "
        f"(or an empty actor.path): set {name}.path"
    )


def model_vocab_size(path: str) -> int:
    """vocab_size of the model at `path` (an HF directory or a built-in model), from its config
    only; ValueError saying what is wrong with the path."""
    from realflow.data.tokenizer import load_tokenizer

    if path.startswith("builtin:"):
        _check_builtin_name(path)
        return len(load_tokenizer("builtin"))  # built-in models are built for this tokenizer
    if not os.path.isdir(path):
        raise ValueError(
            f"'{path}' is not a local directory; give an HF checkpoint directory (realflow never "
            "downloads from the hub), 'builtin:tiny' or 'builtin:<task>-sft'"
        )
    from realflow.models.hf_io import config_from_hf_dir

    return config_from_hf_dir(path).vocab_size


def _check_builtin_name(path: str) -> None:
    from realflow.data.tasks import TASKS

    task = path[len("builtin:") : -len("-sft")] if path.endswith("-sft") else None
    if path != BUILTIN_RANDOM and task not in (*TASKS, "mix"):
        tasks = ", ".join(sorted([*TASKS, "mix"]))
        raise ValueError(
            f"unknown built-in model '{path}'; built-in models are {BUILTIN_RANDOM} and "
            f"builtin:<task>-sft for a task in {tasks}"
        )


def tokenizer_size(tokenizer: Any) -> int:
    """1 + the largest id the tokenizer can produce (added tokens included)."""
    return max(tokenizer.get_vocab().values()) + 1


def _vocab_problems(name: str, role: ModelRole, view: RoleView) -> list[str]:
    n = tokenizer_size(view.tokenizer)
    if view.model_vocab is None or view.model_vocab >= n:
        return []
    return [
        f"{name}: the model's vocab_size ({view.model_vocab}, {role.config.path}) is smaller "
        f"than its tokenizer ({n} ids, {view.tokenizer_source}): ids >= {view.model_vocab} "
        "would index past the embedding. Use the tokenizer the model was trained with "
        f"({name}.tokenizer_path), or resize the model's embeddings to at least {n} rows"
    ]


# ---- two roles ----------------------------------------------------------------------------


def _pair_problems(
    name: str, role: ModelRole, view: RoleView, ref: str, ref_view: RoleView
) -> list[str]:
    """Problems of role `name` reading the token ids of role `ref`."""
    differences = tokenizer_differences(view.tokenizer, ref_view.tokenizer, ref)
    if not differences:
        return []  # the role's own vocab check covers the ids it reads
    if role.config.check_tokenizer:
        return [
            f"{name}: its tokenizer ({view.tokenizer_source}) differs from {ref}'s "
            f"({ref_view.tokenizer_source}): {'; '.join(differences)}. {name} reads the token "
            f"ids {ref} writes, so they would mean other tokens. Give {name} a model trained "
            f"with {ref}'s tokenizer (ref and critic default to actor.path; train a reward model "
            f"from the actor's checkpoint with the rw experiment), or set "
            f"{name}.check_tokenizer=false if the ids do mean the same tokens"
        ]
    logger.warning(
        "%s's tokenizer (%s) differs from %s's (%s): %s; running anyway (%s.check_tokenizer=false)",
        name, view.tokenizer_source, ref, ref_view.tokenizer_source, "; ".join(differences), name,
    )  # fmt: skip
    n_ref = tokenizer_size(ref_view.tokenizer)
    if view.model_vocab is not None and view.model_vocab < n_ref:
        return [
            f"{name}: the model's vocab_size ({view.model_vocab}, {role.config.path}) is smaller "
            f"than {ref}'s tokenizer ({n_ref} ids, {ref_view.tokenizer_source}), whose ids it "
            f"reads ({name}.check_tokenizer=false): they would index past the embedding"
        ]
    return []


def tokenizer_differences(tok: Any, ref_tok: Any, ref: str = "the reference") -> list[str]:
    """How `tok` differs from `ref_tok` in what realflow relies on: the id of every token
    (a dedicated pad token aside), the ids put before a prompt (BOS), and the EOS id. Empty when
    they agree."""
    from realflow.data.tokenizer import bos_ids

    out = []
    vocab, ref_vocab = _ids_that_matter(tok), _ids_that_matter(ref_tok)
    if vocab != ref_vocab:
        # Tokens in both with other ids first, then tokens in one only; each by id.
        diff = sorted(
            (t for t in vocab.keys() | ref_vocab.keys() if vocab.get(t) != ref_vocab.get(t)),
            key=lambda t: (t not in vocab or t not in ref_vocab, ref_vocab.get(t, vocab.get(t)), t),
        )
        shown = ", ".join(
            f"{t!r} is {vocab.get(t, 'absent')} vs {ref_vocab.get(t, 'absent')}" for t in diff[:3]
        )
        out.append(
            f"{tokenizer_size(tok)} vs {tokenizer_size(ref_tok)} ids, {len(diff)} tokens with "
            f"another id or in one tokenizer only (e.g. {shown})"
        )
    if bos_ids(tok) != bos_ids(ref_tok):
        out.append(f"ids put before a prompt {bos_ids(tok)} vs {bos_ids(ref_tok)}")
    if tok.eos_token_id != ref_tok.eos_token_id:
        out.append(f"EOS id {tok.eos_token_id} vs {ref_tok.eos_token_id}")
    return out


def _ids_that_matter(tok: Any) -> dict[str, int]:
    """token -> id, without a pad token that is not also BOS, EOS or UNK (pad never reaches a
    model: realflow packs sequences)."""
    vocab = dict(tok.get_vocab())
    others = {tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}
    if tok.pad_token is not None and tok.pad_token_id not in others:
        vocab.pop(tok.pad_token, None)
    return vocab
