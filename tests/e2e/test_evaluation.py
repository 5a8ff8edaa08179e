"""Evaluation (eval_freq_steps): the eval/ stats equal what plain transformers computes from the
checkpoint of the same step, evaluating does not change training, a custom evaluator replaces
the experiment's, and impossible settings are refused before anything runs."""

from __future__ import annotations

import math

import pytest
import torch
from e2e_utils import read_metrics, tiny_config

from realflow.api.config import ConfigError
from realflow.system.runner import run

pytestmark = pytest.mark.timeout(600)


def _eval_rows(rows):
    return {r["step"]: r for r in rows if any(k.startswith("eval/") for k in r)}


def _eval_samples(cfg, tokenizer):
    from realflow.api.registry import DATASETS

    d = cfg.dataset
    dataset = DATASETS.get(cfg.dataset_type)(
        cfg.eval_dataset_path(), tokenizer, max_length=d.max_length, truncate=d.truncate
    )
    return [dataset[i] for i in range(len(dataset))]


def _hf(path: str, cls: str = "AutoModelForCausalLM"):
    import transformers

    return getattr(transformers, cls).from_pretrained(path, local_files_only=True).eval()


@pytest.mark.slow
def test_sft_eval_loss_is_the_checkpoints_nll_on_the_eval_split(tmp_path):
    cfg = tiny_config(
        "sft", tmp_path, "total_steps=4", "eval_freq_steps=2", "save_freq_steps=2",
        "eval_dataset.n_seqs=24",
    )  # fmt: skip
    rows = read_metrics(run("sft", cfg).output_dir)
    evals = _eval_rows(rows)
    assert sorted(evals) == [2, 4]
    from realflow.data.tokenizer import load_tokenizer

    samples = _eval_samples(cfg, load_tokenizer("builtin"))
    assert len(samples) == 64
    for step in (2, 4):
        hf = _hf(f"{tmp_path}/checkpoints/step_{step}/actor")
        nll, n = 0.0, 0
        with torch.no_grad():
            for s in samples:
                ids = s.data["packed_input_ids"]
                answer = ~s.data["prompt_mask"].bool()
                logp = torch.log_softmax(hf(input_ids=ids[None]).logits[0, :-1].float(), -1)
                token_logp = logp.gather(1, ids[1:, None])[:, 0]
                nll -= float(token_logp[answer[1:]].sum())
                n += int(answer[1:].sum())
        assert evals[step]["eval/loss"] == pytest.approx(nll / n, rel=1e-5)
        assert evals[step]["eval/ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)


@pytest.mark.slow
def test_grpo_eval_reward_is_the_task_score_of_greedy_answers(tmp_path, reverse_sft):
    """eval/reward/mean at step 2 equals the built-in task's score of the answers transformers
    generates greedily from the step_2 checkpoint."""
    from realflow.data import tasks

    cfg = tiny_config(
        "grpo", tmp_path, "total_steps=2", "eval_freq_steps=2", "eval_dataset.max_batches=2",
        "eval_dataset.n_seqs=8",
    )  # fmt: skip
    rows = read_metrics(run("grpo", cfg).output_dir)
    row = _eval_rows(rows)[2]
    from transformers import AutoTokenizer

    ckpt = f"{tmp_path}/checkpoints/step_2/actor"
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    hf = _hf(ckpt)
    samples = _eval_samples(cfg, tokenizer)[:16]  # 2 batches of 8, in dataset order
    scores, lens = [], []
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        for s in samples:
            prompt = s.data["packed_prompts"][None]
            out = hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=cfg.grpo.gen.max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )[0, prompt.shape[1] :].tolist()
            lens.append(len(out[: out.index(eos) + 1] if eos in out else out))
            answer = tokenizer.decode([t for t in out if t != eos], skip_special_tokens=True)
            example = {k: v[0] for k, v in s.metadata.items()}
            scores.append(tasks.score(example, answer))
    assert row["eval/reward/mean"] == pytest.approx(sum(scores) / len(scores), abs=1e-6)
    assert row["eval/eval_gen/answer_len/mean"] == pytest.approx(sum(lens) / len(lens))


@pytest.mark.slow
def test_evaluation_does_not_change_training(tmp_path):
    plain = run("sft", tiny_config("sft", tmp_path / "plain", "total_steps=4"))
    evaluated = run(
        "sft", tiny_config("sft", tmp_path / "eval", "total_steps=4", "eval_freq_steps=1")
    )

    def train_part(rows):
        return [{k: v for k, v in r.items() if not k.startswith(("eval/", "time/"))} for r in rows]

    assert train_part(evaluated.rows) == train_part(plain.rows)
    a = torch.load(f"{plain.last_checkpoint}/worker_0.pt", weights_only=False)["engines"]
    b = torch.load(f"{evaluated.last_checkpoint}/worker_0.pt", weights_only=False)["engines"]
    assert torch.equal(
        a["actor"]["backend_state"]["optimizer"]["state"][0]["exp_avg"],
        b["actor"]["backend_state"]["optimizer"]["state"][0]["exp_avg"],
    )


def test_a_registered_evaluator_replaces_the_experiments(tmp_path):
    from realflow.api.interface import ModelInterface
    from realflow.api.registry import INTERFACES

    @INTERFACES.register("test_count_tokens")
    class CountTokens(ModelInterface):
        def __init__(self, scale: float = 1.0):
            self.scale = scale

        def evaluate(self, model, data, mb_spec):
            return {"tokens": self.scale * data.total_tokens("packed_input_ids") / data.bs}

    try:
        cfg = tiny_config(
            "sft", tmp_path, "total_steps=1", "eval_freq_steps=1", "evaluator=test_count_tokens",
            "evaluator_args.scale=2.0", "eval_dataset.max_batches=1", "eval_dataset.n_seqs=4",
        )  # fmt: skip
        row = _eval_rows(read_metrics(run("sft", cfg).output_dir))[1]
    finally:
        INTERFACES.unregister("test_count_tokens")
    from realflow.data.tokenizer import load_tokenizer

    samples = _eval_samples(cfg, load_tokenizer("builtin"))[:4]
    mean_len = sum(s.total_tokens("packed_input_ids") for s in samples) / 4
    assert row["eval/tokens"] == pytest.approx(2.0 * mean_len)
    assert "eval/loss" not in row


def test_evaluation_needs_an_eval_dataset(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(ConfigError, match="eval_dataset.path: evaluation needs a dataset"):
        tiny_config("sft", tmp_path, "eval_freq_steps=5", f"dataset.path={data}")
    cfg = tiny_config(
        "sft", tmp_path, "eval_freq_steps=5", f"dataset.path={data}", f"eval_dataset.path={data}"
    )
    assert cfg.eval_dataset_path() == str(data)
    assert tiny_config("grpo", tmp_path, "eval_freq_steps=5").eval_dataset_path() == (
        "builtin:reverse:eval"
    )
