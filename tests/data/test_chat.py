"""Conversations in the `messages` format and loss scales, checked against transformers' own
rendering (`apply_chat_template(tokenize=True)`) and answer mask (`return_assistant_tokens_mask`
over `{% generation %}` blocks), which realflow does not use."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from realflow.api.registry import LOSS_SCALES
from realflow.data.chat import DEFAULT_CHAT_TEMPLATE
from realflow.data.datasets import PairedDataset, PromptAnswerDataset, PromptDataset
from realflow.data.loss_scale import LossScale
from realflow.data.sources import DatasetError

# The default template with the answer (content + EOS) marked for transformers' mask.
MARKED_DEFAULT = (
    "{{ bos_token }}{% for message in messages %}{{ '<' + message['role'] + '>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>\n' }}{% endif %}"
)
# ChatML with real special tokens; the newline after <|im_end|> is not part of the answer.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The default template with each user message (header, text, newline) marked instead.
MARKED_USER = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{% generation %}"
    "{{ '<user>\n' + message['content'] + '\n' }}{% endgeneration %}"
    "{% else %}{{ '<' + message['role'] + '>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<assistant>\n' }}{% endif %}"
)

SYS = {"role": "system", "content": "be brief"}


def msg(role: str, content: str, **extra) -> dict:
    return {"role": role, "content": content, **extra}


CONVERSATIONS = [
    [msg("user", "rev 1 2 ="), msg("assistant", " 2 1")],
    [
        SYS,
        msg("user", "sort 3 1 ="),
        msg("assistant", " 1 3"),
        msg("user", "again"),
        msg("assistant", "ok then"),
    ],  # fmt: skip
    [
        msg("user", "a"),
        msg("assistant", "b c"),
        msg("user", "d"),
        msg("assistant", ""),
        msg("user", "e"),
        msg("assistant", " f "),
    ],  # fmt: skip
]


@pytest.fixture(scope="module")
def chatml_tok(tok):
    t = copy.deepcopy(tok)
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = CHATML
    return t


def hf(tok, messages, template, **kw):
    """(input_ids, assistant mask) as transformers renders and masks them."""
    out = tok.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True, **kw,
    )  # fmt: skip
    return out["input_ids"], out["assistant_masks"]


def runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of every run of ones."""
    out, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def only_runs(mask: list[int], keep: list[int]) -> list[int]:
    out = [0] * len(mask)
    for j, (a, b) in enumerate(runs(mask)):
        if j in keep:
            out[a:b] = [1] * (b - a)
    return out


def sample(ds, i=0):
    s = ds[i]
    return s.data["packed_input_ids"].tolist(), (~s.data["prompt_mask"]).int().tolist(), s


def test_builtin_tokenizer_ships_the_default_template(tok):
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    for conv in CONVERSATIONS:
        text = tok.apply_chat_template(conv, tokenize=False)
        assert text == tok.apply_chat_template(conv, chat_template=MARKED_DEFAULT, tokenize=False)


@pytest.mark.parametrize("which", ["default", "chatml"])
def test_messages_rows_match_transformers_ids_and_assistant_mask(tok, chatml_tok, write_jsonl,
                                                                 which):  # fmt: skip
    t, template = (tok, MARKED_DEFAULT) if which == "default" else (chatml_tok, CHATML)
    ds = PromptAnswerDataset(
        write_jsonl([{"messages": c, "id": k} for k, c in enumerate(CONVERSATIONS)]), t,
        chat_template=template,
    )  # fmt: skip
    for i, conv in enumerate(CONVERSATIONS):
        ids, answer_mask, s = sample(ds, i)
        ref_ids, ref_mask = hf(t, conv, template)
        assert ids == ref_ids
        assert answer_mask == ref_mask
        assert len(runs(ref_mask)) == sum(m["role"] == "assistant" for m in conv)
        assert s.metadata["answer"] == [conv[-1]["content"]] and s.metadata["id"] == [i]
        prompt = hf(t, conv[:-1], template, add_generation_prompt=True)[0]
        assert ids[: len(prompt)] == prompt  # metadata prompt = the text before the last answer
        assert t(s.metadata["prompt"][0], add_special_tokens=False)["input_ids"] == prompt


def test_prompt_completion_rows_train_the_completion_only(tok, write_jsonl):
    conv = CONVERSATIONS[1]
    row = {"prompt": conv[:3], "completion": conv[3:]}  # the first answer is context
    ids, mask, _ = sample(PromptAnswerDataset(write_jsonl([row]), tok))
    ref_ids, ref_mask = hf(tok, conv, MARKED_DEFAULT)
    assert ids == ref_ids and mask == only_runs(ref_mask, [1])


