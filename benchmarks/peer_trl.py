"""realflow against TRL on the same CPU work: GRPO and DPO steps, side by side, interleaved.

    # once: TRL in its own venv (torch==2.13.0 takes the CPU wheel; plain `torch` pulls CUDA)
    python3 -m venv /tmp/trl-venv && /tmp/trl-venv/bin/pip install torch==2.13.0 trl
    # then, from the repo root, with realflow's environment:
    .venv/bin/python benchmarks/peer_trl.py --trl-python /tmp/trl-venv/bin/python

Both sides load the same files, built here deterministically: a random-init llama (vocab 2048,
hidden 256, 4 layers, 4 heads / 2 kv heads, MLP 688, untied: 3.95M parameters) saved as an HF
directory, a word-level tokenizer of 2048 tokens, GRPO prompts (16-48 tokens) and DPO pairs
(16-192 tokens per sequence). Workloads (fp32, `--threads` intra-op threads, 2 by default):

- grpo: 16 prompts x 4 answers of exactly 64 new tokens (min = max new tokens), KL 0.04 to a
  reference model, one optimizer step per step, a rule reward (same Python function both sides).
- dpo: 16 pairs, beta 0.1, a reference forward every step, one optimizer step per step.

Every (round, workload, side) runs in a fresh process (TRL's in `--trl-python`), which takes
`--warmup` steps and then times `--steps`; the sides alternate order each round, so both see the
same background load. Step time is the wall time between consecutive step ends on both sides
(realflow: `time/step_s`; TRL: a callback's `on_step_end`). The machine's fp32 matmul peak is
measured before every run (a 2048^3 matmul, best of 10) and the efficiency of each realflow
phase is its model FLOPs over its time, against that peak. Nothing here is a test dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

MODEL = dict(
    vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None,
)  # fmt: skip
GRPO = dict(n_prompts=16, group=4, new_tokens=64, kl=0.04, prompt_lens=(16, 48))
DPO = dict(n_pairs=16, beta=0.1, prompt_lens=(8, 64), answer_lens=(8, 127))
N_ROWS = 16 * 64  # enough rows for 64 steps of either workload
LR = 1e-6

REWARD_PY = '''
def score(prompt, answer, metadata):
    """Share of answer words with an even token number (same function on both sides)."""
    words = answer.split()
    return sum(int(w[1:]) % 2 == 0 for w in words if w[1:].isdigit()) / max(1, len(words))
'''


# ---- fixtures (parent, realflow's environment) ---------------------------------------------------


def build_fixtures(root: str) -> None:
    """Model, tokenizer, prompts and pairs under `root`, the same for every seed-0 call."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({f"t{i}": i for i in range(3, MODEL["vocab_size"])})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    model_dir = os.path.join(root, "model")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL)).float()
    model.save_pretrained(model_dir)
    hf_tok.save_pretrained(model_dir)
    rng = random.Random(0)

    def text(lo: int, hi: int) -> str:
        return " ".join(
            f"t{rng.randrange(3, MODEL['vocab_size'])}" for _ in range(rng.randint(lo, hi))
        )

    with open(os.path.join(root, "prompts.jsonl"), "w") as f:
        for _ in range(N_ROWS):
            f.write(json.dumps({"prompt": text(*GRPO["prompt_lens"])}) + "\n")
    with open(os.path.join(root, "pairs.jsonl"), "w") as f:
        for _ in range(N_ROWS):
            row = {"prompt": text(*DPO["prompt_lens"])}
            row["chosen"], row["rejected"] = text(*DPO["answer_lens"]), text(*DPO["answer_lens"])
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(root, "reward.py"), "w") as f:
        f.write(REWARD_PY)


