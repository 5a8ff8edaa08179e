"""The realloc planner, run in one process: every worker's flat buffer is simulated, the plan's
intervals are applied with a plain slice loop, and each destination buffer must equal the shard
cut directly from the full state dict (fast, no torch.distributed)."""

import functools
import itertools

import pytest
import torch
from parallel_testutils import reference_model, tiny_config

from realflow.models.transformer import PackedTransformer
from realflow.parallel.flat import FlatParams
from realflow.parallel.layout import Layout, Mesh
from realflow.parallel.model import load_full_state_dict
from realflow.parallel.partition import ShardSpec
from realflow.parallel.realloc import Transfer, plan_realloc, split_transfer

# qwen2: tied embedding (two copies under pp), 2 kv heads (replicated at tp=4), vocab 101.
CONFIG = tiny_config("qwen2")
LAYOUTS = ["d1t1p1", "d2t1p1", "d1t2p1", "d1t1p2", "d2t2p1", "d1t2p2", "d1t4p1"]
N_WORKERS = 4


@functools.cache
def shard_buffers(mesh: Mesh) -> dict[int, torch.Tensor]:
    """Each worker's flat buffer, cut from the full state dict."""
    full_sd = reference_model(CONFIG).state_dict()
    lay, out = mesh.layout, {}
    for w in mesh.workers:
        c = mesh.coords(w)
        spec = ShardSpec(tp_rank=c.tp, tp_size=lay.tp, pp_stage=c.pp, pp_size=lay.pp)
        model = PackedTransformer(CONFIG, "lm", spec)
        load_full_state_dict(model, full_sd)
        out[w] = FlatParams(model).buffer
    return out


def apply_plan(plan, src: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    dst = {w: torch.full((n,), float("nan")) for w, n in plan.dst_numel.items()}
    for t in plan.transfers:
        for so, do, n in zip(t.src_offsets.tolist(), t.dst_offsets.tolist(), t.lengths.tolist()):
            dst[t.dst][do : do + n] = src[t.src][so : so + n]
    return dst


def placed(layout: str, shift: int) -> Mesh:
    """The layout on workers shift, shift+1, ... (mod N_WORKERS)."""
    lay = Layout.parse(layout)
    return Mesh(lay, tuple((shift + i) % N_WORKERS for i in range(lay.world_size)))


@pytest.mark.parametrize("src_layout, dst_layout", list(itertools.product(LAYOUTS, repeat=2)))
def test_plan_rebuilds_every_destination_shard(src_layout, dst_layout):
    src, dst = placed(src_layout, 0), placed(dst_layout, 1)
    plan = plan_realloc(CONFIG, "lm", src, dst)
    got = apply_plan(plan, shard_buffers(src))
    want = shard_buffers(dst)
    for w in dst.workers:
        assert torch.equal(got[w], want[w]), f"{src} -> {dst}: worker {w}"


def test_same_shards_on_other_workers_move_as_one_interval_each():
    plan = plan_realloc(CONFIG, "lm", Mesh.parse("d1t2p1@0-1"), Mesh.parse("d1t2p1@2-3"))
    assert sorted((t.src, t.dst) for t in plan.transfers) == [(0, 2), (1, 3)]
    assert all(t.lengths.numel() == 1 for t in plan.transfers)
    same = plan_realloc(CONFIG, "lm", Mesh.parse("d1t2p1@0-1"), Mesh.parse("d1t2p1@0-1"))
    assert same.remote_numel() == 0 and same.local_numel() == sum(same.dst_numel.values())


def test_replicas_share_the_sending():
    """From two data-parallel replicas to one new worker, both replicas send."""
    plan = plan_realloc(CONFIG, "lm", Mesh.parse("d2t1p1@0-1"), Mesh.parse("d1t1p1@2"))
    sent = {t.src: t.numel for t in plan.transfers}
    assert set(sent) == {0, 1} and min(sent.values()) > 0
    assert sum(sent.values()) == plan.dst_numel[2]


def test_a_destination_that_holds_the_data_copies_locally():
    plan = plan_realloc(CONFIG, "lm", Mesh.parse("d2t1p1@0-1"), Mesh.parse("d1t2p1@1-2"))
    # worker 1 holds a full replica: its tp shard comes from itself, nothing is sent to it
    assert not [t for t in plan.transfers if t.dst == 1 and t.src != 1]


def test_a_layout_the_model_cannot_take_is_refused():
    with pytest.raises(ValueError, match=r"tp \(3\) must divide n_heads \(4\)"):
        plan_realloc(CONFIG, "lm", Mesh.parse("d1t1p1@0"), Mesh.parse("d1t3p1@0-2"))


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_split_transfer_keeps_every_element_in_order(chunk):
    g = torch.Generator().manual_seed(chunk)
    lengths = torch.randint(1, 40, (30,), generator=g)
    src = torch.randint(0, 10_000, (30,), generator=g)
    dst = torch.cumsum(lengths, 0) - lengths + 5
    t = Transfer(0, 1, src, dst, lengths)

    def elements(x: Transfer):
        s = [o + i for o, n in zip(x.src_offsets.tolist(), x.lengths.tolist()) for i in range(n)]
        d = [o + i for o, n in zip(x.dst_offsets.tolist(), x.lengths.tolist()) for i in range(n)]
        return s, d

    pieces = split_transfer(t, chunk, big=20)
    assert all(p.numel <= chunk or p.lengths.numel() == 1 for p in pieces)
    # an interval of >= 20 elements travels alone (no packing); smaller ones are packed together
    for p in pieces:
        assert p.lengths.numel() == 1 or int(p.lengths.max()) < 20
    got = [elements(p) for p in pieces]
    assert [e for s, _ in got for e in s] == elements(t)[0]
    assert [e for _, d in got for e in d] == elements(t)[1]
