"""Adapters, measured: the memory a shared reference model saves, and merged vs adapter-path
generation.

    .venv/bin/python benchmarks/bench_tuners.py memory [--hidden 1024 --layers 12]
    .venv/bin/python benchmarks/bench_tuners.py generation [--hidden 1024 --layers 12]

`memory`: a random llama checkpoint (the built-in tokenizer, `--hidden`/`--layers`) is written
once; `python -m realflow.quickstart dpo` then runs 2 steps on it with `actor.lora.rank=16`,
once with `ref.base_of=actor` (the ref is the actor's base weights, adapters disabled) and once
with a separate ref, each in its own process. Printed: the parameters each process holds
(counted on the workers' models after setup) and the process's peak RSS.

`generation`: one LoRA model (r=16 on every projection), greedy generation of `--new` tokens for
`--batch` prompts of 16-48 tokens, timed through `TrainEngine.forward_generate` with
`generate_merged` true (the adapters merged into a temporary copy, merge time included) and
false (through peft's adapter layers), and the same model without adapters as a floor; the
best of `--repeat` runs each, alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_checkpoint(path: str, hidden: int, layers: int) -> None:
    from realflow.data.tokenizer import load_tokenizer
    from realflow.models.builtin import builtin_config
    from realflow.models.hf_io import save_hf
    from realflow.models.transformer import PackedTransformer

    tok = load_tokenizer("builtin")
    cfg = builtin_config(
        "small-llama",
        vocab_size=len(tok),
        hidden_size=hidden,
        n_layers=layers,
        n_heads=hidden // 64,
        n_kv_heads=hidden // 128,
        intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    save_hf(PackedTransformer(cfg, "lm"), path, tok, torch.float32)


CHILD = """
import json, resource, sys
from realflow.api.config import apply_overrides
from realflow.experiments.dpo import DPOConfig
from realflow.system import runner, transport
held = {}
setup = transport.LocalTransport.call_all
def counting(self, workers, kind, payload=None):
    out = setup(self, workers, kind, payload)
    if kind.value == "setup":
        for w in self.workers:
            for name, m in w.models.items():
                module = getattr(m.module, "module", None)
                if module is not None and name not in held:
                    own = getattr(m.module, "owner", None) is None
                    held[name] = sum(p.numel() for p in module.parameters()) if own else 0
    return out
transport.LocalTransport.call_all = counting
cfg = apply_overrides(DPOConfig, sys.argv[1:])
runner.run("dpo", cfg)
print(json.dumps({"params": held, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def memory(args: argparse.Namespace) -> None:
    root = tempfile.mkdtemp(prefix="realflow-bench-tuners-")
    ckpt = os.path.join(root, "base")
    write_checkpoint(ckpt, args.hidden, args.layers)
    common = [
        f"actor.path={ckpt}", f"ref.path={ckpt}", "actor.lora.rank=16", "total_steps=2",
        "n_seqs=4", "dataset.max_length=64", "tensorboard=false", "progress_bar=false",
    ]  # fmt: skip
    print(f"model: hidden {args.hidden}, {args.layers} layers (fp32 weights)")
    print(
        f"{'ref':<22}{'actor params':>14}{'ref params':>12}{'params MiB':>12}{'peak RSS MiB':>14}"
    )
    for label, extra in (("ref.base_of=actor", ["ref.base_of=actor"]), ("separate ref", [])):
        out = os.path.join(root, label.replace(" ", "_").replace("=", "_"))
        cmd = [sys.executable, "-c", CHILD, *common, *extra, f"output_dir={out}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        p = r["params"]
        mib = 4 * (p["actor"] + p["ref"]) / 2**20
        print(
            f"{label:<22}{p['actor']:>14,}{p['ref']:>12,}{mib:>12.0f}{r['peak_rss_mib']:>14.0f}",
            flush=True,
        )


KINDS = ("merged (incl. merge)", "adapter layers", "no adapters")


def generation(args: argparse.Namespace) -> None:
    from realflow.engines import EngineConfig, OptimizerConfig, build_train_engine
    from realflow.engines.config import AdapterSpec
    from realflow.engines.tuners import apply_adapters
    from realflow.models.builtin import builtin_config
    from realflow.models.generation import GenerationConfig, generate
    from realflow.models.transformer import PackedTransformer

    torch.set_num_threads(args.threads)
    cfg = builtin_config(
        "small-llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        n_layers=args.layers,
        n_heads=args.hidden // 64,
        n_kv_heads=max(1, args.hidden // 128),
        intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
    )
    engines = {}
    for kind in KINDS:
        torch.manual_seed(0)
        module = PackedTransformer(cfg, "lm")
        if kind != "no adapters":
            spec = AdapterSpec("lora", ("all-linear",), {"r": args.rank})
            apply_adapters(module, spec, 0, "")
        merged = kind.startswith("merged")
        engine_cfg = EngineConfig(generate_merged=merged)
        engines[kind] = build_train_engine(module, engine_cfg, OptimizerConfig(), 10)
        with torch.no_grad():  # a trained-looking adapter (B is zero at init)
            for n, p in module.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(3)
    lens = torch.randint(16, 49, (args.batch,), generator=g)
    ids = torch.randint(3, args.vocab, (int(lens.sum()),), generator=g)
    cu = torch.nn.functional.pad(lens.cumsum(0).to(torch.int32), (1, 0))
    gconfig = GenerationConfig(max_new_tokens=args.new, greedy=True, eos_token_ids=[])
    best = dict.fromkeys(KINDS, float("inf"))
    for _ in range(args.repeat):
        for kind, engine in engines.items():
            t0 = time.perf_counter()
            engine.forward_generate(lambda m: generate(m, ids, cu, gconfig))
            best[kind] = min(best[kind], time.perf_counter() - t0)
    n_tok = args.batch * args.new
    print(
        f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, LoRA r={args.rank} on "
        f"every projection, batch {args.batch}, {args.new} new tokens, {args.threads} threads"
    )
    for kind in KINDS:
        print(f"  {kind:<22}{best[kind]:>8.2f} s {n_tok / best[kind]:>10.0f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("memory", "generation"))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    memory(args) if args.what == "memory" else generation(args)


if __name__ == "__main__":
    main()
