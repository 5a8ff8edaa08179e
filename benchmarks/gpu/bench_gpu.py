"""GPU benchmark of issue 9's workloads on one CUDA GPU: realflow vs HF transformers, bf16, a
random-init Qwen2-0.5B-shaped model (realflow.models.builtin "qwen2-0.5b": hidden 896, 24
layers, 14/2 heads, vocab 151936, tied).

    python benchmarks/gpu/bench_gpu.py --out DIR [--cases train generate ...] [--budget-s 270]
    python benchmarks/gpu/bench_gpu.py --dry --out DIR
        (CPU, tiny sizes: every case's code path in seconds; its figures mean nothing)

Cases (each guarded: a failure is recorded under its name and the next case runs; a case that
would start after --budget-s is skipped). Timed sides run after a warm-up, median of --reps;
peak memory is torch.cuda.max_memory_allocated over the side; `gpu_util` is nvidia-smi's mean
utilisation while the case ran.
- `attention`: each varlen backend alone, fwd+bwd on the `train` batch's lengths.
- `train`: packed fwd+bwd of 48 long-tailed sequences (log-normal lengths, ~9.7k real tokens),
  loss = mean token NLL. realflow: the packed model and gather_packed_logprobs; HF: the
  right-padded batch with SDPA. MFU = 6 * params * real tokens / time / 790 TFLOP/s (H200
  dense bf16). Targets (issue 9): MFU >= 35%, speed-up >= 80% of the padding ratio.
- `generate`: 64 prompts of 32-256 tokens, 256 new tokens, sampling, no EOS. realflow samples
  the full vocabulary (RL needs the log-probs of the distribution sampled from): the static
  engine (CUDA graphs) on bf16 weights, the same on fp32 weights under bf16 autocast (how a
  trained actor generates), and the eager engine; HF `generate` with top_k=50 (its fastest
  sampling, the fair baseline per GPU-NOTES) and top_k=0. Target: >= 10x HF top_k=50.
- `generate_eos`: the same prompts with 1/64 of the vocabulary as stop tokens (long-tailed
  answer lengths); realflow static vs HF top_k=50, tokens/s over the tokens each made.
- `offload`: `<role>.offload=true` engines over this model: a trained role (fp32 masters and
  AdamW state after one step) and an inference role (bf16): GiB freed by offload, seconds to
  move back.
- `grpo_step`: one GRPO experiment through realflow's runner, every role on one GPU: 16 prompts
  x 8 answers of exactly 256 new tokens, KL 0.04 to a ref, 3 steps; step time, time per MFC
  (trace.json), peak memory per MFC (its stats), GPU utilisation. Peer: TRL 1.16 on the same
  GPU and workload, 9.09 s per step (GPU-NOTES, measured 2026-11-29; TRL is not installable
  on the device machine).

Writes DIR/bench_gpu.json after every case and prints a markdown table at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench_gpu")
PEAK_TFLOPS = 790.0
TRL_GRPO_STEP_S = 9.09  # GPU-NOTES: TRL 1.16 GRPO, same workload, same H200 kind
TINY = dict(hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128)


@dataclasses.dataclass
class Bench:
    """What every case reads: sizes, the two models (same weights) and where to write."""

    args: argparse.Namespace
    device: str
    ours: torch.nn.Module
    hf: torch.nn.Module
    model_dir: str  # the HF directory both were loaded from (with a tokenizer)
    n_params: int
    ours_fp32: torch.nn.Module  # the same weights in fp32 (a trained role's masters)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


# ------------------------------------------------------------------------------ helpers


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], reps: int, warmup: bool = True) -> dict[str, float]:
    """{seconds (median of `reps`, after one warm-up run unless `warmup` is False), peak_gib}."""
    if warmup:
        fn()
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return {"seconds": statistics.median(times), "peak_gib": peak}


def compare(
    sides: dict[str, Callable[[], object]], reps: int, n_tokens: int, warmup: bool = True
) -> dict:
    """Time every side; add tokens/s. One timing loop for realflow and HF alike. A side that
    fails is recorded as {"error": ...} and the others still run."""
    out = {}
    for name, fn in sides.items():
        try:
            r = timed(fn, reps, warmup)
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            logger.error("  %s failed:\n%s", name, traceback.format_exc())
            continue
        out[name] = {**r, "tok_per_s": n_tokens / r["seconds"]}
        logger.info("  %s: %.3f s, %.0f tok/s", name, r["seconds"], out[name]["tok_per_s"])
    return out


def ratio(out: dict, slow: str, fast: str) -> float | None:
    """seconds(slow) / seconds(fast), None when either side failed."""
    if "seconds" not in out.get(slow, {}) or "seconds" not in out.get(fast, {}):
        return None
    return out[slow]["seconds"] / out[fast]["seconds"]


@contextlib.contextmanager
def gpu_utilisation(into: dict):
    """Mean GPU utilisation (%) from `nvidia-smi -lms 100` while the block runs, into
    `into["gpu_util"]` (absent without nvidia-smi)."""
    smi = shutil.which("nvidia-smi")
    proc = None
    if smi:
        query = [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"]
        proc = subprocess.Popen(query, stdout=subprocess.PIPE, text=True)
    try:
        yield
    finally:
        if proc is not None:
            proc.terminate()
            out = proc.communicate(timeout=10)[0]
            samples = [float(x) for x in out.split() if x.strip().replace(".", "").isdigit()]
            if samples:
                into["gpu_util"] = statistics.mean(samples)


def lognormal_lengths(n: int, median: float, sigma: float, lo: int, hi: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) * sigma + torch.log(torch.tensor(median)))
    return [int(v) for v in x.clamp(lo, hi)]


def random_batch(lens: list[int], vocab: int, seed: int, device: str, left: bool):
    """(ids_T, cu_B1) packed and (ids_BL, mask_BL) padded (left for HF generation, right for
    training) of random tokens with the given lengths."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, vocab, (n,), generator=g) for n in lens]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    width = max(lens)
    padded = torch.zeros(len(lens), width, dtype=torch.long)
    mask = torch.zeros(len(lens), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        padded[b, cols], mask[b, cols] = s, 1
    return torch.cat(seqs).to(device), cu.to(device), padded.to(device), mask.to(device)


def train_lengths(a: argparse.Namespace) -> list[int]:
    return lognormal_lengths(a.train_seqs, median=128, sigma=1.0, lo=16, hi=a.max_len, seed=0)


# -------------------------------------------------------------------------------- cases


def case_attention(b: Bench) -> dict:
    from realflow.models.attention import (
        PackedSeqs,
        flash_attn_available,
        torch_varlen_params,
        varlen_attention,
    )

    lens = train_lengths(b.args)
    cfg = b.ours.config
    dtype = torch.bfloat16 if b.cuda else torch.float32
    t = sum(lens)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    cu = cu.to(b.device)
    q, k, v = (
        torch.randn(t, h, cfg.head_dim, device=b.device, dtype=dtype, requires_grad=True)
        for h in (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads)
    )
    impls = ["sdpa_bucketed", "sdpa_varlen"]
    impls += ["torch_varlen"] if b.cuda and torch_varlen_params() is not None else []
    impls += ["flash"] if b.cuda and flash_attn_available() else []

    def run(impl):
        def fn():
            seqs = PackedSeqs.from_cu_seqlens(cu)  # a fresh plan per call, as per forward
            varlen_attention(q, k, v, seqs, impl, cfg.head_dim**-0.5).sum().backward()

        return fn

    return {"tokens": t, **compare({impl: run(impl) for impl in impls}, b.args.reps, t)}


def case_train(b: Bench) -> dict:
    from realflow.algorithms import gather_packed_logprobs

    lens = train_lengths(b.args)
    ids_T, cu, padded, mask = random_batch(lens, b.ours.config.vocab_size, 1, b.device, False)

    def ours_step():
        b.ours.zero_grad(set_to_none=True)
        (-gather_packed_logprobs(b.ours(ids_T, cu), ids_T, cu).mean()).backward()

    def hf_step():
        b.hf.zero_grad(set_to_none=True)
        logits = b.hf(input_ids=padded, attention_mask=mask).logits
        pred = mask[:, 1:].bool()  # positions whose next token is real
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][pred].float(), padded[:, 1:][pred])
        loss.backward()

    def bucketed_step():  # the fallback kernel, for comparison (attn_impl="auto" is above)
        auto, b.ours.config.attn_impl = b.ours.config.attn_impl, "sdpa_bucketed"
        try:
            ours_step()
        finally:
            b.ours.config.attn_impl = auto

    real, pad = sum(lens), padded.numel()
    sides = {
        "realflow": ours_step,
        "realflow_sdpa_bucketed": bucketed_step,
        "hf_sdpa_padded": hf_step,
    }
    b.ours.train(), b.hf.train()
    try:
        out = compare(sides, b.args.reps, real)
    finally:
        b.ours.eval(), b.hf.eval()
        b.ours.zero_grad(set_to_none=True), b.hf.zero_grad(set_to_none=True)
    for side in out.values():
        if "seconds" in side:
            side["mfu"] = 6 * b.n_params * real / side["seconds"] / (PEAK_TFLOPS * 1e12)
    speedup = ratio(out, "hf_sdpa_padded", "realflow")
    return {
        **out,
        "attn_impl": _resolved_attn(b),
        "real_tokens": real,
        "padded_tokens": pad,
        "padding_ratio": pad / real,
        "speedup": speedup,
        "speedup_over_padding_ratio": speedup and speedup / (pad / real),
        "met_mfu_35": out["realflow"].get("mfu", 0) >= 0.35,
        "met_speedup_80pct_of_padding": bool(speedup and speedup >= 0.8 * pad / real),
    }


