"""The registered interfaces, unchanged, on model shards (realflow.parallel.runtime).

Two gloo processes hold one shard each of a d1t2p1 (tensor-parallel) and a d1t1p2 (pipeline)
mesh and are given the same batches. Reference: a fresh single-process run of the same
interface on the whole model (each process builds it itself). Checked within 1e-5 (fp32):
  - ppo_actor (with the early-stop pass), sft and ppo_critic train_step: every stat (loss,
    grad_norm with clipping active, ...) and the updated weights of every shard; sft evaluate; the checkpoint `save` writes (gathered on the
    mesh's first worker) loads back to the reference's weights;
  - ppo_actor / ppo_critic inference: log-probs and values;
  - ppo_actor greedy generate: the same answers and log-probs;
  - d2t1p1 (each process half the batch): sft train_step gives the whole batch's weights,
    grad_norm (gradients averaged over the dp group) and loss / nll / ppl (token-weighted over
    the dp group);
  - d2t1p1 with default PPO settings (advantage whitening, 2 minibatches), the adaptive KL
    controller and value normalisation: ppo_actor and ppo_critic end at the whole batch's
    weights, KL coefficient and value statistics (batch statistics all-gathered over dp);
  - d2t1p1 for grpo_actor (scale_rewards="batch") and reinforce_pp_actor, whose advantages
    are normalised over the batch: the whole batch's weights;
  - build_shard_model on a role: the shard holds the role's (seeded) weights;
  - realflow.algorithms' chunked log-probs and entropy with a VocabShard (several chunks,
    temperature 0.7): values and the gradient of each rank's logit columns equal the whole
    vocab's (a plain log_softmax in the test).
The model is qwen2-shaped (tied embedding: two pipeline copies), vocab 101 (uneven tp split).
"""

from __future__ import annotations

import copy
import math
import tempfile

import pytest
import torch
import torch.distributed as dist
from parallel_testutils import VOCAB, reference_model, run_world, tiny_config

from realflow.api.data import SequenceSample
from realflow.api.dfg import MicroBatchSpec
from realflow.api.interface import Model
from realflow.api.registry import INTERFACES
from realflow.engines import EngineConfig, OptimizerConfig, build_train_engine
from realflow.engines.train import InferenceEngine
from realflow.interfaces.sft import n_trained_tokens
from realflow.parallel.groups import MeshGroups
from realflow.parallel.layout import Mesh
from realflow.parallel.model import shard_state_dict
from realflow.parallel.runtime import build_shard_model, shard_engine

pytestmark = pytest.mark.slow  # two processes, ~50 s on the shared 2-core machine

CONFIG = tiny_config("qwen2")
TOL = dict(rtol=1e-5, atol=1e-5)
# Clipping at 0.5 is active for these batches: the global norm must be the whole model's.
OPTIM = OptimizerConfig(
    lr=1e-2, lr_scheduler_type="constant", warmup_steps_proportion=0.0, gradient_clipping=0.5
)
MB = MicroBatchSpec(max_tokens_per_mb=40)  # 3-4 micro-batches per minibatch
GEN = dict(max_new_tokens=6, min_new_tokens=0, greedy=True)


def ppo_args() -> dict:
    # early_stop_imp_ratio: each minibatch first runs a no-grad pass (the pipelined map)
    return dict(gen=dict(GEN), ppo_n_minibatches=2, use_adv_norm=True, early_stop_imp_ratio=10.0)


