"""What the cost model reads: model shapes, device profiles, links and clusters.

- `ModelSpec`: the shape of one transformer (layers, hidden, heads, kv heads, MLP, vocab), from
  a preset name (`llama-7b`, `llama-70b`...), a realflow `TransformerConfig`, or an HF directory.
- `DeviceProfile`: peak FLOP/s, memory bandwidth and capacity, and the efficiency / overhead
  parameters the cost model multiplies them by. Shipped as YAML in `realflow/search/profiles/`;
  `source` says whether the numbers were measured (`calibrate`) or taken from published specs.
- `Link`: bandwidth (bytes/s) and latency (s) of one kind of connection.
- `Cluster`: `nodes` x `devices_per_node` devices of one profile, an intra-node and an inter-node
  link. Device i lives on node `i // devices_per_node`. Shipped in `realflow/search/clusters/`.

Pure Python (yaml only): the search imports it in its inner loop.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml

from realflow.api.registry import closest

HERE = os.path.dirname(os.path.abspath(__file__))
PROFILE_DIR = os.path.join(HERE, "profiles")
CLUSTER_DIR = os.path.join(HERE, "clusters")

GB = 1e9


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer; the attribute names are TransformerConfig's, so
    `realflow.parallel.partition.layout_errors` accepts a ModelSpec."""

    name: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool = True
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @property
    def layer_params(self) -> int:
        """Weights of one block: q, k, v, o projections, the MLP and two norms."""
        h, hd = self.hidden_size, self.head_dim
        attn = h * self.n_heads * hd * 2 + h * self.n_kv_heads * hd * 2
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        return attn + mlp + 2 * h

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def params(self) -> int:
        """All weights with an LM head (a critic's head is `hidden_size` instead)."""
        head = 0 if self.tie_word_embeddings else self.embed_params
        return self.n_layers * self.layer_params + self.embed_params + head + self.hidden_size

    def fwd_flops_per_token(self, ctx: float, head: bool = True) -> float:
        """Forward FLOPs of one token that attends to `ctx` earlier tokens: 2 per weight of the
        blocks (and of the vocab head when `head`), plus 4 * n_heads * head_dim * ctx per layer
        for scores and the weighted sum."""
        matmul = self.n_layers * (self.layer_params - 2 * self.hidden_size)
        if head:
            matmul += self.embed_params
        attn = 4 * self.n_layers * self.n_heads * self.head_dim * ctx
        return 2.0 * matmul + attn

    @classmethod
    def from_config(cls, name: str, cfg: Any) -> ModelSpec:
        """From a realflow TransformerConfig (or anything with its attribute names)."""
        return cls(
            name=name,
            n_layers=cfg.n_layers,
            hidden_size=cfg.hidden_size,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads or cfg.n_heads,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            gated_mlp=cfg.gated_mlp,
            tie_word_embeddings=cfg.tie_word_embeddings,
        )


# Published architectures (the models' config.json files).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": dict(n_layers=32, hidden_size=4096, n_heads=32, n_kv_heads=32,
                     intermediate_size=11008, vocab_size=32000),
    "llama-13b": dict(n_layers=40, hidden_size=5120, n_heads=40, n_kv_heads=40,
                      intermediate_size=13824, vocab_size=32000),
    "llama-34b": dict(n_layers=48, hidden_size=8192, n_heads=64, n_kv_heads=8,
                      intermediate_size=22016, vocab_size=32000),
    "llama-70b": dict(n_layers=80, hidden_size=8192, n_heads=64, n_kv_heads=8,
                      intermediate_size=28672, vocab_size=32000),
    "llama3-8b": dict(n_layers=32, hidden_size=4096, n_heads=32, n_kv_heads=8,
                      intermediate_size=14336, vocab_size=128256),
    "llama3-70b": dict(n_layers=80, hidden_size=8192, n_heads=64, n_kv_heads=8,
                       intermediate_size=28672, vocab_size=128256),
    "qwen2-1.5b": dict(n_layers=28, hidden_size=1536, n_heads=12, n_kv_heads=2,
                       intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
}  # fmt: skip


