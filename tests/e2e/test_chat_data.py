"""Conversations (`messages` JSONL rendered with the chat template) end to end: SFT learns the
answers, DPO learns the pairs, GRPO scores answers to rendered prompts with the task verifier."""

from __future__ import annotations

import json

import pytest
from e2e_utils import assert_finite_rows, tiny_config

from realflow.system.runner import run

pytestmark = pytest.mark.timeout(600)


def conversation(prompt: str, answer: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "reverse"},
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": answer},
    ]


def write_rows(path, n: int, kind: str) -> str:
    from realflow.data.sources import builtin_rows

    with open(path, "w") as f:
        for _, r in builtin_rows("builtin:reverse", paired=True, n_rows=n):
            if kind == "sft":
                row = {"messages": conversation(r["prompt"], r["answer"])}
            elif kind == "pairs":
                row = {"chosen": conversation(r["prompt"], r["chosen"]),
                       "rejected": conversation(r["prompt"], r["rejected"])}  # fmt: skip
            else:  # prompts: the answer message becomes the verifier's reference
                row = {"messages": conversation(r["prompt"], r["answer"]), "task": r["task"]}
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_sft_on_conversations_learns_the_answers(tmp_path):
    data = write_rows(tmp_path / "chat.jsonl", 64, "sft")
    cfg = tiny_config("sft", tmp_path / "run", "total_steps=6", "n_seqs=8",
                      "actor.path=builtin:tiny", f"dataset.path={data}")  # fmt: skip
    losses = [r["loss"] for r in run("sft", cfg).rows]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3, losses


def test_dpo_on_conversation_pairs_learns_them(tmp_path, reverse_sft):
    data = write_rows(tmp_path / "pairs.jsonl", 8, "pairs")
    cfg = tiny_config("dpo", tmp_path / "run", "total_steps=5", "n_seqs=8",
                      f"dataset.path={data}", "dataset.max_length=128")  # fmt: skip
    rows = run("dpo", cfg).rows
    acc, loss = [r["reward_acc"] for r in rows], [r["loss"] for r in rows]
    assert acc[0] == 0.0 and loss[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == ref
    assert min(acc[1:]) >= 0.75, acc
    assert loss[-1] < loss[0], loss


def test_grpo_on_conversation_prompts(tmp_path, reverse_sft):
    data = write_rows(tmp_path / "prompts.jsonl", 16, "prompts")
    cfg = tiny_config("grpo", tmp_path / "run", "total_steps=2", "n_seqs=4",
                      f"dataset.path={data}", "dataset.max_length=128")  # fmt: skip
    rows = run("grpo", cfg).rows
    assert_finite_rows(rows)
    assert len(rows) == 2 and all(0.0 <= r["reward/mean"] <= 1.0 for r in rows)


TWO_TURNS = [
    [
        {"role": "user", "content": f"rev {a} {b} ="},
        {"role": "assistant", "content": f" {b} {a}"},
        {"role": "user", "content": "again with 9"},
        {"role": "assistant", "content": f" 9 {b} {a}"},
    ]
    for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))
]
ECHO_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_loss_scale_rule_and_dataset_args_reach_the_run(tmp_path):
    """sft.loss_scale=last_turn with dataset.args.chat_template (a file): the worker builds the
    dataset with them, so the step trains exactly the last assistant turn of each row: its
    content tokens plus the two EOS the template writes after it (counted here by tokenizing
    the content on its own)."""
    from realflow.data.tokenizer import load_tokenizer

    data = tmp_path / "two_turns.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in TWO_TURNS))
    template = tmp_path / "echo.jinja"
    template.write_text(ECHO_TEMPLATE)
    cfg = tiny_config("sft", tmp_path / "run", "total_steps=1", "n_seqs=4",
                      "actor.path=builtin:tiny", f"dataset.path={data}",
                      "sft.loss_scale=last_turn", f"dataset.args.chat_template={template}")  # fmt: skip
    (row,) = run("sft", cfg).rows
    tok = load_tokenizer("builtin")
    last = [m[-1]["content"] for m in TWO_TURNS]
    expected = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 2 for t in last)
    assert row["n_tokens"] == expected