def _resolved_attn(b: Bench) -> str:
    from realflow.models.attention import resolve_attn_impl

    dtype = next(b.ours.parameters()).dtype
    return resolve_attn_impl(b.ours.config.attn_impl, torch.device(b.device), dtype)


def _gen_sides(b: Bench, stop_ids: list[int]) -> tuple[dict, int, int]:
    """(sides, prompts, new tokens): realflow and HF generation callables over one batch."""
    from realflow.models.generation import GenerationConfig, generate

    a = b.args
    lens = lognormal_lengths(a.prompts, median=96, sigma=0.6, lo=32, hi=256, seed=2)
    ids_T, cu, padded, mask = random_batch(lens, b.ours.config.vocab_size, 3, b.device, True)
    made = {}

    def ours(engine: str, model: torch.nn.Module, autocast: bool):
        g = GenerationConfig(max_new_tokens=a.new, eos_token_ids=stop_ids, engine=engine)
        ctx = (
            torch.autocast(b.device, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        )

        def run():
            with ctx:
                gen = torch.Generator(device=b.device).manual_seed(0)
                made["n"] = int(generate(model, ids_T, cu, g, gen).output_lens_B.sum())

        return run

    def hf(top_k: int):
        def run():
            with torch.no_grad():
                out = b.hf.generate(
                    padded,
                    attention_mask=mask,
                    do_sample=True,
                    top_k=top_k,
                    max_new_tokens=a.new,
                    min_new_tokens=0 if stop_ids else a.new,
                    eos_token_id=stop_ids or None,
                    pad_token_id=0,
                )
            new = out[:, padded.shape[1] :]
            stop = torch.isin(new, torch.tensor(stop_ids or [-1], device=new.device))
            first = torch.where(stop.any(1), stop.float().argmax(1) + 1, new.shape[1])
            made["n"] = int(first.sum())

        return run

    no_graphs = GenerationConfig(max_new_tokens=a.new, eos_token_ids=stop_ids, cuda_graphs=False)

    def ours_no_graphs():  # the static step run eagerly: what the graphs save
        gen = torch.Generator(device=b.device).manual_seed(0)
        generate(b.ours, ids_T, cu, dataclasses.replace(no_graphs, engine="static"), gen)

    sides = {
        "realflow_static_no_graphs": ours_no_graphs,  # first: it also warms the decode kernels
        "realflow_static": ours("static", b.ours, False),
        "realflow_static_fp32_autocast": ours("static", b.ours_fp32, True),
        "realflow_eager": ours("eager", b.ours, False),
        "hf_top_k50": hf(50),
    }
    if a.hf_top_k0:  # ~85 ms per step on an H200 (GPU-NOTES): 22 s for 256 steps
        sides["hf_top_k0"] = hf(0)
    return sides, made, len(lens)


def case_generate(b: Bench) -> dict:
    sides, _, n_prompts = _gen_sides(b, [])
    n_tokens = n_prompts * b.args.new
    # No warm-up run: the train case warmed the GPU, and each call captures its own graphs.
    out = compare(sides, b.args.gen_reps, n_tokens, warmup=False)
    for name, side in out.items():
        if "seconds" in side:
            side["speedup_vs_hf_top_k50"] = ratio(out, "hf_top_k50", name)
            side["ms_per_step"] = 1e3 * side["seconds"] / b.args.new
    speedup = ratio(out, "hf_top_k50", "realflow_static")
    return {
        **out,
        "prompts": n_prompts,
        "new_tokens": b.args.new,
        "met_10x": bool(speedup and speedup >= 10),
    }


def case_generate_eos(b: Bench) -> dict:
    v = b.ours.config.vocab_size
    stop_ids = list(range(3, v, 64))  # 1/64 of the vocabulary: mean answer ~64 tokens
    sides, made, n_prompts = _gen_sides(b, stop_ids)
    out = {}
    for name in ("realflow_static", "hf_top_k50"):
        made["n"] = 0
        out.update(compare({name: sides[name]}, b.args.gen_reps, 1, warmup=False))
        if "seconds" in out[name]:  # tokens/s over the tokens this side made
            out[name].update(tokens=made["n"], tok_per_s=made["n"] / out[name]["seconds"])
    rf, hf = out["realflow_static"], out["hf_top_k50"]
    if "tok_per_s" in rf and "tok_per_s" in hf:
        out["speedup_tok_per_s"] = rf["tok_per_s"] / hf["tok_per_s"]
    return {**out, "prompts": n_prompts, "max_new_tokens": b.args.new, "stop_ids": len(stop_ids)}


def case_offload(b: Bench) -> dict:
    import copy

    from realflow.algorithms import gather_packed_logprobs
    from realflow.api.data import SequenceSample
    from realflow.engines.config import EngineConfig, OptimizerConfig
    from realflow.engines.train import InferenceEngine, build_train_engine

    lens = train_lengths(b.args)[:8]
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(3, b.ours.config.vocab_size, (n,), generator=g) for n in lens]
    batch = SequenceSample.from_sequences(list(range(len(seqs))), {"ids": seqs})

    def loss_fn(module, mb):
        ids, cu = mb.data["ids"].to(b.device), mb.cu_seqlens("ids").to(b.device)
        return -gather_packed_logprobs(module(ids, cu), ids, cu).mean(), {}

    def measure(engine, warm: Callable[[object], object]) -> dict:
        warm(engine)
        sync()
        held = torch.cuda.memory_allocated() if b.cuda else 0
        t0 = time.perf_counter()
        engine.offload()
        sync()
        off_s = time.perf_counter() - t0
        after = torch.cuda.memory_allocated() if b.cuda else 0
        t0 = time.perf_counter()
        engine.onload()
        sync()
        return {
            "freed_gib": (held - after) / 2**30,
            "offload_s": off_s,
            "onload_s": time.perf_counter() - t0,
        }

    trained = build_train_engine(
        copy.deepcopy(b.ours_fp32),
        EngineConfig(bf16=True, offload=True),
        OptimizerConfig(),
        total_train_steps=10,
    )
    out = {"trained": measure(trained, lambda e: e.train_batch([batch], loss_fn, lambda mb: 1))}
    del trained
    module = copy.deepcopy(b.ours).requires_grad_(False)
    inference = InferenceEngine(module, EngineConfig(bf16=True, offload=True))
    out["inference"] = measure(inference, lambda e: None)
    del inference, module
    out["params"] = b.n_params
    return out


