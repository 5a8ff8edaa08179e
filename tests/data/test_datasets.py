from __future__ import annotations

import pytest
import torch

from realflow.api.data import SequenceSample
from realflow.api.registry import DATASETS
from realflow.data.datasets import PairedDataset, PromptAnswerDataset, PromptDataset
from realflow.data.sources import DatasetError
from realflow.data.tasks import score


def _split(t: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    return list(torch.split(t, lengths))


def test_registered():
    assert DATASETS.get("prompt") is PromptDataset
    assert DATASETS.get("prompt_answer") is PromptAnswerDataset
    assert DATASETS.get("paired") is PairedDataset


def test_prompt_dataset(tok, write_jsonl):
    rows = [{"prompt": "rev 1 2 3 =", "answer": " 3 2 1", "task": "reverse"}, {"prompt": "hi"}]
    ds = PromptDataset(write_jsonl(rows), tok)
    assert len(ds) == 2
    s = ds[0]
    assert isinstance(s, SequenceSample) and s.ids == [0] and s.keys == {"packed_prompts"}
    ids = s.data["packed_prompts"]
    assert ids.dtype == torch.long and s.seqlens["packed_prompts"] == [[len(ids)]]
    assert ids[0].item() == tok.bos_token_id
    assert tok.decode(ids[1:].tolist()) == "rev 1 2 3 ="
    assert s.metadata == {
        "prompt": [rows[0]["prompt"]],
        "answer": [" 3 2 1"],
        "task": ["reverse"],
        "row": [0],
    }
    assert score({k: v[0] for k, v in s.metadata.items()}, " 3 2 1") == 1.0
    assert ds[1].metadata == {"prompt": ["hi"], "row": [1]}
    with pytest.raises(IndexError):
        ds[2]


def test_prompt_answer_dataset(tok, write_jsonl):
    rows = [{"prompt": "sort 3 1 2 =", "answer": " 1 2 3", "id": "a"}]
    s = PromptAnswerDataset(write_jsonl(rows), tok)[0]
    assert s.keys == {"packed_input_ids", "prompt_mask"}
    ids, mask = s.data["packed_input_ids"], s.data["prompt_mask"]
    assert mask.dtype == torch.bool and s.seqlens["prompt_mask"] == s.seqlens["packed_input_ids"]
    assert ids[0].item() == tok.bos_token_id and ids[-1].item() == tok.eos_token_id
    assert tok.decode(ids[mask].tolist(), skip_special_tokens=True) == "sort 3 1 2 ="
    assert tok.decode(ids[~mask].tolist(), skip_special_tokens=True) == " 1 2 3"
    assert tok.decode(ids.tolist(), skip_special_tokens=True) == "sort 3 1 2 = 1 2 3"
    assert mask[: int(mask.sum())].all()  # prompt first, then answer
    assert s.metadata == {"prompt": ["sort 3 1 2 ="], "answer": [" 1 2 3"], "id": ["a"], "row": [0]}


def test_paired_dataset_both_formats(tok, write_jsonl):
    rows = [
        {"prompt": "q =", "chosen": " good", "rejected": " bad"},
        {"prompt": "p =", "pos_answers": [" a1", " a2"], "neg_answers": [" b1", " b22"], "x": 1},
    ]
    ds = PairedDataset(write_jsonl(rows), tok)
    s0, s1 = ds[0], ds[1]
    assert s0.metadata["n_pairs"] == [1] and s1.metadata["n_pairs"] == [2]
    assert s1.metadata["x"] == [1] and "pos_answers" not in s1.metadata
    lens = s1.seqlens["packed_input_ids"][0]
    assert len(lens) == 4 and s1.seqlens["prompt_mask"] == [lens]
    seqs = _split(s1.data["packed_input_ids"], lens)
    masks = _split(s1.data["prompt_mask"], lens)
    texts = [tok.decode(x.tolist(), skip_special_tokens=True) for x in seqs]
    assert texts == ["p = a1", "p = b1", "p = a2", "p = b22"]
    for x, m in zip(seqs, masks):
        assert tok.decode(x[m].tolist(), skip_special_tokens=True) == "p ="
        assert x[-1].item() == tok.eos_token_id
    texts0 = [
        tok.decode(x.tolist(), skip_special_tokens=True)
        for x in _split(s0.data["packed_input_ids"], s0.seqlens["packed_input_ids"][0])
    ]
    assert texts0 == ["q = good", "q = bad"]
    batch = SequenceSample.gather([s0, s1])
    assert batch.seqlens["packed_input_ids"] == [s0.seqlens["packed_input_ids"][0], lens]


BAD_ROWS = [
    ("{not json", None, "invalid JSON"),
    ("[1, 2]", None, "JSON object"),
    ({"answer": " 1"}, "prompt", "missing"),
    ({"prompt": 3, "answer": " 1"}, "prompt", "expected a string, got int"),
    ({"prompt": "x", "answer": [" 1"]}, "answer", "expected a string, got list"),
]


@pytest.mark.parametrize("bad,field,message", BAD_ROWS)
def test_bad_row_names_file_line_field(tok, write_jsonl, bad, field, message):
    path = write_jsonl([{"prompt": "a", "answer": " b"}, "", bad])
    with pytest.raises(DatasetError) as info:
        PromptAnswerDataset(path, tok)
    text = str(info.value)
    assert text.startswith(f"{path}:3: ") and message in text  # line 2 is blank
    if field:
        assert f"field '{field}'" in text


@pytest.mark.parametrize(
    "row,field",
    [
        ({"prompt": "p", "chosen": " a"}, "rejected"),
        ({"prompt": "p", "pos_answers": [" a"], "neg_answers": [" b", " c"]}, "neg_answers"),
        ({"prompt": "p", "pos_answers": [], "neg_answers": []}, "pos_answers"),
        ({"prompt": "p", "pos_answers": [" a"], "neg_answers": [2]}, "neg_answers"),
    ],
)
def test_paired_bad_rows(tok, write_jsonl, row, field):
    with pytest.raises(DatasetError, match=rf":1: field '{field}'"):
        PairedDataset(write_jsonl([row]), tok)


def test_skip_bad_rows_counts(tok, write_jsonl):
    rows = (
        [{"prompt": "a", "answer": " b"}]
        + [b for b, _, _ in BAD_ROWS]
        + [{"prompt": "c", "answer": " d"}]
    )
    ds = PromptAnswerDataset(write_jsonl(rows), tok, skip_bad_rows=True)
    assert len(ds) == 2 and ds.n_bad == len(BAD_ROWS) and len(ds.bad_rows) == len(BAD_ROWS)
    assert ds.bad_rows[0].endswith(
        ":2: invalid JSON: Expecting property name enclosed in double quotes (column 2)"
    )
    assert [ds[i].metadata["prompt"] for i in range(2)] == [["a"], ["c"]]


def test_empty_or_missing_file(tok, write_jsonl, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        PromptDataset(str(tmp_path / "nope.jsonl"), tok)
    with pytest.raises(DatasetError, match="no usable rows"):
        PromptDataset(write_jsonl(["{bad"]), tok, skip_bad_rows=True)
    with pytest.raises(DatasetError, match="unknown dataset options"):
        PromptDataset(write_jsonl([{"prompt": "a"}]), tok, n_rows=3)


def test_max_length_prompt(tok, write_jsonl):
    path = write_jsonl([{"prompt": "abc"}, {"prompt": "abcdefgh"}, {"prompt": "abcdef"}])
    ds = PromptDataset(path, tok, max_length=5)
    assert len(ds) == 1 and (ds.n_dropped, ds.n_truncated) == (2, 0)
    ds = PromptDataset(path, tok, max_length=5, truncate=True)
    assert len(ds) == 3 and (ds.n_dropped, ds.n_truncated) == (0, 2)
    ids = ds[1].data["packed_prompts"].tolist()
    assert len(ids) == 5 and ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "efgh"
    assert ds[1].metadata["prompt"] == ["abcdefgh"]


def test_max_length_prompt_answer(tok, write_jsonl):
    # lengths with BOS + EOS: 2 + 3 = 5, 2 + 6 = 8, 6 + 3 = 9 (prompt fills the budget)
    rows = [
        {"prompt": "ab", "answer": " c"},
        {"prompt": "ab", "answer": " cdefg"},
        {"prompt": "abcdef", "answer": "xy"},
    ]
    path = write_jsonl(rows)
    ds = PromptAnswerDataset(path, tok, max_length=6)
    assert len(ds) == 1 and (ds.n_dropped, ds.n_truncated) == (2, 0)
    ds = PromptAnswerDataset(path, tok, max_length=6, truncate=True)
    assert len(ds) == 2 and (ds.n_dropped, ds.n_truncated) == (1, 1)
    s = ds[1]
    ids, mask = s.data["packed_input_ids"], s.data["prompt_mask"]
    assert len(ids) == 6 and tok.decode(ids.tolist(), skip_special_tokens=True) == "ab cde"
    assert tok.eos_token_id not in ids.tolist() and int(mask.sum()) == 3


def test_max_length_paired(tok, write_jsonl):
    rows = [
        {"prompt": "p", "chosen": " a", "rejected": " b"},
        {"prompt": "p", "chosen": " aaaa", "rejected": " bbbb"},
        {"prompt": "p", "chosen": " aaaa1", "rejected": " aaaa2"},  # differ only past the limit
    ]
    path = write_jsonl(rows)
    ds = PairedDataset(path, tok, max_length=5)
    assert len(ds) == 1 and ds.n_dropped == 2
    ds = PairedDataset(path, tok, max_length=5, truncate=True)
    assert len(ds) == 2 and (ds.n_dropped, ds.n_truncated) == (1, 1)
    assert ds[1].seqlens["packed_input_ids"] == [[5, 5]]


@pytest.mark.parametrize("cls", [PromptDataset, PromptAnswerDataset, PairedDataset])
def test_builtin_sources(tok, cls):
    ds = cls("builtin:reverse", tok)
    assert len(ds) == 512
    md = {k: v[0] for k, v in ds[0].metadata.items()}
    assert md["task"] == "reverse" and score(md, md["answer"]) == 1.0
    eval_ds = cls("builtin:reverse:eval", tok)
    assert len(eval_ds) == 64
    train_prompts = {ds[i].metadata["prompt"][0] for i in range(len(ds))}
    assert not train_prompts & {eval_ds[i].metadata["prompt"][0] for i in range(len(eval_ds))}
    again = cls("builtin:reverse", tok)
    assert torch.equal(next(iter(again[5].data.values())), next(iter(ds[5].data.values())))


def test_builtin_options_and_names(tok):
    ds = PromptDataset("builtin:mix", tok, n_rows=8, seed=3)
    assert [ds[i].metadata["task"][0] for i in range(4)] == ["reverse", "sort", "copy", "add"]
    paired = PairedDataset("builtin:sort", tok, n_rows=4)
    md = paired[0].metadata
    assert md["n_pairs"] == [1] and "chosen" not in md
    with pytest.raises(DatasetError, match="unknown built-in task 'revers'"):
        PromptDataset("builtin:revers", tok)
    with pytest.raises(DatasetError, match="bad built-in dataset name"):
        PromptDataset("builtin:reverse:test", tok)
    with pytest.raises(DatasetError, match="unknown dataset options"):
        PromptDataset("builtin:reverse", tok, n_row=3)