def model_spec(source: str, vocab_size: int | None = None) -> ModelSpec:
    """A ModelSpec from a preset name, `builtin:<config>` (realflow's built-in shapes; the
    built-in tokenizer's vocabulary unless `vocab_size`), or an HF model directory."""
    if source in MODEL_PRESETS:
        return ModelSpec(name=source, **MODEL_PRESETS[source])
    if source.startswith("builtin:"):
        from realflow.models.builtin import BUILTIN_CONFIGS, builtin_config

        name = source[len("builtin:") :]
        name = name if name in BUILTIN_CONFIGS else "tiny-llama"  # builtin:<task>-sft is tiny
        if vocab_size is None:
            from realflow.data.tokenizer import builtin_vocab

            vocab_size = len(builtin_vocab())
        return ModelSpec.from_config(source, builtin_config(name, vocab_size))
    if os.path.isdir(source):
        from realflow.models.hf_io import config_from_hf_dir

        return ModelSpec.from_config(source, config_from_hf_dir(source))
    guess = closest(source, list(MODEL_PRESETS))
    hint = f"; did you mean '{guess}'?" if guess else ""
    raise ValueError(
        f"model {source!r} is not a preset ({', '.join(MODEL_PRESETS)}), a builtin:<name> or an "
        f"HF model directory{hint}"
    )