def case_grpo_step(b: Bench) -> dict:
    from realflow.experiments.grpo import GRPOConfig
    from realflow.system import runner

    a = b.args
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GRPOConfig(
            output_dir=str(Path(tmp) / "run"),
            total_steps=a.grpo_steps,
            n_seqs=a.grpo_prompts,
            device=b.device,
            tensorboard=False,
            progress_bar=False,
        )
        cfg.actor.path = b.model_dir
        cfg.grpo.group_size = a.grpo_answers
        cfg.grpo.kl_beta = 0.04
        cfg.grpo.n_minibatches = 1
        cfg.grpo.gen.max_new_tokens = cfg.grpo.gen.min_new_tokens = a.new
        cfg.allocation = {name: 0 for name in cfg.roles()}
        res = {}
        with gpu_utilisation(res):
            rows = runner.run("grpo", cfg).rows
        with open(Path(cfg.output_dir) / "trace.json") as f:
            events = [
                e for e in json.load(f)["traceEvents"] if e["ph"] == "X" and "version" in e["args"]
            ]
    steps = [r["time/step_s"] for r in rows]
    mfc_s: dict[str, list[float]] = {}
    for e in events:
        if e["args"]["step"] == rows[-1]["step"]:
            mfc_s.setdefault(e["name"], []).append(e["dur"] / 1e6)
    peaks = {k.split("/")[0]: v for k, v in rows[-1].items() if k.endswith("/peak_memory_gib")}
    last = steps[-1]
    return {
        **res,
        "step_s": steps,
        "last_step_s": last,
        "mfc_s_last_step": {k: sum(v) for k, v in mfc_s.items()},
        "peak_memory_gib": peaks,
        "peer_trl_step_s": TRL_GRPO_STEP_S,
        "speedup_vs_trl": TRL_GRPO_STEP_S / last,
        "prompts": a.grpo_prompts,
        "answers": a.grpo_answers,
        "new_tokens": a.new,
    }


