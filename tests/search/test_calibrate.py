"""The calibration fit: it recovers a known profile from times the cost model gives, and it
fits real (tiny) measured calls to a usable profile."""

from __future__ import annotations

import math

import pytest

from realflow.parallel.layout import Layout
from realflow.search import calibrate, cost
from realflow.search.spec import DeviceProfile, Link, ModelSpec, load_cluster, load_profile

TRUE = DeviceProfile(
    name="truth", source="test", peak_flops=1e11, mem_bandwidth=2e10, memory=1e10,
    param_bytes=4, train_eff=0.2, infer_eff=0.4, decode_bw_eff=0.05, call_s=0.003,
    decode_step_s=0.001, layer_s=0.0002,
)  # fmt: skip
NO_NET = cost.Links(*(Link("none", 1e18, 0.0),) * 3)


def _synthetic() -> list[calibrate.Sample]:
    samples = []
    for h, n in ((64, 2), (128, 4), (256, 3)):
        spec = ModelSpec(f"h{h}", n, h, 4, 4, 2 * h, 200)
        for b, p, g in ((2, 16, 8), (8, 32, 16), (16, 64, 4)):
            for kind in ("inference", "train_step", "generate"):
                work = cost.Work(kind, b, p, g, max_tokens_per_mb=calibrate.BIG_MB)
                t = cost.mfc_time(spec, Layout(), work, TRUE, NO_NET)
                samples.append(calibrate.Sample(spec, work, t))
    return samples


def test_fit_recovers_the_profile_that_made_the_times():
    fitted, errors = calibrate.fit_profile(
        _synthetic(), TRUE.peak_flops, TRUE.mem_bandwidth, TRUE.memory, 4, "test"
    )
    for name in ("train_eff", "infer_eff", "decode_bw_eff", "call_s", "decode_step_s", "layer_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=1e-4), name
    assert max(abs(e) for e in errors) < 1e-6


def test_fit_link_recovers_latency_and_bandwidth():
    sizes = [1 << k for k in (10, 14, 18, 22)]
    link = calibrate.fit_link(sizes, [20e-6 + n / 3e9 for n in sizes], "x")
    assert link.latency == pytest.approx(20e-6, rel=1e-6)
    assert link.bandwidth == pytest.approx(3e9, rel=1e-6)


def test_profiler_fits_a_toy_run_of_real_calls():
    """Real forward / train / generate calls of a tiny model, timed here, fit to a profile with
    finite non-negative parameters (no timing is asserted: the machine is shared)."""
    spec = ModelSpec("toy", 1, 32, 2, 2, 64, 195)
    samples = calibrate.measure_calls([spec], [(2, 8, 2)], "cpu", reps=1)
    assert [s.work.kind for s in samples] == ["inference", "train_step", "generate"]
    assert all(s.seconds > 0 for s in samples)
    fitted, errors = calibrate.fit_profile(samples, 1e10, 1e10, 1e9, 4, "toy")
    values = [fitted.train_eff, fitted.infer_eff, fitted.decode_bw_eff, fitted.call_s,
              fitted.decode_step_s, fitted.layer_s]  # fmt: skip
    assert all(math.isfinite(v) and v >= 0 for v in values)
    assert len(errors) == len(samples)


def test_shipped_profiles_and_clusters_load_and_say_where_they_come_from():
    for name in ("h100", "h200", "a100", "cpu"):
        p = load_profile(name)
        assert p.source.startswith(("published:", "measured:")), name
    c = load_cluster("h100x8").with_nodes(16)
    assert c.n_devices == 128
    assert c.link((0, 7)).name == "nvlink4" and c.link((7, 8)).name == "ib-ndr400"
    assert load_cluster("cpu2").n_devices == 2


def test_unknown_cluster_names_the_shipped_ones(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'h100x8'"):
        load_cluster("h100x9")
    bad = tmp_path / "c.yaml"
    bad.write_text("name: x\nnodes: 1\ndevices_per_node: 2\ndevice: cpu\nintra_node: {}\n")
    with pytest.raises(ValueError, match=r"missing keys \['inter_node'\]"):
        load_cluster(str(bad))


def test_runtime_share_is_fitted_from_real_call_times():
    """Calls that take 2x the model's time plus 50 ms give scale 2 and call_s 0.05."""
    spec = ModelSpec("toy", 2, 64, 4, 4, 128, 195)
    runs = []
    for kind in ("generate", "inference", "train_step"):
        for b, g in ((4, 8), (16, 16), (32, 4)):
            work = cost.Work(kind, b, 10, g)
            runs.append(calibrate.Sample(spec, work, 2 * cost.mfc_time(spec, Layout(), work,
                                                                       TRUE, NO_NET) + 0.05))  # fmt: skip
    fitted = calibrate.fit_runtime(TRUE, runs)
    for kind in ("generate", "inference", "train_step"):
        scale, call = fitted.runtime_of(kind)
        assert scale == pytest.approx(2.0, rel=1e-3) and call == pytest.approx(0.05, rel=1e-2)
    work = cost.Work("inference", 8, 10, 8)
    assert cost.mfc_time(spec, Layout(), work, fitted, NO_NET) == pytest.approx(
        2 * cost.mfc_time(spec, Layout(), work, TRUE, NO_NET) + 0.05, rel=1e-2
    )