def test_last_turn_rule_masks_earlier_answers(tok, write_jsonl):
    path = write_jsonl([{"messages": c} for c in CONVERSATIONS])
    ds = PromptAnswerDataset(path, tok, loss_scale="last_turn")
    for i, conv in enumerate(CONVERSATIONS):
        ids, mask, s = sample(ds, i)
        ref_ids, ref_mask = hf(tok, conv, MARKED_DEFAULT)
        last = len(runs(ref_mask)) - 1
        assert ids == ref_ids and mask == only_runs(ref_mask, [last])
        assert s.data["loss_scale"].tolist() == [float(m) for m in mask]


def test_role_weights_and_all(tok, write_jsonl):
    conv = CONVERSATIONS[1]
    path = write_jsonl([{"messages": conv}])
    s = PromptAnswerDataset(path, tok, loss_scale="role_weights",
                            loss_scale_args={"user": 0.25, "assistant": 2.0})[0]  # fmt: skip
    _, answers = hf(tok, conv, MARKED_DEFAULT)
    _, users = hf(tok, conv, MARKED_USER)
    want = [2.0 * a + 0.25 * u for a, u in zip(answers, users)]
    assert s.data["loss_scale"].tolist() == want
    assert s.data["prompt_mask"].tolist() == [w == 0 for w in want]
    every = PromptAnswerDataset(path, tok, loss_scale="all")[0]
    assert every.data["loss_scale"].tolist() == [1.0] * len(want)


def test_field_rule_reads_message_and_row_weights(tok, write_jsonl):
    conv = copy.deepcopy(CONVERSATIONS[1])
    conv[2]["loss_scale"], conv[1]["loss_scale"] = 0.5, 0.1  # first answer, a user message
    rows = [
        {"messages": conv},
        {"prompt": "rev 1 2 =", "answer": " 2 1", "loss_scale": 3.0},
        {"prompt": "rev 1 2 =", "answer": " 2 1", "loss_scale": [0.0, 1.5, 2.0]},
    ]
    ds = PromptAnswerDataset(write_jsonl(rows), tok, loss_scale="field")
    _, answers = hf(tok, conv, MARKED_DEFAULT)
    _, users = hf(tok, conv, MARKED_USER)
    first, first_user = only_runs(answers, [0]), only_runs(users, [0])
    want = [0.5 * f + (a - f) + 0.1 * u for f, a, u in zip(first, answers, first_user)]
    assert torch.equal(ds[0].data["loss_scale"], torch.tensor(want))  # both float32
    n_prompt = 1 + len(tok("rev 1 2 =", add_special_tokens=False)["input_ids"])
    assert ds[1].data["loss_scale"].tolist() == [0.0] * n_prompt + [3.0, 3.0, 3.0]  # " 2"," 1",EOS
    assert ds[2].data["loss_scale"].tolist() == [0.0] * n_prompt + [0.0, 1.5, 2.0]
    assert ds[2].data["prompt_mask"].tolist() == [True] * (n_prompt + 1) + [False, False]


def test_weights_from_the_data_need_the_field_rule(tok, write_jsonl):
    conv = [msg("user", "a"), msg("assistant", "b", loss_scale=2.0)]
    for rule in (None, "last_turn"):
        with pytest.raises(DatasetError, match="does not read.*'field' rule"):
            PromptAnswerDataset(write_jsonl([{"messages": conv}]), tok, loss_scale=rule)
    row = {"prompt": "a", "answer": " b", "loss_scale": [1.0]}  # " b" and EOS: 2 weights
    with pytest.raises(DatasetError, match="field 'loss_scale': has 1 weights.*2 tokens"):
        PromptAnswerDataset(write_jsonl([row]), tok, loss_scale="field")
    row = {"messages": [msg("user", "a"), msg("assistant", "b", loss_scale=-1)]}
    with pytest.raises(DatasetError, match="number >= 0"):
        PromptAnswerDataset(write_jsonl([row]), tok, loss_scale="field")


def test_a_rule_of_your_own_splits_spans(tok, write_jsonl):
    @LOSS_SCALES.register("test_digits_x3")
    class DigitsTimesThree(LossScale):
        def __call__(self, span):
            if not span.answer:
                return 0.0
            return [
                (p, 3.0 if p.strip().isdigit() else 1.0) for p in re.split(r"(\d)", span.text) if p
            ]

    try:
        conv = [msg("user", "q"), msg("assistant", "x 7 y")]
        s = PromptAnswerDataset(
            write_jsonl([{"messages": conv}]), tok, loss_scale="test_digits_x3"
        )[0]
    finally:
        LOSS_SCALES.unregister("test_digits_x3")
    ids, scale = s.data["packed_input_ids"].tolist(), s.data["loss_scale"].tolist()
    _, answers = hf(tok, conv, MARKED_DEFAULT)
    got = {tok.decode([i]): w for i, w, a in zip(ids, scale, answers) if a}
    # the pieces are "x ", "7", " y</s>": the token " 7" straddles two and takes the larger
    assert got == {"x": 1.0, " 7": 3.0, " y": 1.0, "</s>": 1.0}
    assert all(w == 0 for w, a in zip(scale, answers) if not a)