CASES: dict[str, Callable[[Bench], dict]] = {
    "attention": case_attention,
    "train": case_train,
    "generate": case_generate,
    "generate_eos": case_generate_eos,
    "offload": case_offload,
    "grpo_step": case_grpo_step,
}


# --------------------------------------------------------------------------------- main


def build(a: argparse.Namespace, tmp: str) -> Bench:
    """Both models with the same random weights: a Qwen2-shaped built-in config saved as an HF
    directory (with the built-in tokenizer, for the GRPO run), loaded by realflow and HF."""
    import transformers

    from realflow.data.tokenizer import load_tokenizer
    from realflow.models.builtin import builtin_config
    from realflow.models.hf_io import load_hf, save_hf
    from realflow.models.transformer import PackedTransformer

    overrides = {**TINY, "vocab_size": 1000} if a.dry else {"vocab_size": a.vocab}
    if a.layers:
        overrides["n_layers"] = a.layers
    cfg = builtin_config("qwen2-0.5b", **overrides)
    torch.manual_seed(0)
    save_hf(PackedTransformer(cfg), tmp, load_tokenizer("builtin"), dtype=torch.bfloat16)
    dtype = "bfloat16" if a.device == "cuda" else "float32"
    ours = load_hf(tmp, dtype=dtype, device=a.device, load_tokenizer=False).model.eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, dtype))
    hf = hf.to(a.device).eval()
    n_params = sum(p.numel() for p in ours.parameters())
    fp32 = load_hf(tmp, dtype="float32", device=a.device, load_tokenizer=False).model.eval()
    return Bench(a, a.device, ours, hf, tmp, n_params, fp32)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--budget-s", type=float, default=270.0, help="start no case after this")
    p.add_argument("--dry", action="store_true", help="CPU, tiny sizes: a smoke test")
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=0, help="0: the config's (24)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--gen-reps", type=int, default=1)
    p.add_argument("--train-seqs", type=int, default=48)
    p.add_argument("--max-len", type=int, default=936, help="longest training sequence")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--hf-top-k0", action="store_true", help="also HF generate with top_k=0")
    p.add_argument("--grpo-prompts", type=int, default=16)
    p.add_argument("--grpo-answers", type=int, default=8)
    p.add_argument("--grpo-steps", type=int, default=3)
    a = p.parse_args()
    if a.dry:
        a.device, a.reps, a.gen_reps, a.train_seqs, a.prompts, a.new = "cpu", 1, 1, 4, 4, 6
        a.max_len = 64
        a.grpo_prompts, a.grpo_answers, a.grpo_steps = 2, 2, 1
    return a


