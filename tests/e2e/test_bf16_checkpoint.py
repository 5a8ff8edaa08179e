"""SFT from a bf16 HF checkpoint (saved by transformers, as real checkpoints are) at a real
checkpoint's learning rate, 1e-6.

Reference: the same run from its fp32 twin (the bf16 weights upcast, which is exact, and saved
in fp32). A trained role keeps fp32 master weights and optimizer state whatever the checkpoint's
dtype, so the two runs hold the same fp32 masters from the first step and compute the same
(bf16 autocast in both): their weights must be equal bit for bit, not merely close. Trained in
pure bf16 instead, updates of ~1e-6 fall under half a bf16 ulp and ~1% of the parameters move.
"""

from __future__ import annotations

import os

import pytest
import torch
from e2e_utils import changed, read_metrics, safetensors_weights, saved_state

from realflow.experiments.sft import SFTConfig
from realflow.system.master import RunFailure
from realflow.system.runner import run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """A random tiny llama saved by transformers in bf16, and its fp32 twin."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from realflow.data.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin")
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        out[name] = str(root / name)
        model.to(dtype).save_pretrained(out[name])
        tok.save_pretrained(out[name])
    return out


def sft(path: str, output_dir, **changes) -> SFTConfig:
    cfg = SFTConfig(
        output_dir=str(output_dir), total_steps=4, n_seqs=8, tensorboard=False,
        progress_bar=False, **changes,
    )  # fmt: skip
    cfg.dataset.max_length = 64
    cfg.actor.path = path
    cfg.actor.bf16 = True
    opt = cfg.actor.optimizer
    opt.lr, opt.lr_scheduler_type, opt.warmup_steps_proportion = 1e-6, "constant", 0.0
    return cfg


def fraction_changed(before: dict, after: dict) -> float:
    n = sum(v.numel() for v in before.values())
    return sum((after[k].float() != before[k].float()).sum().item() for k in before) / n


def test_bf16_checkpoint_learns_like_its_fp32_twin_and_saves_bf16(
    checkpoints, tmp_path, monkeypatch
):
    start = safetensors_weights(checkpoints["fp32"])
    twin = run("sft", sft(checkpoints["fp32"], tmp_path / "twin"))
    twin_w = safetensors_weights(os.path.join(twin.last_checkpoint, "actor"))
    assert all(v.dtype == torch.float32 for v in twin_w.values())  # auto: the checkpoint's

    asked = sft(checkpoints["bf16"], tmp_path / "fp32_save")
    asked.actor.save_dtype = "float32"
    masters = run("sft", asked)
    masters_w = safetensors_weights(os.path.join(masters.last_checkpoint, "actor"))
    assert masters_w.keys() == twin_w.keys()
    for k in twin_w:
        assert masters_w[k].dtype == torch.float32 and torch.equal(masters_w[k], twin_w[k]), k
    assert [r["loss"] for r in masters.rows] == [r["loss"] for r in twin.rows]
    # Every parameter of a token the data holds moves; the rest are embedding rows of unseen
    # tokens (zero gradient, no weight decay).
    moved = fraction_changed(start, masters_w)
    assert moved == fraction_changed(start, twin_w) and moved > 0.8

    # The default save dtype is the checkpoint's (bf16), and resume from it stays exact: the fp32
    # masters ride in the worker state. Interrupted at step 3, resumed from step 2.
    from realflow.interfaces.sft import SFTInterface

    out = tmp_path / "bf16_save"
    train_step = SFTInterface.train_step
    calls = []

    def failing(self, model, data, mb_spec):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure at step 3")
        return train_step(self, model, data, mb_spec)

    monkeypatch.setattr(SFTInterface, "train_step", failing)
    with pytest.raises(RunFailure, match="at step 3"):
        run("sft", sft(checkpoints["bf16"], out, save_freq_steps=2))
    monkeypatch.setattr(SFTInterface, "train_step", train_step)
    resumed = run("sft", sft(checkpoints["bf16"], out, save_freq_steps=2, recover_mode="auto"))
    assert [r["step"] for r in resumed.rows] == [3, 4]
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in masters.rows]

    saved_dir = os.path.join(resumed.last_checkpoint, "actor")
    saved = safetensors_weights(saved_dir)
    for k in twin_w:
        assert saved[k].dtype == torch.bfloat16, k
        assert torch.equal(saved[k], masters_w[k].to(torch.bfloat16)), k
    state = torch.load(os.path.join(resumed.last_checkpoint, "worker_0.pt"), weights_only=False)
    resumed_masters = state["engines"]["actor"]["weights"]
    want = saved_state(os.path.join(masters.last_checkpoint, "actor"), "lm")
    assert not changed(want, resumed_masters)  # bit-identical fp32 masters

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(saved_dir).dtype == torch.bfloat16