def rl_batch(
    seed: int = 0, n: int = 8, length: int | None = None, group: int = 1
) -> SequenceSample:
    """A PPO train batch: prompts of 2-5 tokens, answers of 1-12 (or `length` tokens in all),
    random log-probs, values, rewards and no-EOS flags; `group` sequences per sample (the
    answers of one prompt, as critic-free actors take them)."""
    g = torch.Generator().manual_seed(seed)
    keys: dict[str, list] = {
        k: [] for k in ("packed_input_ids", "prompt_mask", "logprobs", "ref_logprobs", "values")
    }
    keys.update(rewards=[], no_eos_mask=[])
    for _ in range(n):
        for k in keys:
            keys[k].append([])
        for _ in range(group):
            n_prompt, n_answer = (
                int(torch.randint(2, 6, (1,), generator=g)),
                int(torch.randint(1, 13, (1,), generator=g)),
            )
            L = length or n_prompt + n_answer
            mask_T1 = torch.arange(L - 1) >= n_prompt - 1
            keys["packed_input_ids"][-1].append(torch.randint(3, VOCAB, (L,), generator=g))
            keys["prompt_mask"][-1].append(torch.arange(L) < n_prompt)
            keys["logprobs"][-1].append(-torch.rand(L - 1, generator=g) * 5 * mask_T1)
            keys["ref_logprobs"][-1].append(-torch.rand(L - 1, generator=g) * 5)
            keys["values"][-1].append(torch.randn(L, generator=g))
            keys["rewards"][-1].append(torch.randn(1, generator=g))
            keys["no_eos_mask"][-1].append(torch.rand(1, generator=g) < 0.3)
    return SequenceSample.from_sequences(list(range(n)), keys)


def prompts_batch() -> SequenceSample:
    g = torch.Generator().manual_seed(5)
    seqs = [[torch.randint(3, VOCAB, (n,), generator=g)] for n in (3, 6, 2, 5)]
    return SequenceSample.from_sequences(list(range(4)), {"packed_prompts": seqs})


def check_stats(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for k, v in want.items():
        if math.isnan(v):
            assert math.isnan(got[k]), f"{what}: {k}"
        else:
            assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), f"{what}: {k}"


def check_weights(shard_engine_, ref_engine, what: str) -> None:
    want = shard_state_dict(shard_engine_.module, ref_engine.module.state_dict())
    for name, p in shard_engine_.module.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], **TOL, msg=f"{what}: {name}")