def main() -> int:
    a = parse()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("realflow.models.static_decode").setLevel(logging.DEBUG)  # capture times
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU (or --dry for a CPU smoke test)")
    import transformers

    t0 = time.time()
    out_path = Path(a.out) / "bench_gpu.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "gpu": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "cases": {},
    }
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        bench = build(a, tmp)
        res["params"] = bench.n_params
        logger.info(
            "%s, %d parameters, built in %.0f s", res["gpu"], bench.n_params, time.time() - t0
        )
        for name in a.cases:
            if time.time() - t0 > a.budget_s:
                res["cases"][name] = {"skipped": f"past the {a.budget_s:.0f} s budget"}
                failed += 1
                continue
            logger.info("== %s", name)
            start = time.time()
            try:
                with gpu_utilisation(util := {}):
                    r = CASES[name](bench)
                res["cases"][name] = {**util, **r, "case_s": time.time() - start}
            except Exception as e:  # one case failing must not stop the others
                failed += 1
                res["cases"][name] = {
                    "error": f"{type(e).__name__}: {e}",
                    "case_s": time.time() - start,
                }
                logger.error("%s failed:\n%s", name, traceback.format_exc())
            out_path.write_text(json.dumps(res, indent=1, default=str))
    res["total_s"] = time.time() - t0
    out_path.write_text(json.dumps(res, indent=1, default=str))
    print(table(res))
    return 1 if failed else 0


def table(res: dict) -> str:
    """Markdown rows of the headline figures of every case that ran."""
    rows = [
        "| case | side | seconds | tokens/s | MFU | peak GiB | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for case, r in res["cases"].items():
        if "error" in r or "skipped" in r:
            rows.append(f"| {case} | | | | | | {r.get('error') or r.get('skipped')} |")
            continue
        for side, s in r.items():
            if isinstance(s, dict) and "error" in s:
                rows.append(f"| {case} | {side} | | | | | {s['error'][:200]} |")
            if isinstance(s, dict) and "seconds" in s:
                mfu = f"{100 * s['mfu']:.1f}%" if "mfu" in s else ""
                tps = f"{s['tok_per_s']:.0f}" if "tok_per_s" in s else ""
                rows.append(
                    f"| {case} | {side} | {s['seconds']:.3f} | {tps} | {mfu} | {s['peak_gib']:.1f} | |"
                )
        notes = {k: v for k, v in r.items() if not isinstance(v, dict) and k != "case_s"}
        rows.append(f"| {case} | | | | | | {json.dumps(notes, default=str)[:300]} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
