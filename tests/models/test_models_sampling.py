"""Temperature, top-k and top-p against a plain-Python reference (models_testutils) and against
transformers' logits warpers: the allowed tokens, their renormalised log-probs, ties at the k-th
value and at the top-p boundary, and the distribution sample_tokens draws from."""

from __future__ import annotations

import math

import pytest
import torch
from models_testutils import reference_logprobs

from realflow.models.generation import GenerationConfig, process_logits, sample_tokens


def top_p_margin(logits: list[float], g: GenerationConfig) -> float:
    """How far top_p is from the nearest "mass of strictly more probable tokens" of the
    top-k-filtered row: above ~1e-5 float32 and float64 cannot disagree on the kept set."""
    z = [x / g.temperature for x in logits]
    if 0 < g.top_k < len(z):
        kth = sorted(z, reverse=True)[g.top_k - 1]
        z = [x for x in z if x >= kth]
    w = [math.exp(x - max(z)) for x in z]
    masses = [sum(b for b, y in zip(w, z) if y > x) / sum(w) for x in z]
    return min(abs(m - g.top_p) for m in masses)


def check_row(logits_V: torch.Tensor, g: GenerationConfig, atol: float = 1e-5) -> set[int]:
    """process_logits' allowed set and log-probs of one row equal the reference's."""
    got = torch.log_softmax(process_logits(logits_V[None], g), -1)[0]
    want = reference_logprobs(logits_V.double().tolist(), g)
    allowed = set(torch.isfinite(got).nonzero().flatten().tolist())
    assert allowed == set(want), (sorted(allowed), sorted(want))
    for i, lp in want.items():
        assert abs(float(got[i]) - lp) < atol, (i, float(got[i]), lp)
    return allowed


CONFIGS = [
    GenerationConfig(temperature=1.0),
    GenerationConfig(temperature=0.6),
    GenerationConfig(temperature=1.7, top_k=1),
    GenerationConfig(top_k=7),
    GenerationConfig(temperature=0.8, top_k=7),
    GenerationConfig(top_p=0.3),
    GenerationConfig(top_p=0.9),
    GenerationConfig(temperature=1.5, top_p=0.75),
    GenerationConfig(temperature=0.7, top_k=12, top_p=0.6),
    GenerationConfig(temperature=1.3, top_k=4, top_p=0.95),
    GenerationConfig(temperature=0.5, top_k=30, top_p=0.99),
    GenerationConfig(greedy=True, temperature=0.5, top_k=3, top_p=0.2),
]


@pytest.mark.parametrize("g", CONFIGS, ids=lambda g: f"T{g.temperature}-k{g.top_k}-p{g.top_p}")
def test_filters_match_reference_on_random_logits(g):
    gen = torch.Generator().manual_seed(0)
    n_checked = 0
    for _ in range(40):
        logits = torch.randn(50, generator=gen) * 2.5
        if g.top_p < 1.0 and top_p_margin(logits.double().tolist(), g) < 1e-4:
            continue  # too close to the boundary for a float32 / float64 comparison
        check_row(logits, g)
        n_checked += 1
    assert n_checked >= 30