def test_prompt_rows_from_conversations(tok, write_jsonl):
    conv = CONVERSATIONS[1]
    rows = [{"messages": conv, "task": "sort"}, {"prompt": conv[:2]}, {"prompt": "rev 1 ="}]
    ds = PromptDataset(write_jsonl(rows), tok)
    want = hf(tok, conv[:-1], MARKED_DEFAULT, add_generation_prompt=True)[0]
    assert ds[0].data["packed_prompts"].tolist() == want
    assert ds[0].metadata["answer"] == ["ok then"] and ds[0].metadata["task"] == ["sort"]
    assert tok.decode(want) == ds[0].metadata["prompt"][0]
    want = hf(tok, conv[:2], MARKED_DEFAULT, add_generation_prompt=True)[0]
    assert ds[1].data["packed_prompts"].tolist() == want and "answer" not in ds[1].metadata
    assert ds[2].data["packed_prompts"].tolist()[0] == tok.bos_token_id  # text rows as before
    cut = PromptDataset(write_jsonl(rows[:1]), tok, max_length=8, truncate=True)[0]
    ids = cut.data["packed_prompts"].tolist()
    want = hf(tok, conv[:-1], MARKED_DEFAULT, add_generation_prompt=True)[0]
    assert ids == [tok.bos_token_id] + want[-7:]  # BOS kept, then the end of the prompt


def test_paired_conversations_implicit_and_explicit_prompt(tok, write_jsonl):
    prompt = [SYS, msg("user", "rev 1 2 ="), msg("assistant", " 2 1"), msg("user", "again")]
    good, bad = [msg("assistant", " 2 1")], [msg("assistant", " 1 2")]
    rows = [
        {"chosen": prompt + good, "rejected": prompt + bad},
        {"prompt": prompt, "chosen": good, "rejected": bad, "id": 7},
    ]
    ds = PairedDataset(write_jsonl(rows), tok)
    a, b = ds[0], ds[1]
    assert torch.equal(a.data["packed_input_ids"], b.data["packed_input_ids"])
    assert torch.equal(a.data["prompt_mask"], b.data["prompt_mask"])
    assert a.metadata["n_pairs"] == [1] and b.metadata["id"] == [7]
    lens = a.seqlens["packed_input_ids"][0]
    seqs = a.data["packed_input_ids"].split(lens)
    masks = (~a.data["prompt_mask"]).int().split(lens)
    for conv, ids, mask in zip([prompt + good, prompt + bad], seqs, masks):
        ref_ids, ref_mask = hf(tok, conv, MARKED_DEFAULT)
        assert ids.tolist() == ref_ids
        assert mask.tolist() == only_runs(ref_mask, [1])  # the prompt's answer is context


@pytest.mark.parametrize(
    "row,cls,message",
    [
        ({"messages": [msg("user", "a")]}, PromptAnswerDataset, "no assistant message"),
        ({"messages": [{"role": "user"}]}, PromptAnswerDataset, "'content' must be a string"),
        ({"messages": []}, PromptAnswerDataset, "non-empty list of messages"),
        ({"messages": [msg("user", "a")], "prompt": "x"}, PromptAnswerDataset, "not both"),
        ({"prompt": [msg("user", "a")]}, PromptAnswerDataset, "field 'completion'"),
        ({"chosen": [msg("user", "a")], "rejected": [msg("user", "a")]}, PairedDataset, "the same"),
        ({"messages": [msg("assistant", "a")]}, PromptDataset, "only an assistant message"),
    ],
)
def test_bad_conversations(tok, write_jsonl, row, cls, message):
    with pytest.raises(DatasetError, match=message):
        cls(write_jsonl([row]), tok)


def test_templates_realflow_cannot_use(tok, write_jsonl, tmp_path):
    row = {"messages": [msg("user", "a"), msg("assistant", "b"), msg("user", "c"),
                        msg("assistant", "d")]}  # fmt: skip
    # Drops every answer but the last, as reasoning templates drop past thoughts.
    rewriting = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    )
    with pytest.raises(DatasetError, match="not prefix-consistent"):
        PromptAnswerDataset(write_jsonl([row]), tok, chat_template=rewriting)
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(DatasetError, match="tokenizer has none.*chat_template"):
        PromptAnswerDataset(write_jsonl([row]), bare)
    file = tmp_path / "t.jinja"
    file.write_text(CHATML)
    ds = PromptAnswerDataset(write_jsonl([row]), bare, chat_template=str(file))
    assert tok.decode(ds[0].data["packed_input_ids"].tolist()).startswith("<|im_start|>user")
    with pytest.raises(DatasetError, match="neither a jinja template nor a file"):
        PromptAnswerDataset(write_jsonl([row]), bare, chat_template=str(tmp_path / "nope"))
