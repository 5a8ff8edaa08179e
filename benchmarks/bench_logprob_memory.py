"""Peak memory of per-token log-probs + backward over bf16 logits: the plain fp32 log-softmax
vs realflow's chunked one (realflow/algorithms/chunked.py). CPU: each case runs in a fresh
process and reports its peak RSS above the bf16 logits (their bf16 gradient, which any
backward makes, is counted in both).

    python benchmarks/bench_logprob_memory.py [--tokens 4096] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import logging
import resource
import subprocess
import sys

logger = logging.getLogger("bench_logprob_memory")


def _case(name: str, tokens: int, vocab: int) -> None:
    import torch

    from realflow.algorithms.chunked import rows_logprobs

    # made in bf16 directly: an fp32 temporary would raise the baseline peak
    logits = torch.randn(tokens, vocab, dtype=torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,))
    rows = torch.arange(tokens)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if name == "plain":
        out = torch.log_softmax(logits.float(), -1).gather(1, labels[:, None]).squeeze(1)
    else:
        out = rows_logprobs(logits, rows, labels)
    out.sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{(peak - base) / 1024:.0f}")  # ru_maxrss is in KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--case", choices=("plain", "chunked"))
    a = p.parse_args()
    if a.case:
        _case(a.case, a.tokens, a.vocab)
        return
    fp32 = a.tokens * a.vocab * 4 / 2**20
    print(f"tokens {a.tokens}, vocab {a.vocab}: one fp32 [T, V] tensor is {fp32:.0f} MiB")
    print("| case | peak RSS above the logits (MiB) |\n| --- | ---: |")
    for case in ("plain", "chunked"):
        cmd = [
            sys.executable,
            __file__,
            "--case",
            case,
            f"--tokens={a.tokens}",
            f"--vocab={a.vocab}",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        print(f"| {case} | {out} |")


if __name__ == "__main__":
    main()