@dataclasses.dataclass(frozen=True)
class Link:
    """One kind of connection: `bandwidth` in bytes/s (per device, one direction), `latency` in
    seconds per message."""

    name: str
    bandwidth: float
    latency: float

    def time(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """One device type. Times: compute `flops / (peak_flops * eff)`, memory-bound work
    `bytes / (mem_bandwidth * decode_bw_eff)`; overheads are per call, per decode step, and per
    layer of each decode step (kernel launches, Python)."""

    name: str
    source: str  # "measured: <command, date>" or "published: <datasheet>"
    peak_flops: float  # FLOP/s in the compute dtype
    mem_bandwidth: float  # bytes/s
    memory: float  # bytes usable by one worker
    param_bytes: int  # bytes per weight in the compute dtype (bf16: 2, fp32: 4)
    train_eff: float  # fraction of peak a train step's matmuls reach
    infer_eff: float  # same for inference and prefill
    decode_bw_eff: float  # fraction of mem_bandwidth a decode step reaches
    call_s: float  # fixed cost of one call (launch, data handling)
    decode_step_s: float  # fixed cost of one decode step
    layer_s: float  # fixed cost per layer of one forward (per decode step; per micro-batch)
    optim_bytes_per_param: float = 28.0  # Adam step traffic: read p, g, m, v; write p, m, v (fp32)
    # What realflow's runtime adds around the model's own work, per MFC kind: a whole call takes
    # `scale * model time + call_s` (interface code: log-probs, losses, minibatches, data
    # handling). Fitted by `calibrate` from real runs; (1, 0) when not measured.
    runtime: tuple[tuple[str, float, float], ...] = ()

    def runtime_of(self, kind: str) -> tuple[float, float]:
        """(scale, call_s) of MFC kind `kind`."""
        for k, scale, call in self.runtime:
            if k == kind:
                return scale, call
        return 1.0, 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceProfile:
        eff, over = d["efficiency"], d["overhead"]
        return cls(
            name=d["name"],
            source=d["source"],
            peak_flops=float(d["peak_tflops"]) * 1e12,
            mem_bandwidth=float(d["mem_bandwidth_GBps"]) * GB,
            memory=float(d["memory_GB"]) * GB,
            param_bytes=int(d["param_bytes"]),
            train_eff=float(eff["train"]),
            infer_eff=float(eff["inference"]),
            decode_bw_eff=float(eff["decode_bw"]),
            call_s=float(over["call_s"]),
            decode_step_s=float(over["decode_step_s"]),
            layer_s=float(over["layer_s"]),
            runtime=tuple(
                (k, float(v["scale"]), float(v["call_s"])) for k, v in d.get("runtime", {}).items()
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "peak_tflops": self.peak_flops / 1e12,
            "mem_bandwidth_GBps": self.mem_bandwidth / GB,
            "memory_GB": self.memory / GB,
            "param_bytes": self.param_bytes,
            "efficiency": {
                "train": self.train_eff,
                "inference": self.infer_eff,
                "decode_bw": self.decode_bw_eff,
            },
            "overhead": {
                "call_s": self.call_s,
                "decode_step_s": self.decode_step_s,
                "layer_s": self.layer_s,
            },
            **(
                {"runtime": {k: {"scale": a, "call_s": b} for k, a, b in self.runtime}}
                if self.runtime
                else {}
            ),
        }


def _link(d: dict[str, Any]) -> Link:
    return Link(d["name"], float(d["bandwidth_GBps"]) * GB, float(d["latency_us"]) * 1e-6)


@dataclasses.dataclass(frozen=True)
class Cluster:
    name: str
    nodes: int
    devices_per_node: int
    device: DeviceProfile
    intra: Link
    inter: Link

    @property
    def n_devices(self) -> int:
        return self.nodes * self.devices_per_node

    def node_of(self, device: int) -> int:
        return device // self.devices_per_node

    def link(self, devices: tuple[int, ...] | list[int]) -> Link:
        """The slowest link a group of devices talks over: intra-node when they share a node."""
        per = self.devices_per_node
        first = devices[0] // per
        return self.intra if all(d // per == first for d in devices) else self.inter

    def with_nodes(self, nodes: int) -> Cluster:
        if nodes < 1:
            raise ValueError(f"cluster {self.name}: nodes ({nodes}) must be >= 1")
        return dataclasses.replace(self, nodes=nodes)


def _named_yaml(directory: str, name_or_path: str, what: str) -> dict[str, Any]:
    path = name_or_path
    if not os.path.isfile(path):
        path = os.path.join(directory, f"{name_or_path}.yaml")
    if not os.path.isfile(path):
        known = sorted(f[: -len(".yaml")] for f in os.listdir(directory) if f.endswith(".yaml"))
        guess = closest(name_or_path, known)
        hint = f"; did you mean '{guess}'?" if guess else ""
        raise ValueError(
            f"{what} {name_or_path!r} is neither a YAML file nor a shipped {what} "
            f"({', '.join(known)}){hint}"
        )
    with open(path) as f:
        return yaml.safe_load(f)


def load_profile(name_or_path: str) -> DeviceProfile:
    return DeviceProfile.from_dict(_named_yaml(PROFILE_DIR, name_or_path, "device profile"))


CLUSTER_KEYS = {"name", "source", "nodes", "devices_per_node", "device", "intra_node", "inter_node"}


def load_cluster(name_or_path: str) -> Cluster:
    """A cluster by shipped name (`h100x8`) or YAML path; see docs/search.md for the format."""
    d = _named_yaml(CLUSTER_DIR, name_or_path, "cluster")
    unknown = sorted(set(d) - CLUSTER_KEYS)
    missing = sorted(CLUSTER_KEYS - {"source"} - set(d))
    if unknown or missing:
        raise ValueError(
            f"cluster {name_or_path!r}: unknown keys {unknown}, missing keys {missing} (a "
            f"cluster has {sorted(CLUSTER_KEYS)})"
        )
    return Cluster(
        name=d["name"],
        nodes=int(d["nodes"]),
        devices_per_node=int(d["devices_per_node"]),
        device=load_profile(d["device"]),
        intra=_link(d["intra_node"]),
        inter=_link(d["inter_node"]),
    )