def matmul_peak_gflops(threads: int) -> float:
    """Best fp32 GFLOP/s of a 2048^3 matmul over 10 tries."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(10))
    return 2 * 2048**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def forward_gflops(seq_lens: list[int]) -> float:
    """Model FLOPs of one forward pass over sequences of these lengths (matmuls + attention)."""
    m = MODEL
    h, kv = (
        m["hidden_size"],
        m["hidden_size"] * m["num_key_value_heads"] // m["num_attention_heads"],
    )
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * m["intermediate_size"]  # q,o + k,v + mlp
    per_token = 2 * (m["num_hidden_layers"] * per_layer + h * m["vocab_size"])
    tokens = sum(seq_lens)
    # causal attention: QK^T and PV over the positions before each token
    attn = sum(4 * h * m["num_hidden_layers"] * n * (n + 1) / 2 for n in seq_lens)
    return (per_token * tokens + attn) / 1e9


# ---- child: realflow ----------------------------------------------------------------------------


def run_realflow(
    workload: str, fixtures: str, steps: int, warmup: int, out_dir: str, plan: str = "auto"
) -> dict:
    from realflow.system.runner import run
    from realflow.system.transport import LocalTransport

    LocalTransport.compute_plan = plan

    model = os.path.join(fixtures, "model")
    total = warmup + steps
    common = dict(output_dir=out_dir, total_steps=total, tensorboard=False, progress_bar=False)
    if workload == "grpo":
        from realflow.experiments.grpo import GRPOConfig

        cfg = GRPOConfig(n_seqs=GRPO["n_prompts"], **common)
        g = cfg.grpo
        g.group_size, g.n_minibatches, g.kl_beta = GRPO["group"], 1, GRPO["kl"]
        g.gen.max_new_tokens = g.gen.min_new_tokens = GRPO["new_tokens"]
        cfg.reward.scorers = ["python"]
        cfg.reward.args = {"python_fn": os.path.join(fixtures, "reward.py") + ":score"}
        cfg.dataset.path = os.path.join(fixtures, "prompts.jsonl")
    else:
        from realflow.experiments.dpo import DPOConfig

        cfg = DPOConfig(n_seqs=DPO["n_pairs"], **common)
        cfg.dpo.beta = DPO["beta"]
        cfg.dataset.path = os.path.join(fixtures, "pairs.jsonl")
    cfg.dataset.shuffle = False
    cfg.dataset.max_length = 512
    for role in (cfg.actor, cfg.ref):
        role.path = model
        role.max_tokens_per_mb = 8192
    cfg.actor.optimizer.lr = LR
    cfg.actor.optimizer.lr_scheduler_type = "constant"
    result = run(workload, cfg)
    rows = result.rows[warmup:]
    with open(os.path.join(out_dir, "trace.json")) as f:
        events = [
            e for e in json.load(f)["traceEvents"] if e["ph"] == "X" and "version" in e["args"]
        ]
    phases: dict[str, list[float]] = {}
    for e in events:
        if e["args"]["step"] > warmup:
            phases.setdefault(e["name"], []).append(e["dur"] / 1e6)
    return {"step_s": [r["time/step_s"] for r in rows], "phases": phases}


# ---- child: TRL ---------------------------------------------------------------------------------


class _Clock:
    """Sums the wall time of wrapped calls, per name."""

    def __init__(self):
        self.spent: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - t

        return timed


def run_trl(workload: str, fixtures: str, steps: int, warmup: int, out_dir: str) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    model_dir = os.path.join(fixtures, "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    load = lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # noqa: E731
    clock = _Clock()
    ends: list[float] = []
    phase_rows: list[dict[str, float]] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.time())
            phase_rows.append(dict(clock.spent))
            clock.spent.clear()

    common = dict(
        output_dir=out_dir, max_steps=warmup + steps, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0, dataloader_num_workers=0, gradient_checkpointing=False,
        bf16=False, fp16=False,  # TRL defaults to bf16 autocast, which on CPU is neither fp32 nor fast
    )  # fmt: skip
    if workload == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        namespace: dict = {}
        exec(REWARD_PY, namespace)
        score = namespace["score"]

        def reward(prompts, completions, **kw):
            return [score(p, c, {}) for p, c in zip(prompts, completions)]

        rows = [json.loads(line) for line in open(os.path.join(fixtures, "prompts.jsonl"))]
        n = GRPO["n_prompts"] * GRPO["group"]
        args = GRPOConfig(
            per_device_train_batch_size=n, gradient_accumulation_steps=1, steps_per_generation=1,
            num_generations=GRPO["group"], num_iterations=1, beta=GRPO["kl"],
            max_completion_length=GRPO["new_tokens"],
            generation_kwargs={"min_new_tokens": GRPO["new_tokens"]},
            temperature=1.0, top_p=1.0, shuffle_dataset=False, **common,
        )  # fmt: skip
        trainer = GRPOTrainer(
            model=load(), reward_funcs=reward, args=args, processing_class=tokenizer,
            train_dataset=datasets.Dataset.from_list(rows), callbacks=[StepEnds()],
        )  # fmt: skip
        model = trainer.model
        model.generate = clock.wrap("actor_gen", model.generate)
    else:
        from trl import DPOConfig, DPOTrainer

        rows = [json.loads(line) for line in open(os.path.join(fixtures, "pairs.jsonl"))]
        args = DPOConfig(
            per_device_train_batch_size=DPO["n_pairs"], gradient_accumulation_steps=1,
            beta=DPO["beta"], max_length=None, precompute_ref_log_probs=False,
            train_sampling_strategy="sequential", **common,
        )  # fmt: skip
        trainer = DPOTrainer(
            model=load(), ref_model=load(), args=args, processing_class=tokenizer,
            train_dataset=datasets.Dataset.from_list(rows), callbacks=[StepEnds()],
        )  # fmt: skip
    ref = trainer.ref_model
    ref.forward = clock.wrap("ref_inf", ref.forward)
    start = time.time()
    trainer.train()
    periods = [b - a for a, b in zip([start, *ends[:-1]], ends)]
    phases: dict[str, list[float]] = {}
    for row in phase_rows[warmup:]:
        for k, v in row.items():
            phases.setdefault(k, []).append(v)
    return {"step_s": periods[warmup:], "phases": phases}


def child_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("side", help="trl, realflow or realflow:PLAN (a LocalTransport compute plan)")
    p.add_argument("workload", choices=("grpo", "dpo"))
    for name in ("fixtures", "out", "result"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    a = p.parse_args(argv)
    if a.side != "trl":
        import realflow  # noqa: F401  (before torch: it sets libgomp's spin count)
    import torch

    torch.set_num_threads(a.threads)
    if a.side == "trl":
        out = run_trl(a.workload, a.fixtures, a.steps, a.warmup, a.out)
    else:
        plan = a.side.partition(":")[2] or "auto"
        out = run_realflow(a.workload, a.fixtures, a.steps, a.warmup, a.out, plan)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(a.result, "w") as f:
        json.dump(out, f)


# ---- parent -------------------------------------------------------------------------------------


def work_per_step(workload: str, fixtures: str) -> dict:
    """Tokens and forward GFLOPs per step (mean over the rows the runs read)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(fixtures, "model"))
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if workload == "grpo":
        rows = [json.loads(x) for x in open(os.path.join(fixtures, "prompts.jsonl"))]
        n, g, new = GRPO["n_prompts"], GRPO["group"], GRPO["new_tokens"]
        prompts = [len(ids(r["prompt"])) for r in rows[: 8 * n]]
        full = forward_gflops([p + new for p in prompts for _ in range(g)]) / 8
        # generation prefills each prompt once for its group of answers
        gen = full - (g - 1) * forward_gflops(prompts) / 8
        return {"tokens": new * n * g, "fwd_gflop": full, "gen_gflop": gen}  # generated tokens
    rows = [json.loads(x) for x in open(os.path.join(fixtures, "pairs.jsonl"))]
    lens = [
        len(ids(r["prompt"])) + len(ids(r[k])) + 1
        for r in rows[: 8 * DPO["n_pairs"]]
        for k in ("chosen", "rejected")
    ]
    return {"tokens": sum(lens) / 8, "fwd_gflop": forward_gflops(lens) / 8}


