"""Parameter reallocation in a 4-process gloo world: between every pair of layouts and back,
the weights must arrive bit-exact (compared with the shards cut from the full state dict), the
source copy is freed when asked, a bf16 copy gets exactly the cast weights, and the whole model
can be gathered on one worker."""

import itertools

import pytest
import torch
import torch.distributed as dist
from parallel_testutils import reference_model, run_world, tiny_config

from realflow.models.transformer import PackedTransformer
from realflow.parallel.flat import FlatParams
from realflow.parallel.layout import Layout, Mesh
from realflow.parallel.model import gather_full_model, load_full_state_dict, shard_state_dict
from realflow.parallel.partition import ShardSpec
from realflow.parallel.realloc import execute_realloc, plan_realloc

pytestmark = pytest.mark.slow

# Tied embedding (two copies under pp), replicated kv heads at tp=2, uneven vocab (101).
CONFIG = tiny_config("qwen2", n_kv_heads=1)
LAYOUTS = ["d1t1p1", "d2t1p1", "d1t2p1", "d1t1p2", "d2t2p1", "d1t2p2"]
WORLD = 4
CHUNK = 20_000  # elements per message piece (a shard here is ~30k-200k elements)


def placed(layout: str, shift: int) -> Mesh:
    lay = Layout.parse(layout)
    return Mesh(lay, tuple((shift + i) % WORLD for i in range(lay.world_size)))


def shard(mesh: Mesh, rank: int, dtype=torch.float32) -> PackedTransformer | None:
    if rank not in mesh:
        return None
    c, lay = mesh.coords(rank), mesh.layout
    spec = ShardSpec(tp_rank=c.tp, tp_size=lay.tp, pp_stage=c.pp, pp_size=lay.pp)
    return PackedTransformer(CONFIG, "lm", spec).to(dtype)


def flat_of(model):
    return None if model is None else FlatParams(model)


def assert_holds(model, full_sd, what: str, dtype=torch.float32) -> None:
    want = shard_state_dict(model, {k: v.to(dtype) for k, v in full_sd.items()})
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), want[name]), f"{what}: {name}"


def _pairs_worker(rank: int, world: int) -> None:
    full_sd = reference_model(CONFIG).state_dict()
    for a, b in itertools.permutations(LAYOUTS, 2):
        src, dst = placed(a, 0), placed(b, 1)  # overlapping but shifted worker sets
        s_model, d_model = shard(src, rank), shard(dst, rank)
        if s_model is not None:
            load_full_state_dict(s_model, full_sd)
        s_flat, d_flat = flat_of(s_model), flat_of(d_model)
        if d_flat is not None:
            d_flat.release()  # the destination copy starts with no storage
        plan = plan_realloc(CONFIG, "lm", src, dst)
        # small pieces: every message is cut in several (the pipelined path)
        execute_realloc(plan, s_flat, d_flat, release_src=True, chunk_numel=CHUNK)
        if d_model is not None:
            assert_holds(d_model, full_sd, f"{src} -> {dst}")
        if s_flat is not None and s_flat is not d_flat:
            assert s_flat.released and all(p.numel() == 0 for p in s_model.parameters())
        execute_realloc(plan_realloc(CONFIG, "lm", dst, src), d_flat, s_flat)
        if s_model is not None:
            assert_holds(s_model, full_sd, f"{src} -> {dst} -> back")
        dist.barrier()


def _extras_worker(rank: int, world: int) -> None:
    full_sd = reference_model(CONFIG).state_dict()
    # An fp32 training copy (kept) to a bf16 generation copy on other workers.
    src, dst = Mesh.parse("d1t2p1@0-1"), Mesh.parse("d1t1p2@2-3")
    s_model, d_model = shard(src, rank), shard(dst, rank, torch.bfloat16)
    if s_model is not None:
        load_full_state_dict(s_model, full_sd)
    s_flat, d_flat = flat_of(s_model), flat_of(d_model)
    plan = plan_realloc(CONFIG, "lm", src, dst)
    execute_realloc(plan, s_flat, d_flat, wire_dtype=torch.bfloat16)
    if d_model is not None:
        assert_holds(d_model, full_sd, "fp32 -> bf16", torch.bfloat16)
    if s_model is not None:
        assert not s_flat.released
        assert_holds(s_model, full_sd, "kept training copy")
    # The whole model gathered on worker 3 from a d1t2p2 layout.
    mesh = Mesh.parse("d1t2p2@0-3")
    model = shard(mesh, rank)
    load_full_state_dict(model, full_sd)
    full = gather_full_model(FlatParams(model), CONFIG, "lm", mesh, to_rank=3)
    if rank == 3:
        for k, v in full_sd.items():
            assert torch.equal(full.state_dict()[k], v), k
        assert full.lm_head.weight is full.embed_tokens.weight
    else:
        assert full is None


def test_realloc_between_every_pair_of_layouts_and_back_is_bit_exact():
    run_world(_pairs_worker, WORLD)


def test_realloc_casts_keeps_the_training_copy_and_gathers_the_whole_model():
    run_world(_extras_worker, WORLD)
