"""Generation throughput on CPU: realflow packed generate vs transformers `generate` (KV cache).

    .venv/bin/python benchmarks/bench_generation.py [--layers 8 --hidden 512 --batch 32 --new 128]

Same random-init llama model on both sides, the same 32 prompts of mixed (log-normal) lengths,
sampling with temperature 1 and top-k 50, up to 128 new tokens. Two scenarios:

- `eos`: the EOS row of the LM head is set (calibrated by bisection on short runs) so that about
  1 token in 64 is EOS (a random model otherwise never stops), giving roughly geometric answer
  lengths like real rollouts;
- `no-eos`: nothing stops before 128 tokens (pure per-step cost, no early-exit advantage).

Each side runs in its own subprocess (peak RSS is its own); runs alternate between the sides so
both see the same background load. Throughput counts generated tokens up to and including EOS.
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

EOS, PAD = 2, 0


def prompt_lengths(n: int, seed: int = 7, median: float = 64, sigma: float = 0.7, cap: int = 256):
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) * sigma + torch.log(torch.tensor(median)))
    return [int(v) for v in x.clamp(8, cap)]


def build_model(args, eos_alpha: float = 0.0):
    """The realflow model; `eos_alpha` > 0 points the EOS row of lm_head along the mean final
    hidden state with that norm (a random model otherwise never emits EOS)."""
    from realflow.models.builtin import builtin_config
    from realflow.models.transformer import PackedTransformer

    cfg = builtin_config(
        "small-llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        n_layers=args.layers,
        n_heads=args.hidden // 64,
        n_kv_heads=max(1, args.hidden // 128),
        intermediate_size=args.hidden * 11 // 4,
        eos_token_id=EOS,
        bos_token_id=1,
        pad_token_id=PAD,
    )
    torch.manual_seed(0)
    model = PackedTransformer(cfg).eval()
    if eos_alpha > 0:
        with torch.no_grad():
            model.lm_head.weight[EOS] = eos_alpha * _mean_direction(model)
    return model


@torch.no_grad()
def _mean_direction(model) -> torch.Tensor:
    from realflow.models.attention import PackedSeqs

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (8 * 64,), generator=g)
    seqs = PackedSeqs.from_cu_seqlens(torch.arange(0, 8 * 64 + 1, 64, dtype=torch.int32))
    mean = model.hidden_states(ids, seqs).mean(0)
    return mean / mean.norm()


def calibrate_eos_alpha(args, hazard: float = 1 / 64) -> float:
    """The EOS-row norm at which sampling stops at ~`hazard` per generated token (bisection on
    short realflow runs; the timed runs of both sides then use this same model)."""
    from realflow.models.generation import GenerationConfig, generate

    lens = prompt_lengths(16, seed=11)
    ids = torch.randint(3, args.vocab, (sum(lens),), generator=torch.Generator().manual_seed(5))
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    gconfig = GenerationConfig(max_new_tokens=48, top_k=50, eos_token_ids=[EOS])
    lo, hi = 0.0, 200.0
    for _ in range(10):
        alpha = (lo + hi) / 2
        out = generate(build_model(args, alpha), ids, cu, gconfig, torch.Generator().manual_seed(0))
        rate = float((~out.no_eos_mask_B).sum()) / out.output_ids_T.numel()
        lo, hi = (alpha, hi) if rate < hazard else (lo, alpha)
    return (lo + hi) / 2


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def serve_side(side: str, scenario: str, args) -> None:
    """Subprocess loop: build one side, then run generate on each stdin line "run <seed>"."""
    model = build_model(args, args.eos_alpha if scenario == "eos" else 0.0)
    lens = prompt_lengths(args.batch)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, args.vocab, (sum(lens),), generator=g)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    eos = [EOS] if scenario == "eos" else []
    if side == "hf":
        run = _hf_runner(model, ids, cu, eos, args)
    else:
        run = _realflow_runner(model, ids, cu, eos, args)
    base = maxrss_mb()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "done":
            peak = maxrss_mb()
            print(
                json.dumps({"peak_rss_mb": peak, "peak_minus_model_rss_mb": peak - base}),
                flush=True,
            )
            return
        start = time.perf_counter()
        n_tokens = run(int(cmd[1]))
        print(json.dumps({"seconds": time.perf_counter() - start, "tokens": n_tokens}), flush=True)


def _realflow_runner(model, ids, cu, eos, args):
    from realflow.models.generation import GenerationConfig, generate

    gconfig = GenerationConfig(max_new_tokens=args.new, top_k=50, eos_token_ids=eos)

    def run(seed: int) -> int:
        out = generate(model, ids, cu, gconfig, generator=torch.Generator().manual_seed(seed))
        return int(out.output_ids_T.numel())

    return run


def _hf_runner(model, ids, cu, eos, args):
    import transformers

    from realflow.models.families import family_for_config

    family = family_for_config(model.config)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**family.config_to_hf(model.config))
    )
    hf.load_state_dict(family.state_dict_to_hf(model.state_dict(), model.config, "lm"))
    hf.eval()
    lens = (cu[1:] - cu[:-1]).tolist()
    width = max(lens)
    padded = torch.full((len(lens), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(lens), width, dtype=torch.long)
    for b, n in enumerate(lens):  # left padding, as HF generation requires
        padded[b, width - n :] = ids[cu[b] : cu[b + 1]]
        mask[b, width - n :] = 1

    def run(seed: int) -> int:
        torch.manual_seed(seed)
        with torch.no_grad():
            out = hf.generate(
                padded,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=50,
                top_p=1.0,
                max_new_tokens=args.new,
                min_new_tokens=0,
                eos_token_id=eos or None,
                pad_token_id=PAD,
            )[:, width:]
        n = 0
        for row in out.tolist():  # real tokens: up to and including the first EOS
            n += next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        return n

    return run


def run_scenario(scenario: str, args) -> dict:
    procs = {}
    for side in ("realflow", "hf"):
        cmd = [sys.executable, __file__, "--side", side, "--scenario", scenario]
        cmd += ["--eos-alpha", str(args.eos_alpha)] + sys.argv[1:]
        procs[side] = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert procs[side].stdout.readline().strip() == "ready"
    runs: dict[str, list[dict]] = {s: [] for s in procs}
    for rep in range(args.reps + 1):  # rep 0 warms up
        for side, proc in procs.items():
            proc.stdin.write(f"run {rep}\n")
            proc.stdin.flush()
            r = json.loads(proc.stdout.readline())
            if rep:
                runs[side].append(r)
    results = {}
    for side, proc in procs.items():
        proc.stdin.write("done\n")
        proc.stdin.flush()
        mem = json.loads(proc.stdout.readline())
        proc.wait()
        best = max(runs[side], key=lambda r: r["tokens"] / r["seconds"])
        results[side] = {
            "tokens_per_s": best["tokens"] / best["seconds"],
            "seconds": best["seconds"],
            "tokens": best["tokens"],
            **mem,
        }
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--scenarios", default="eos,no-eos")
    p.add_argument("--side", choices=["realflow", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--scenario", help=argparse.SUPPRESS)
    p.add_argument("--eos-alpha", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        serve_side(args.side, args.scenario, args)
        return
    lens = prompt_lengths(args.batch)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"model: llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}")
    print(
        f"{args.batch} prompts, lengths {sorted(lens)} (sum {sum(lens)}, padded {len(lens) * max(lens)})"
    )
    print(
        f"sampling T=1.0 top-k 50, max {args.new} new tokens, best of {args.reps} runs (different seeds)\n"
    )
    if "eos" in args.scenarios.split(","):
        args.eos_alpha = calibrate_eos_alpha(args)
        print(f"eos scenario: EOS row norm {args.eos_alpha:.2f} (~1 token in 64 is EOS)\n")
    print(
        "| scenario | side | generated tokens (best run) | seconds | tokens/s | peak RSS MB | peak - after-build RSS MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for scenario in args.scenarios.split(","):
        res = run_scenario(scenario, args)
        for side, r in res.items():
            print(
                f"| {scenario} | {side} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} "
                f"| {r['peak_rss_mb']:.0f} | {r['peak_minus_model_rss_mb']:.0f} |"
            )
        speedup = res["realflow"]["tokens_per_s"] / res["hf"]["tokens_per_s"]
        print(f"| {scenario} | speedup | | | {speedup:.2f}x | | |")


if __name__ == "__main__":
    main()