def run_child(python: str, side: str, workload: str, args, fixtures: str, tmp: str) -> dict:
    out = tempfile.mkdtemp(prefix=f"{side}-{workload}-", dir=tmp)
    result = os.path.join(out, "result.json")
    cmd = [
        python, os.path.abspath(__file__), "--child", side, workload, f"--fixtures={fixtures}",
        f"--out={os.path.join(out, 'run')}", f"--result={result}", f"--steps={args.steps}",
        f"--warmup={args.warmup}", f"--threads={args.threads}",
    ]  # fmt: skip
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{side} {workload} failed:\n{proc.stderr[-4000:]}")
    with open(result) as f:
        return json.load(f)


def summarise(results: dict, work: dict, peaks: list[float]) -> str:
    peak = statistics.median(peaks)
    lines = [
        f"fp32 matmul peak (2048^3, {len(peaks)} measurements): median {peak:.1f} GFLOP/s "
        f"(min {min(peaks):.1f}, max {max(peaks):.1f})",
        "",
        "| workload | side | median s/step | min | max | tokens/s | peak RSS MiB | phases (median s) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    ratios, goals = {}, []
    for (workload, side), runs in sorted(results.items()):
        steps = [s for r in runs for s in r["step_s"]]
        med = statistics.median(steps)
        phases: dict[str, list[float]] = {}
        for r in runs:
            for k, v in r["phases"].items():
                phases.setdefault(k, []).extend(v)
        split = ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in sorted(phases.items()))
        rss = max(r["peak_rss_mib"] for r in runs)
        tps = work[workload]["tokens"] / med
        lines.append(
            f"| {workload} | {side} | {med:.3f} | {min(steps):.3f} | {max(steps):.3f} | "
            f"{tps:.0f} | {rss:.0f} | {split} |"
        )
        ratios.setdefault(workload, {})[side] = med
        if side.startswith("realflow"):
            goals += _efficiency(f"{workload} {side}", phases, work[workload], peak)
    lines.append("")
    target = {"grpo": 1.8, "dpo": 2.5}
    for workload, sides in sorted(ratios.items()):
        for side in sorted(s for s in sides if s != "trl" and "trl" in sides):
            r = sides["trl"] / sides[side]
            met = "met" if r >= target[workload] else "not met"
            lines.append(
                f"- {workload}: TRL/{side} = {r:.2f}x (goal >= {target[workload]}x: {met})"
            )
    lines += goals
    return "\n".join(lines)


