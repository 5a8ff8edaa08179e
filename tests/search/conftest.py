from __future__ import annotations

import pytest

from realflow.search.plan import problem_from_dfg
from realflow.search.spec import Cluster, DeviceProfile, Link, ModelSpec

SMALL = ModelSpec("small", n_layers=8, hidden_size=512, n_heads=8, n_kv_heads=8,
                  intermediate_size=1024, vocab_size=1000)  # fmt: skip
DEV = DeviceProfile(
    name="test", source="test", peak_flops=1e12, mem_bandwidth=1e11, memory=4e9,
    param_bytes=2, train_eff=0.4, infer_eff=0.5, decode_bw_eff=0.6, call_s=0.01,
    decode_step_s=1e-4, layer_s=1e-5,
)  # fmt: skip


def make_cluster(nodes: int = 1, per: int = 4, dev: DeviceProfile = DEV) -> Cluster:
    return Cluster("test", nodes, per, dev, Link("fast", 1e11, 5e-6), Link("slow", 1e10, 1e-5))


def ppo_problem(cluster: Cluster, model: ModelSpec = SMALL, n_seqs: int = 32):
    from realflow.experiments.ppo import PPOConfig

    cfg = PPOConfig(n_seqs=n_seqs)
    dfg = cfg.dfg()
    models = {"actor": model, "critic": model, "ref": model, "rew": None}
    return problem_from_dfg(dfg, models, cluster, prompt_len=64, gen_len=64, n_minibatches=2), dfg


@pytest.fixture
def ppo4():
    return ppo_problem(make_cluster())
