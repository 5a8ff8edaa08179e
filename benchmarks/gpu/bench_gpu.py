"""GPU benchmark of issue 9's workloads: realflow vs HF transformers on one CUDA GPU, bf16, a
random-init Qwen2-0.5B-shaped model (hidden 896, 24 layers, 14/2 heads, vocab 151936, tied).

    python benchmarks/gpu/bench_gpu.py --out DIR
    python benchmarks/gpu/bench_gpu.py --device cpu --tiny --new 4 --reps 1
        (a smoke test of the script itself on a CPU: its figures mean nothing)

Cases (each side timed after a warm-up, median of --reps runs; peak memory from
torch.cuda.max_memory_allocated):
- `train`: packed fwd + bwd of 48 long-tailed sequences (log-normal lengths, ~9.7k tokens),
  loss = mean token NLL. realflow: the packed model and gather_packed_logprobs; HF: the padded
  batch with SDPA, the same loss on the real tokens. MFU = 6 * params * real tokens / time /
  790 TFLOP/s (H200 dense bf16, measured on this machine kind).
- `generate`: 64 prompts of 32-256 tokens, 256 new tokens, sampling, no EOS. realflow samples
  the full vocabulary (RL needs the log-probs of the distribution sampled from); HF `generate`
  with top_k=50 (its fastest sampling setting, per shared GPU notes) and with top_k=0.

Writes DIR/bench_gpu.json and prints a markdown table. Needs torch with CUDA and transformers;
nothing else beyond realflow's own imports.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench_gpu")
PEAK_TFLOPS = 790.0
QWEN2_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
    use_sliding_window=False,
)


TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=1000,
)


def lognormal_lengths(n: int, median: float, sigma: float, lo: int, hi: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) * sigma + torch.log(torch.tensor(median)))
    return [int(v) for v in x.clamp(lo, hi)]


def build_models(shape: dict, tmp: str, device: str):
    """(realflow model, HF model), the same random weights, bf16 on `device`."""
    import transformers

    from realflow.models.hf_io import load_hf

    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape)).to(torch.bfloat16)
    hf.save_pretrained(tmp)
    hf = hf.to(device).eval()
    ours = load_hf(tmp, dtype="bfloat16", device=device, load_tokenizer=False).model
    return ours, hf


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def timed(fn, reps: int) -> tuple[float, float]:
    """(median seconds, peak GiB allocated) of `fn()` over `reps` runs after one warm-up."""
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
    return statistics.median(times), peak_gib()


def bench_train(ours, hf, n_params: int, reps: int, device: str) -> dict:
    from realflow.algorithms import gather_packed_logprobs

    lens = lognormal_lengths(48, median=128, sigma=1.0, lo=16, hi=936, seed=0)
    V = ours.config.vocab_size
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, V, (n,), generator=g) for n in lens]
    ids_T = torch.cat(seqs).to(device)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    cu = cu.to(device)
    width = max(lens)
    padded = torch.zeros(len(lens), width, dtype=torch.long)
    mask = torch.zeros(len(lens), width, dtype=torch.long)
    for b, s in enumerate(seqs):  # right padding for training
        padded[b, : len(s)] = s
        mask[b, : len(s)] = 1
    padded, mask = padded.to(device), mask.to(device)

    def ours_step():
        ours.zero_grad(set_to_none=True)
        loss = -gather_packed_logprobs(ours(ids_T, cu), ids_T, cu).mean()
        loss.backward()

    def hf_step():
        hf.zero_grad(set_to_none=True)
        logits = hf(input_ids=padded, attention_mask=mask).logits
        pred = mask[:, 1:].bool()  # positions whose next token is real
        rows = logits[:, :-1][pred]
        loss = torch.nn.functional.cross_entropy(rows.float(), padded[:, 1:][pred])
        loss.backward()

    ours.train(), hf.train()
    real, pad = sum(lens), len(lens) * width
    out = {"real_tokens": real, "padded_tokens": pad, "padding_ratio": pad / real}
    for name, fn in (("realflow", ours_step), ("hf_sdpa_padded", hf_step)):
        s, peak = timed(fn, reps)
        mfu = 6 * n_params * real / s / (PEAK_TFLOPS * 1e12)
        out[name] = {"seconds": s, "tok_per_s": real / s, "mfu": mfu, "peak_gib": peak}
    out["speedup"] = out["hf_sdpa_padded"]["seconds"] / out["realflow"]["seconds"]
    ours.eval(), hf.eval()
    return out


def bench_generate(ours, hf, new: int, reps: int, device: str) -> dict:
    from realflow.models.generation import GenerationConfig, generate

    lens = lognormal_lengths(64, median=96, sigma=0.6, lo=32, hi=256, seed=2)
    V = ours.config.vocab_size
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, V, (n,), generator=g) for n in lens]
    ids_T = torch.cat(seqs).to(device)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    cu = cu.to(device)
    width = max(lens)
    padded = torch.zeros(len(lens), width, dtype=torch.long)
    mask = torch.zeros(len(lens), width, dtype=torch.long)
    for b, s in enumerate(seqs):  # left padding, as HF generation requires
        padded[b, width - len(s) :] = s
        mask[b, width - len(s) :] = 1
    padded, mask = padded.to(device), mask.to(device)
    gconfig = GenerationConfig(max_new_tokens=new, top_k=0, eos_token_ids=[])

    def ours_run():
        gen = torch.Generator(device=device).manual_seed(0)
        out = generate(ours, ids_T, cu, gconfig, gen)
        assert out.output_ids_T.numel() == len(lens) * new

    def hf_run(top_k: int):
        def run():
            with torch.no_grad():
                out = hf.generate(
                    padded,
                    attention_mask=mask,
                    do_sample=True,
                    temperature=1.0,
                    top_k=top_k,
                    top_p=1.0,
                    max_new_tokens=new,
                    min_new_tokens=new,  # no EOS: every row makes `new` tokens
                    pad_token_id=0,
                )
            assert out.shape[1] == width + new

        return run

    n_tokens = len(lens) * new
    out = {"prompts": len(lens), "new_tokens": new}
    cases = (
        ("realflow_full_vocab", ours_run),
        ("hf_top_k50", hf_run(50)),
        ("hf_top_k0", hf_run(0)),
    )
    for name, fn in cases:
        s, peak = timed(fn, reps)
        out[name] = {"seconds": s, "tok_per_s": n_tokens / s, "peak_gib": peak}
    out["speedup_vs_hf_top_k50"] = (
        out["hf_top_k50"]["seconds"] / out["realflow_full_vocab"]["seconds"]
    )
    return out


def table(res: dict) -> str:
    t, gen = res["train"], res["generate"]
    rows = [
        "| case | side | seconds | tokens/s | MFU | peak GiB |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for side in ("realflow", "hf_sdpa_padded"):
        r = t[side]
        rows.append(
            f"| train fwd+bwd ({t['real_tokens']} real / {t['padded_tokens']} padded tokens) | "
            f"{side} | {r['seconds']:.3f} | {r['tok_per_s']:.0f} | {100 * r['mfu']:.1f}% | "
            f"{r['peak_gib']:.1f} |"
        )
    for side in ("realflow_full_vocab", "hf_top_k50", "hf_top_k0"):
        r = gen[side]
        rows.append(
            f"| generate {gen['prompts']} x {gen['new_tokens']}, no EOS | {side} | "
            f"{r['seconds']:.2f} | {r['tok_per_s']:.0f} | | {r['peak_gib']:.1f} |"
        )
    rows.append(
        f"\ntrain speed-up {t['speedup']:.2f}x (padding ratio {t['padding_ratio']:.2f}); "
        f"generate speed-up vs HF top_k=50 {gen['speedup_vs_hf_top_k50']:.2f}x"
    )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--gen-reps", type=int, default=1)
    p.add_argument("--vocab", type=int, default=QWEN2_05B["vocab_size"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="hidden 64, 1 layer, vocab 1000")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU (or --device cpu for a smoke test)")
    import transformers

    shape = {**QWEN2_05B, "num_hidden_layers": a.layers, "vocab_size": a.vocab}
    if a.tiny:
        shape.update(TINY)
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = build_models(shape, tmp, a.device)
    n_params = sum(p.numel() for p in ours.parameters())
    res = {
        "gpu": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
        "hf_attn": getattr(hf.config, "_attn_implementation", "?"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": " ".join(sys.argv),
        "params": n_params,
    }
    logger.info("%s, %d parameters", res["gpu"], n_params)
    res["train"] = bench_train(ours, hf, n_params, a.reps, a.device)
    logger.info("train: %s", res["train"])
    res["generate"] = bench_generate(ours, hf, a.new, a.gen_reps, a.device)
    logger.info("generate: %s", res["generate"])
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "bench_gpu.json").write_text(json.dumps(res, indent=1))
    print(table(res))


if __name__ == "__main__":
    main()