def _efficiency(workload: str, phases: dict, work: dict, peak: float) -> list[str]:
    """Share of the matmul peak each realflow phase reaches (model FLOPs / time)."""
    fwd = work["fwd_gflop"]
    flops = {"actor_gen": work.get("gen_gflop", 0.0), "ref_inf": fwd, "actor_train": 3 * fwd}
    goal = {"actor_gen": 0.55, "actor_train": 0.70}
    out = []
    for name, gflop in flops.items():
        if name not in phases:
            continue
        share = gflop / statistics.median(phases[name]) / peak
        line = f"- {workload} {name}: {gflop:.1f} GFLOP in {statistics.median(phases[name]):.3f} s = {share:.0%} of peak"
        if name in goal:
            line += f" (goal >= {goal[name]:.0%}: {'met' if share >= goal[name] else 'not met'})"
        out.append(line)
    floor = (4 * fwd + work.get("gen_gflop", 0.0)) / peak
    out.append(f"- {workload}: these FLOPs at 100% of the peak take {floor:.3f} s a step")
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child_main(sys.argv[2:])
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trl-python", required=True, help="python of the venv with TRL installed")
    p.add_argument("--workloads", default="grpo,dpo")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--sides",
        default="trl,realflow",
        help="comma-separated: trl, realflow, realflow:serial|partition|none (compute plans)",
    )
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="realflow-peer-trl-")
    fixtures = os.path.join(tmp, "fixtures")
    os.makedirs(fixtures)
    build_fixtures(fixtures)
    workloads = args.workloads.split(",")
    work = {w: work_per_step(w, fixtures) for w in workloads}
    sides = args.sides.split(",")
    pythons = {s: args.trl_python if s == "trl" else sys.executable for s in sides}
    results: dict = {}
    peaks = []
    for rnd in range(args.rounds):
        for workload in workloads:
            for side in sides if rnd % 2 == 0 else sides[::-1]:
                peaks.append(matmul_peak_gflops(args.threads))
                r = run_child(pythons[side], side, workload, args, fixtures, tmp)
                results.setdefault((workload, side), []).append(r)
                print(
                    f"round {rnd} {workload} {side}: median {statistics.median(r['step_s']):.3f} s/step "
                    f"(load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
    print(summarise(results, work, peaks))


if __name__ == "__main__":
    main()
