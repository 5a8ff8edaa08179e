"""A reward model trained from a checkpoint whose tokenizer has no pad token (gpt2, llama: realflow
uses EOS as pad) is saved with a pad token and an embedding row of its own, for transformers. The
run still resumes from that checkpoint to the weights of an uninterrupted run: realflow drops the
added row on load, so the optimizer state keeps its shapes."""

from __future__ import annotations

import json
import os

import torch

from realflow.data.tokenizer import load_tokenizer
from realflow.experiments.rw import RWConfig
from realflow.models.builtin import builtin_config
from realflow.models.hf_io import ADDED_PAD_ROWS, read_hf_config, save_hf
from realflow.models.transformer import PackedTransformer
from realflow.system import runner

WORDS = 40


def no_pad_checkpoint(path) -> str:
    """A tiny llama LM with a word-level tokenizer that has BOS and EOS but no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(path.parent / "tok")
    tok = load_tokenizer(path.parent / "tok")
    assert tok.pad_token_id == tok.eos_token_id  # realflow's choice for a tokenizer without pad
    torch.manual_seed(0)
    model = PackedTransformer(builtin_config("tiny-llama", WORDS, eos_token_id=2), head="lm")
    save_hf(model, path, tokenizer=tok)
    return str(path)


def rw_config(out, start: str, data: str, total_steps: int) -> RWConfig:
    cfg = RWConfig(output_dir=str(out), total_steps=total_steps, n_seqs=4, save_freq_steps=1)
    cfg.tensorboard = cfg.progress_bar = False
    cfg.rew.path = start
    cfg.rew.optimizer.lr_scheduler_type = "constant"  # the same LR whatever total_steps is
    cfg.rew.optimizer.warmup_steps_proportion = 0.0
    cfg.dataset.path = data
    return cfg


def weights(ckpt_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(ckpt_dir, "rew", "model.safetensors"))


def test_reward_model_with_added_pad_resumes_exactly(tmp_path):
    start = no_pad_checkpoint(tmp_path / "sft")
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"w{i} w{i + 1}", "chosen": f"w{i + 2}", "rejected": "w3 w3"})
            + "\n"
            for i in range(3, 30)
        )
    )
    fresh = runner.run("rw", rw_config(tmp_path / "fresh", start, str(data), 2))
    assert fresh.last_checkpoint is not None
    saved = read_hf_config(os.path.join(fresh.last_checkpoint, "rew"))
    assert saved[ADDED_PAD_ROWS] == 1 and saved["vocab_size"] == WORDS + 1
    assert (
        saved["pad_token_id"]
        == load_tokenizer(os.path.join(fresh.last_checkpoint, "rew")).pad_token_id
        == WORDS
    )

    runner.run("rw", rw_config(tmp_path / "run", start, str(data), 1))
    resumed_cfg = rw_config(tmp_path / "run", start, str(data), 2)
    resumed_cfg.recover_mode = "auto"
    resumed = runner.run("rw", resumed_cfg)
    assert [r["step"] for r in resumed.rows] == [2]
    a, b = weights(fresh.last_checkpoint), weights(resumed.last_checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exported_reward_model_passes_the_check_against_its_actor(tmp_path):
    # The saved tokenizer has one token more (its pad) than the actor's: not a difference.
    from realflow.experiments.ppo import PPOConfig
    from realflow.system.preflight import check_roles

    start = no_pad_checkpoint(tmp_path / "sft")
    rm = tmp_path / "rm"
    model = PackedTransformer(builtin_config("tiny-llama", WORDS, eos_token_id=2), head="reward")
    save_hf(model, rm, tokenizer=load_tokenizer(start))
    cfg = PPOConfig()
    cfg.actor.path, cfg.rew.path, cfg.reward.scorers = start, str(rm), ["model"]
    check_roles(cfg)