@pytest.mark.parametrize("g", CONFIGS[:-1], ids=lambda g: f"T{g.temperature}-k{g.top_k}-p{g.top_p}")
def test_filters_match_transformers_warpers(g):
    """transformers applies temperature, then top-k, then top-p (min_tokens_to_keep=1, which
    top_p > 0 implies anyway); on tie-free rows the kept sets and log-probs agree."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    gen = torch.Generator().manual_seed(1)
    logits_BV = torch.randn(64, 50, generator=gen) * 2.5
    keep = [g.top_p >= 1.0 or top_p_margin(r.double().tolist(), g) > 1e-4 for r in logits_BV]
    logits_BV = logits_BV[torch.tensor(keep)]
    scores = logits_BV.clone()
    if g.temperature != 1.0:
        scores = TemperatureLogitsWarper(g.temperature)(None, scores)
    if g.top_k > 0:
        scores = TopKLogitsWarper(g.top_k)(None, scores)
    if g.top_p < 1.0:
        scores = TopPLogitsWarper(g.top_p)(None, scores)
    want = torch.log_softmax(scores, -1)
    got = torch.log_softmax(process_logits(logits_BV, g), -1)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], atol=1e-5, rtol=0)


def dyadic_logits() -> torch.Tensor:
    """Logits whose float32 softmax is exactly [1/2, 1/4, 1/8, 1/16, 1/16]: masses of more
    probable tokens are then exact, so top_p can sit exactly on a boundary."""
    ln2 = math.log(2.0)
    logits = torch.tensor([0.0, -ln2, -2 * ln2, -3 * ln2, -3 * ln2])
    probs = torch.softmax(logits, -1)
    assert probs.tolist() == [0.5, 0.25, 0.125, 0.0625, 0.0625], "float32 exp is not exact here"
    return logits


@pytest.mark.parametrize(
    "top_p,kept",
    [
        (0.5, {0}),  # token 0 alone has mass 1/2: reaching top_p exactly is enough
        (0.5 + 1e-6, {0, 1}),
        (0.75, {0, 1}),
        (0.75 + 1e-6, {0, 1, 2}),
        (0.875, {0, 1, 2}),
        (0.875 + 1e-6, {0, 1, 2, 3, 4}),  # 3 and 4 tie: both kept
        (1.0, {0, 1, 2, 3, 4}),
    ],
)
def test_top_p_keeps_the_smallest_prefix_reaching_top_p(top_p, kept):
    assert check_row(dyadic_logits(), GenerationConfig(top_p=top_p)) == kept


def test_ties_at_the_kth_value_and_at_the_top_p_boundary_are_all_kept():
    logits = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0, -1.0])
    assert check_row(logits, GenerationConfig(top_k=2)) == {0, 1, 2, 3}
    assert check_row(logits, GenerationConfig(top_k=4)) == {0, 1, 2, 3}
    assert check_row(logits, GenerationConfig(top_k=5)) == {0, 1, 2, 3, 4}
    # p = [0.73, 0.099 x 3, 0.036, 0.013]: the boundary falls inside the tied group.
    p0 = float(torch.softmax(logits, -1)[0])
    for top_p in (p0 + 1e-4, p0 + 0.1, p0 + 0.2):
        assert check_row(logits, GenerationConfig(top_p=top_p)) == {0, 1, 2, 3}
    # The tied tokens sit at different positions of the vocabulary: order does not matter.
    shuffled = torch.tensor([1.0, -1.0, 3.0, 0.0, 1.0, 1.0])
    assert check_row(shuffled, GenerationConfig(top_p=p0 + 1e-4)) == {0, 2, 4, 5}


def test_top_p_near_zero_keeps_the_argmax_and_one_keeps_everything():
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        logits = torch.randn(40, generator=gen)
        assert check_row(logits, GenerationConfig(top_p=1e-6)) == {int(logits.argmax())}
        assert check_row(logits, GenerationConfig(top_p=1.0)) == set(range(40))
    tied_max = torch.tensor([2.0, 0.5, 2.0, -1.0])
    assert check_row(tied_max, GenerationConfig(top_p=1e-6)) == {0, 2}
    # Already-masked tokens (-inf, e.g. a stop token under min_new_tokens) stay masked.
    masked = torch.tensor([1.0, -math.inf, 0.5, 0.0])
    assert check_row(masked, GenerationConfig(top_p=1.0)) == {0, 2, 3}
    assert check_row(masked, GenerationConfig(top_k=3)) == {0, 2, 3}


@pytest.mark.parametrize(
    "g",
    [
        GenerationConfig(temperature=0.7),
        GenerationConfig(temperature=1.2, top_k=3),
        GenerationConfig(top_p=0.8),
        GenerationConfig(temperature=0.9, top_k=4, top_p=0.7),
    ],
    ids=["temp", "topk", "topp", "all"],
)
def test_sample_tokens_draws_from_the_reference_distribution(g):
    """Empirical frequencies of 40000 draws match the reference probabilities (5 standard
    errors); filtered tokens are never drawn; the returned log-probs are the reference's."""
    logits = torch.tensor([1.5, 0.2, -0.3, 1.1, 0.9, -2.0])
    want = reference_logprobs(logits.double().tolist(), g)
    n = 40_000
    tokens, logps = sample_tokens(logits.expand(n, -1), g, torch.Generator().manual_seed(3))
    counts = torch.bincount(tokens, minlength=logits.numel()).double() / n
    for i in range(logits.numel()):
        p = math.exp(want[i]) if i in want else 0.0
        assert abs(float(counts[i]) - p) <= 5 * math.sqrt(p * (1 - p) / n), (i, counts[i], p)
    ref_lp = torch.tensor([want[int(t)] for t in tokens], dtype=torch.float64)
    torch.testing.assert_close(logps.double(), ref_lp, atol=1e-5, rtol=0)


def test_greedy_takes_the_argmax_with_the_plain_softmax_logprob():
    logits_BV = torch.randn(8, 30, generator=torch.Generator().manual_seed(4))
    g = GenerationConfig(greedy=True, temperature=0.3, top_k=2, top_p=0.1)
    tokens, logps = sample_tokens(logits_BV, g, None)
    assert torch.equal(tokens, logits_BV.argmax(-1))
    for b in range(8):
        want = reference_logprobs(logits_BV[b].double().tolist(), g)[int(tokens[b])]
        assert float(logps[b]) == pytest.approx(want, abs=1e-5)


def test_a_draw_takes_the_token_where_the_cumulative_probability_passes_u():
    """At u = 0 the first allowed token in vocabulary order, at the largest u below 1 the last
    allowed one (never the filtered tokens around them), and in between the token whose
    cumulative interval holds u (intervals computed here from the reference probabilities)."""
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0, 0.1]])
    g = GenerationConfig(top_k=2)  # keeps tokens 1 and 3
    want = reference_logprobs(logits[0].double().tolist(), g)
    p1 = math.exp(want[1])
    below_one = torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0))
    cases = [(0.0, 1), (p1 * 0.999, 1), (p1 * 1.001, 3), (float(below_one), 3)]
    for u, token in cases:
        u_B = torch.tensor([u], dtype=torch.float64)
        tokens, logps = sample_tokens(logits, g, None, u_B)
        assert int(tokens[0]) == token, (u, int(tokens[0]))
        assert float(logps[0]) == pytest.approx(want[token], abs=1e-6)
