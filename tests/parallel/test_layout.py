"""Layouts, meshes and the partition rules, checked by brute force (single process, fast)."""

import itertools

import pytest
import torch
from parallel_testutils import HF_CASES, tiny_config

from realflow.parallel.flat import full_param_shapes, slots_for
from realflow.parallel.layout import Coords, Layout, Mesh, format_workers, parse_workers
from realflow.parallel.partition import layout_errors, split_range, stage_layers


@pytest.mark.parametrize(
    "text, want", [("d2t1p1", (2, 1, 1)), ("d1t2p2", (1, 2, 2)), (" d4t8p16 ", (4, 8, 16))]
)
def test_layout_parses(text, want):
    lay = Layout.parse(text)
    assert (lay.dp, lay.tp, lay.pp) == want
    assert str(lay) == text.strip()
    assert lay.world_size == want[0] * want[1] * want[2]


@pytest.mark.parametrize(
    "text, hint",
    [
        ("d2t2", "did you mean 'd2t2p1'?"),
        ("t2", "did you mean 'd1t2p1'?"),
        ("p2d1t1", "did you mean 'd1t1p2'?"),
        ("d2x1p1", "d<dp>t<tp>p<pp>"),
        ("d0t1p1", "must be >= 1"),
        ("", "d<dp>t<tp>p<pp>"),
    ],
)
def test_bad_layouts_say_what_to_write(text, hint):
    with pytest.raises(ValueError, match="must") as e:
        Layout.parse(text)
    assert hint in str(e.value)


def test_workers_parse_and_format():
    assert parse_workers("0-3") == (0, 1, 2, 3)
    assert parse_workers("0,2") == (0, 2)
    assert parse_workers("4-5,0-1") == (4, 5, 0, 1)
    assert format_workers((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8"
    for bad, msg in [("0-1,1", "more than once"), ("3-1", "backwards"), ("a", "not a worker")]:
        with pytest.raises(ValueError, match=msg):
            parse_workers(bad)


def test_mesh_needs_dp_tp_pp_workers():
    with pytest.raises(ValueError, match=r"d2t2p1 needs dp\*tp\*pp = 4 workers, got 2 \(0-1\)"):
        Mesh.parse("d2t2p1@0-1")
    with pytest.raises(ValueError, match="<layout>@<workers>"):
        Mesh.parse("d1t2p1")
    assert str(Mesh.parse("d1t2p1@2-3")) == "d1t2p1@2-3"


@pytest.mark.parametrize("text", ["d2t2p2@0-7", "d1t4p1@4-7", "d3t1p2@5,0-4", "d2t3p1@0-5"])
def test_mesh_coordinates_are_a_bijection_and_groups_partition_it(text):
    mesh = Mesh.parse(text)
    lay = mesh.layout
    seen = {mesh.coords(w) for w in mesh.workers}
    assert seen == {
        Coords(d, t, p) for d in range(lay.dp) for t in range(lay.tp) for p in range(lay.pp)
    }
    for w in mesh.workers:
        assert mesh.worker(*mesh.coords(w)) == w
    # tp peers are neighbours in the worker list; pp stages are the outermost axis.
    for i, w in enumerate(mesh.workers):
        c = mesh.coords(w)
        assert i == (c.pp * lay.dp + c.dp) * lay.tp + c.tp
    for groups, fixed in [
        (mesh.tp_groups(), ("dp", "pp")),
        (mesh.dp_groups(), ("tp", "pp")),
        (mesh.pp_groups(), ("dp", "tp")),
        (mesh.mp_groups(), ("dp",)),
    ]:
        assert sorted(itertools.chain(*groups)) == sorted(mesh.workers)
        for g in groups:
            keys = {tuple(getattr(mesh.coords(w), a) for a in fixed) for w in g}
            assert len(keys) == 1
    assert [mesh.coords(w).pp for w in mesh.pp_groups()[0]] == list(range(lay.pp))


def test_split_range_is_contiguous_and_balanced():
    for n, parts in itertools.product(range(1, 12), range(1, 6)):
        ranges = [split_range(n, parts, i) for i in range(parts)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [b - a for a, b in ranges]
        assert max(sizes) - min(sizes) <= 1
    assert list(stage_layers(5, 2, 0)) == [0, 1, 2]


def test_layout_errors_name_the_rule_and_values():
    cfg = tiny_config("llama")  # 4 heads, 2 kv heads, ffn 128, 2 layers
    assert layout_errors(cfg, Layout(tp=4)) == []
    errors = layout_errors(cfg, Layout(tp=3, pp=3))
    assert "tp (3) must divide n_heads (4) for layout d1t3p3" in errors
    assert "tp (3) and n_kv_heads (2) must divide one another for layout d1t3p3" in errors
    assert "pp (3) must be <= n_layers (2) for layout d1t3p3" in errors


@pytest.mark.parametrize("case", sorted(HF_CASES))
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)])
def test_shards_cover_every_parameter_element(case, tp, pp):
    """Over the tp x pp shards, every element of every full parameter is held, and an element
    held twice is a replica (the whole block is replicated, never a partial overlap)."""
    cfg = tiny_config(case)
    for head in ("lm", "critic"):
        shapes = full_param_shapes(cfg, head)
        cover = {}
        for t, p in itertools.product(range(tp), range(pp)):
            for s in slots_for(cfg, head, tp, pp, t, p):
                cols = s.full_shape[1] if len(s.full_shape) == 2 else 1
                count = cover.setdefault(s.key, torch.zeros(s.full_shape[0], cols))
                count[s.rect.r0 : s.rect.r1, s.rect.c0 : s.rect.c1] += 1
        assert set(cover) == set(shapes)
        for key, count in cover.items():
            values = set(count.unique().tolist())
            assert 0 not in values, f"{key}: elements held by no shard"
            assert len(values) == 1, f"{key}: uneven replication {values}"