def check_saved(model: Model, ref_engine, groups: MeshGroups, what: str) -> None:
    """`save` on every worker of the mesh writes the whole model on its first worker."""
    from realflow.models.hf_io import load_hf

    box = [tempfile.mkdtemp() if groups.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    interface = INTERFACES.get("sft")()
    interface.save(model, box[0] + "/ckpt")
    dist.barrier()
    if groups.rank == groups.mesh.workers[0]:
        loaded = load_hf(box[0] + "/ckpt", head="lm", dtype=torch.float32).model.state_dict()
        for k, v in ref_engine.module.state_dict().items():
            torch.testing.assert_close(loaded[k], v, **TOL, msg=f"{what} saved: {k}")


def train_case(name: str, head: str, groups: MeshGroups, solo) -> None:
    """train_step on the shard vs on the whole model; then inference."""
    full = reference_model(CONFIG, head, seed=3)
    iface_args = {} if name == "sft" else ppo_args()
    ref = build_train_engine(copy.deepcopy(full), EngineConfig(), OPTIM, 10, dp_group=solo)
    engine = shard_engine(full, groups, EngineConfig(), OPTIM, 10)
    data = rl_batch() if name != "sft" else rl_batch().select(["packed_input_ids", "prompt_mask"])
    what = f"{name} {groups.mesh}"
    want = INTERFACES.get(name)(**iface_args).train_step(Model("r", ref), data, MB)
    got = INTERFACES.get(name)(**iface_args).train_step(Model("s", engine), data, MB)
    check_stats(got, want, what)
    check_weights(engine, ref, what)
    if name == "sft":
        check_saved(Model("s", engine), ref, groups, what)
        want = INTERFACES.get(name)().evaluate(Model("r", ref), data, MB)
        check_stats(INTERFACES.get(name)().evaluate(Model("s", engine), data, MB), want, what)
    ids = data.select(["packed_input_ids"])
    key = "values" if head == "critic" else "logprobs"
    want = INTERFACES.get(name)(**iface_args).inference(Model("r", ref), ids, MB)
    got = INTERFACES.get(name)(**iface_args).inference(Model("s", engine), ids, MB)
    torch.testing.assert_close(got.data[key], want.data[key], **TOL, msg=f"{what} inference")


def data_parallel_case(groups: MeshGroups, solo) -> None:
    full = reference_model(CONFIG, "lm", seed=3)
    ref = build_train_engine(copy.deepcopy(full), EngineConfig(), OPTIM, 10, dp_group=solo)
    engine = shard_engine(full, groups, EngineConfig(), OPTIM, 10)
    data = rl_batch().select(["packed_input_ids", "prompt_mask"])
    want = INTERFACES.get("sft")().train_step(Model("r", ref), data, MB)
    part = data.index([0, 1, 2]) if groups.coords.dp == 0 else data.index([3, 4, 5, 6, 7])
    got = INTERFACES.get("sft")().train_step(Model("s", engine), part, MB)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    # Each rank reports the whole batch's per-token means (its loss weights all-gathered), and
    # its own part's token count (the master sums those).
    for key in ("loss", "nll", "ppl"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert got["n_tokens"] == sum(n_trained_tokens(mb) for mb in part.split(1))
    check_weights(engine, ref, str(groups.mesh))


def ppo_data_parallel_case(groups: MeshGroups, solo) -> None:
    """Default PPO settings (2 minibatches, advantage whitening) plus the adaptive KL controller
    and value normalisation: each dp rank trains on half the batch and must end where one process
    does on the whole batch. Sequences of one length, so each rank's minibatch i holds half of
    the reference's minibatch i (ranks [0-3], [4-7]; reference order 0 1 4 5 | 2 3 6 7)."""
    data = rl_batch(seed=5, length=10)
    part = data.index([0, 1, 2, 3] if groups.coords.dp == 0 else [4, 5, 6, 7])
    whole = data.index([0, 1, 4, 5, 2, 3, 6, 7])
    args = dict(gen=dict(GEN), adaptive_kl_ctl=True, adaptive_kl_target=0.1, value_norm=True)
    for name, head in (("ppo_actor", "lm"), ("ppo_critic", "critic")):
        full = reference_model(CONFIG, head, seed=6)
        ref = build_train_engine(copy.deepcopy(full), EngineConfig(), OPTIM, 10, dp_group=solo)
        engine = shard_engine(full, groups, EngineConfig(), OPTIM, 10)
        want_iface, got_iface = INTERFACES.get(name)(**args), INTERFACES.get(name)(**args)
        for _ in range(2):  # the second step reads the KL coefficient / value stats of the first
            want = want_iface.train_step(Model("r", ref), whole, MB)
            got = got_iface.train_step(Model("s", engine), part, MB)
        what = f"{name} dp=2"
        for key in ("loss", "grad_norm", "kl_coef"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), f"{what}: {key}"
        check_weights(engine, ref, what)
        w, g = want_iface.state_dict(), got_iface.state_dict()
        assert g["kl_ctl"]["value"] == pytest.approx(w["kl_ctl"]["value"], rel=1e-9), what
        for k in ("mean", "var", "count"):
            assert float(g["value_rms"][k]) == pytest.approx(float(w["value_rms"][k])), k


def critic_free_data_parallel_case(groups: MeshGroups, solo) -> None:
    """Critic-free actors whose advantages are normalised over the batch: grpo_actor with
    scale_rewards="batch" (group-centred scores over the std of every score) and
    reinforce_pp_actor (returns whitened over every answer token). Each dp rank trains on half
    the samples and must end where one process does on the whole batch."""
    data = rl_batch(seed=9, length=10, group=2).select(
        ["packed_input_ids", "prompt_mask", "logprobs", "ref_logprobs", "rewards", "no_eos_mask"]
    )
    part = data.index([0, 1, 2, 3] if groups.coords.dp == 0 else [4, 5, 6, 7])
    common = dict(gen=dict(GEN), group_size=2, n_minibatches=1)
    for name, args in (
        ("grpo_actor", dict(common, scale_rewards="batch")),
        ("reinforce_pp_actor", dict(common, kl_beta=0.1)),
    ):
        full = reference_model(CONFIG, "lm", seed=8)
        ref = build_train_engine(copy.deepcopy(full), EngineConfig(), OPTIM, 10, dp_group=solo)
        engine = shard_engine(full, groups, EngineConfig(), OPTIM, 10)
        want = INTERFACES.get(name)(**args).train_step(Model("r", ref), data, MB)
        got = INTERFACES.get(name)(**args).train_step(Model("s", engine), part, MB)
        what = f"{name} dp=2"
        for key in ("loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), f"{what}: {key}"
        check_weights(engine, ref, what)


def generate_case(groups: MeshGroups) -> None:
    full = reference_model(CONFIG, "lm", seed=4)
    ref = InferenceEngine(copy.deepcopy(full).requires_grad_(False), EngineConfig())
    engine = shard_engine(full, groups, EngineConfig())
    iface = INTERFACES.get("ppo_actor")(**ppo_args())
    prompts = prompts_batch()
    rng = torch.Generator().manual_seed(0)
    want = iface.generate(Model("r", ref, rng=rng), prompts, MB)
    got = iface.generate(Model("s", engine, rng=rng), prompts, MB)
    assert torch.equal(got.data["packed_input_ids"], want.data["packed_input_ids"])
    assert got.seqlens == want.seqlens
    torch.testing.assert_close(got.data["logprobs"], want.data["logprobs"], **TOL)


def role_case(groups: MeshGroups) -> None:
    from realflow.experiments.common import ModelConfig, ModelRole
    from realflow.system.models import build_module

    role = ModelRole(ModelConfig(), "lm")
    model = build_shard_model("actor", role, True, 10, 7, groups)
    assert model.module.parallel.groups is groups and model.tokenizer is not None
    want = shard_state_dict(model.module.module, build_module(role, 7).state_dict())
    for name, p in model.module.module.named_parameters():
        assert torch.equal(p.detach(), want[name].float()), name


def vocab_parallel_case(groups: MeshGroups) -> None:
    from realflow.algorithms import gather_packed_logprobs, packed_entropy
    from realflow.parallel.model import build_model

    shard = build_model(CONFIG, "lm", groups).vocab_shard
    g = torch.Generator().manual_seed(11)
    ids, cu = torch.randint(0, VOCAB, (13,), generator=g), torch.tensor([0, 5, 6, 13])
    full = torch.randn(13, VOCAB, generator=g, requires_grad=True)
    local = full.detach()[:, shard.start : shard.stop].clone().requires_grad_()
    w_logp, w_ent = torch.randn(10, generator=g), torch.randn(10, generator=g)
    rows = torch.tensor([0, 1, 2, 3, 6, 7, 8, 9, 10, 11])  # all but each sequence's last
    logp_full = torch.log_softmax(full[rows] / 0.7, -1)
    want_logp = logp_full.gather(1, ids[rows + 1, None]).squeeze(1)
    want_ent = -(logp_full.exp() * logp_full).sum(-1)
    ((want_logp * w_logp).sum() + (want_ent * w_ent).sum()).backward()
    got_logp = gather_packed_logprobs(local, ids, cu, 0.7, chunk_size=3, shard=shard)
    got_ent = packed_entropy(local, cu, 0.7, chunk_size=4, shard=shard)
    ((got_logp * w_logp).sum() + (got_ent * w_ent).sum()).backward()
    torch.testing.assert_close(got_logp, want_logp.detach(), **TOL)
    torch.testing.assert_close(got_ent, want_ent.detach(), **TOL)
    torch.testing.assert_close(local.grad, full.grad[:, shard.start : shard.stop], **TOL)


def _worker(rank: int, world: int) -> None:
    solo = [dist.new_group([r]) for r in range(world)][rank]  # the reference's own dp group
    for spec in ("d1t2p1@0-1", "d1t1p2@0-1"):
        groups = MeshGroups.build(Mesh.parse(spec))
        train_case("ppo_actor", "lm", groups, solo)
        train_case("sft", "lm", groups, solo)
        train_case("ppo_critic", "critic", groups, solo)
        generate_case(groups)
        if spec.startswith("d1t2"):
            role_case(groups)
            vocab_parallel_case(groups)
    dp2 = MeshGroups.build(Mesh.parse("d2t1p1@0-1"))
    data_parallel_case(dp2, solo)
    ppo_data_parallel_case(dp2, solo)
    critic_free_data_parallel_case(dp2, solo)


def test_interfaces_on_tp2_and_pp2_shards_equal_one_process():
    run_world(_worker, 2)
