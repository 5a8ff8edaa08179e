"""Packed (realflow) vs padded (HF transformers) forward+backward throughput on CPU.

    .venv/bin/python benchmarks/bench_packing.py [--layers 8 --hidden 512 --batches 3]

Table 1 times the CPU attention backends on the same packed q/k/v (forward+backward).
Table 2 times one forward+backward (next-token cross-entropy) of the same llama model, realflow
packed vs transformers padded with an attention mask, over the same batches of sequences whose
lengths follow a long-tailed (log-normal) mix. Each side runs in its own subprocess so that its
peak RSS (resource.getrusage maxrss) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def long_tailed_lengths(n: int, seed: int, median: float = 96, sigma: float = 0.9, cap: int = 1024):
    """n lengths ~ LogNormal(log(median), sigma), clipped to [8, cap]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) * sigma + torch.log(torch.tensor(median)))
    return [int(v) for v in x.clamp(8, cap)]


def batches(args) -> list[list[int]]:
    return [long_tailed_lengths(args.batch, seed=100 + i) for i in range(args.batches)]


def model_config(args):
    from realflow.models.builtin import builtin_config

    return builtin_config(
        "small-llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        n_layers=args.layers,
        n_heads=args.hidden // 64,
        n_kv_heads=max(1, args.hidden // 128),
        intermediate_size=args.hidden * 11 // 4,
    )


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------ attention backends


def attention_table(args) -> None:
    from realflow.models.attention import ATTN_BACKENDS, PackedSeqs, varlen_attention

    print("\n## attention backends (H=8, K=4, D=64, forward+backward, fastest of 6, ms)\n")
    print(
        "| backend | "
        + " | ".join(f"batch {i} (T={sum(b)}, B={len(b)})" for i, b in enumerate(batches(args)))
        + " |"
    )
    print("|---|" + "---|" * args.batches)
    impls = [i for i in ATTN_BACKENDS if i not in ("flash", "torch_varlen")]  # CUDA kernels
    best = {impl: [float("inf")] * args.batches for impl in impls}
    for i, lens in enumerate(batches(args)):
        t = sum(lens)
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lens).cumsum(0)
        q = torch.randn(t, 8, 64, requires_grad=True)
        k = torch.randn(t, 4, 64, requires_grad=True)
        v = torch.randn(t, 4, 64, requires_grad=True)
        for _ in range(6):  # rounds interleave the backends; keep each one's fastest
            for impl in impls:
                start = time.perf_counter()
                seqs = PackedSeqs.from_cu_seqlens(cu)  # per call: sdpa_bucketed's plan included
                varlen_attention(q, k, v, seqs, impl, 0.125).sum().backward()
                best[impl][i] = min(best[impl][i], time.perf_counter() - start)
    for impl in impls:
        print(f"| {impl} | " + " | ".join(f"{x * 1e3:.1f}" for x in best[impl]) + " |")


# ------------------------------------------------------------------------------ model sides


def serve_side(side: str, args) -> None:
    """Subprocess loop: build one side, then run the step named on each stdin line.

    The parent alternates between the two sides step by step, so both see the same background
    load (this machine is shared); the line "done" makes the side print its peak RSS.
    """
    from realflow.models.families import family_for_config
    from realflow.models.transformer import PackedTransformer

    torch.manual_seed(0)
    cfg = model_config(args)
    model = PackedTransformer(cfg).train()
    if side == "hf":
        import transformers

        family = family_for_config(cfg)
        hf_cfg = transformers.LlamaConfig(**family.config_to_hf(cfg))
        hf = transformers.LlamaForCausalLM(hf_cfg).train()
        hf.load_state_dict(family.state_dict_to_hf(model.state_dict(), cfg, "lm"))
        model = hf
    data = [_make_batch(lens, cfg.vocab_size, i) for i, lens in enumerate(batches(args))]
    step = _hf_step if side == "hf" else _packed_step
    base_rss = maxrss_mb()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "done":
            peak = maxrss_mb()
            print(
                json.dumps({"peak_rss_mb": peak, "peak_minus_model_rss_mb": peak - base_rss}),
                flush=True,
            )
            return
        start = time.perf_counter()
        step(model, data[int(cmd[1])])
        print(time.perf_counter() - start, flush=True)


def run_sides(args) -> dict:
    """Fastest step time per batch and peak RSS of each side, steps alternating between sides.

    The fastest of `reps` runs is the least disturbed by other processes on a shared machine.
    """
    procs = {}
    for side in ("realflow", "hf"):
        cmd = [sys.executable, __file__, "--side", side] + sys.argv[1:]
        procs[side] = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert procs[side].stdout.readline().strip() == "ready"
    times: dict[str, list[list[float]]] = {s: [[] for _ in range(args.batches)] for s in procs}
    for rep in range(args.reps + 1):  # rep 0 is a warm-up
        for i in range(args.batches):
            for side, proc in procs.items():
                proc.stdin.write(f"step {i}\n")
                proc.stdin.flush()
                elapsed = float(proc.stdout.readline())
                if rep:
                    times[side][i].append(elapsed)
    lens_all = batches(args)
    real = sum(sum(lens) for lens in lens_all)
    results = {}
    for side, proc in procs.items():
        proc.stdin.write("done\n")
        proc.stdin.flush()
        mem = json.loads(proc.stdout.readline())
        proc.wait()
        seconds = sum(min(t) for t in times[side])
        results[side] = {"seconds": seconds, "tokens_per_s": real / seconds, **mem}
    return results


def _make_batch(lens, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lens),), generator=g)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    width = max(lens)
    padded = torch.zeros(len(lens), width, dtype=torch.long)
    mask = torch.zeros(len(lens), width, dtype=torch.long)
    for b, n in enumerate(lens):
        padded[b, :n] = ids[cu[b] : cu[b + 1]]
        mask[b, :n] = 1
    return ids, cu, padded, mask


def _packed_step(model, batch):
    ids, cu, _, _ = batch
    logits = model(ids, cu)
    # Next-token targets inside each sequence; the last token of a sequence has none.
    labels = torch.roll(ids, -1)
    labels[cu[1:].long() - 1] = -100
    torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100).backward()
    model.zero_grad(set_to_none=True)


def _hf_step(model, batch):
    _, _, padded, mask = batch
    labels = padded.masked_fill(mask == 0, -100)
    model(input_ids=padded, attention_mask=mask, labels=labels).loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16, help="sequences per batch")
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--side", choices=["realflow", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--skip-attention", action="store_true")
    args = p.parse_args()
    if args.side:
        serve_side(args.side, args)
        return
    lens_all = batches(args)
    ratio = sum(len(b) * max(b) for b in lens_all) / sum(sum(b) for b in lens_all)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"model: llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}")
    for i, b in enumerate(lens_all):
        print(f"batch {i}: {len(b)} seqs, lengths {sorted(b)}")
    print(f"padding ratio (padded tokens / real tokens): {ratio:.2f}")
    if not args.skip_attention:
        attention_table(args)
    results = run_sides(args)
    print("\n## forward+backward, real tokens/s\n")
    print(
        "| side | seconds (sum over batches of the fastest step) | real tokens/s | peak RSS MB | peak - after-build RSS MB |"
    )
    print("|---|---|---|---|---|")
    for side, r in results.items():
        print(
            f"| {side} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} "
            f"| {r['peak_minus_model_rss_mb']:.0f} |"
        )
    speedup = results["realflow"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    print(
        f"\nspeedup {speedup:.2f}x; padding ratio {ratio:.2f}; speedup / ratio = {speedup / ratio:.0%}"
    )


if __name__ == "__main__":
    main()
