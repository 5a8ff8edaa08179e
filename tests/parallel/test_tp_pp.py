"""Tensor parallel (d1t2p1) and pipeline parallel (d1t1p2) against the whole model on one process.

Two gloo processes; for every registered family (llama with split and with replicated kv heads,
qwen2 with a tied embedding, gpt2 with learned positions and an uneven vocab split): logits,
vocab-parallel log-probs and entropy, gradients of every shard, the global grad norm, a critic
head and greedy generation must equal the single-process model's (fp32, 1e-5).
"""

import pytest
import torch
from parallel_testutils import (
    HF_CASES,
    check_greedy_generation,
    packed_batch,
    reference_model,
    registered_families,
    run_world,
    tiny_config,
)

from realflow.parallel.grads import grad_norm
from realflow.parallel.groups import MeshGroups
from realflow.parallel.layout import Mesh
from realflow.parallel.model import build_model, load_full_state_dict, shard_state_dict
from realflow.parallel.pipeline import PipelineRunner
from realflow.parallel.vocab import gather_packed_logprobs, gather_vocab, packed_entropy

pytestmark = pytest.mark.slow

CASES = ["llama", "llama_kv1", "qwen2", "gpt2"]
TOL = dict(rtol=1e-5, atol=1e-5)
SCALES = [0.5, 0.3, 0.2]


def micro_batches() -> list:
    return [packed_batch(lens, seed=i) for i, lens in enumerate([[5, 9, 3], [7], [4, 6]])]


def lm_loss(module, mb):
    """Mean token NLL minus 0.1 x mean entropy, through the vocab-parallel path when sharded."""
    ids, cu = mb
    logits = module(ids, cu)
    shard = module.vocab_shard
    logp = gather_packed_logprobs(logits, ids, cu, shard=shard)
    ent = packed_entropy(logits, cu, shard=shard)
    return -logp.mean() - 0.1 * ent.mean(), {}


def reference_grads(ref, mbs, loss_fn, scales) -> tuple[dict, list[float]]:
    ref.zero_grad()
    losses = []
    for mb, s in zip(mbs, scales):
        loss, _ = loss_fn(ref, mb)
        (loss * s).backward()
        losses.append(float(loss))
    return {n: p.grad.clone() for n, p in ref.named_parameters()}, losses


def check_grads(model, ref_grads: dict, what: str) -> None:
    expected = shard_state_dict(model, ref_grads)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], **TOL, msg=f"{what}: grad {name}")


def tensor_parallel_case(case: str, groups: MeshGroups) -> None:
    cfg = tiny_config(case)
    ref = reference_model(cfg)
    model = build_model(cfg, "lm", groups)
    load_full_state_dict(model, ref.state_dict())
    mbs = micro_batches()
    ids, cu = mbs[0]
    logits = gather_vocab(model(ids, cu), model.vocab_shard)
    torch.testing.assert_close(logits, ref(ids, cu), **TOL, msg=f"{case} tp logits")
    ref_grads, _ = reference_grads(ref, mbs, lm_loss, SCALES)
    for mb, s in zip(mbs, SCALES):
        loss, _ = lm_loss(model, mb)
        (loss * s).backward()
    check_grads(model, ref_grads, f"{case} tp")
    ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
    assert grad_norm(model, groups) == pytest.approx(float(ref_norm), rel=1e-5)
    check_greedy_generation(model, groups, ref, f"{case} tp generate")

    critic_ref = reference_model(cfg, head="critic", seed=1)
    critic = build_model(cfg, "critic", groups)
    load_full_state_dict(critic, critic_ref.state_dict())
    torch.testing.assert_close(critic(ids, cu), critic_ref(ids, cu), **TOL)
    critic_ref(ids, cu).pow(2).sum().backward()
    critic(ids, cu).pow(2).sum().backward()
    check_grads(critic, {n: p.grad for n, p in critic_ref.named_parameters()}, f"{case} critic")


def pipeline_case(case: str, groups: MeshGroups) -> None:
    cfg = tiny_config(case)
    ref = reference_model(cfg)
    model = build_model(cfg, "lm", groups)
    load_full_state_dict(model, ref.state_dict())
    runner = PipelineRunner(model, groups)
    mbs = micro_batches()
    with torch.no_grad():
        outs = runner.forward(mbs, lambda mb: mb, lambda m, mb: m(*mb))
        if runner.is_last:
            for out, mb in zip(outs, mbs):
                torch.testing.assert_close(out, ref(*mb), **TOL, msg=f"{case} pp forward")
    ref_grads, ref_losses = reference_grads(ref, mbs, lm_loss, SCALES)
    results = runner.forward_backward(mbs, lambda mb: mb, lm_loss, SCALES)
    if runner.is_last:
        assert [r[0] for r in results] == pytest.approx(ref_losses, rel=1e-5)
    check_grads(model, ref_grads, f"{case} pp")
    ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
    assert grad_norm(model, groups) == pytest.approx(float(ref_norm), rel=1e-5)
    check_greedy_generation(model, groups, ref, f"{case} pp generate")


def _worker(rank: int, world: int) -> None:
    tp = MeshGroups.build(Mesh.parse("d1t2p1@0-1"))
    pp = MeshGroups.build(Mesh.parse("d1t1p2@0-1"))
    for case in CASES:
        tensor_parallel_case(case, tp)
        pipeline_case(case, pp)


def test_cases_cover_every_registered_family():
    assert {HF_CASES[c][0] for c in CASES} == registered_families()


def test_tp2_and_pp2_equal_one_process():
    run_world(_worker, 2)
