"""Interfaces with no model, for testing and benchmarking the runtime itself.

`toy` sleeps for `sleep_s`, then (generate/inference) writes each output key as one float per
sample: 1 + the sum of the sample's first input key, so consumers can check what they got; or
(train_step) returns the batch size as a stat. `fail_on_call` raises on that call (1-based);
`hang_on_call` sleeps `hang_s` on that call instead. `save` writes the model's version;
`fail_on_save` raises on that save (1-based) and `save_sleep_s` makes every save slow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, ClassVar

import torch

from realflow.api.config import field_
from realflow.api.data import SequenceSample
from realflow.api.dfg import InterfaceSpec, InterfaceType, MFCDef, MicroBatchSpec
from realflow.api.interface import Model, ModelInterface
from realflow.api.registry import INTERFACES
from realflow.experiments.common import ExperimentConfig, ModelConfig, ModelRole


@INTERFACES.register("toy")
class ToyInterface(ModelInterface):
    def __init__(
        self,
        outputs: list[str] | tuple[str, ...] = (),
        sleep_s: float = 0.0,
        fail_on_call: int = 0,
        hang_on_call: int = 0,
        hang_s: float = 3600.0,
        fail_on_save: int = 0,
        save_sleep_s: float = 0.0,
    ):
        self.outputs = list(outputs)
        self.fail_on_save = fail_on_save
        self.save_sleep_s = save_sleep_s
        self.saves = 0
        self.sleep_s = sleep_s
        self.fail_on_call = fail_on_call
        self.hang_on_call = hang_on_call
        self.hang_s = hang_s
        self.calls = 0

    def _work(self) -> None:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError(f"toy failure on call {self.calls}")
        if self.calls == self.hang_on_call:
            time.sleep(self.hang_s)
        if self.sleep_s:
            time.sleep(self.sleep_s)

    def _produce(self, data: SequenceSample) -> SequenceSample:
        self._work()
        key = sorted(data.keys)[0]
        sums = [float(t.float().sum()) for t in _per_sample(data, key)]
        values = [torch.tensor([1.0 + s]) for s in sums]
        return SequenceSample.from_sequences(data.ids, {k: values for k in self.outputs})

    def generate(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample:
        return self._produce(data)

    def inference(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample:
        return self._produce(data)

    def train_step(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, float]:
        self._work()
        return {"n_seqs": float(data.bs), "calls": float(self.calls)}

    def save(self, model: Model, save_dir: str) -> None:
        self.saves += 1
        if self.saves == self.fail_on_save:
            raise RuntimeError(f"toy failure on save {self.saves}")
        os.makedirs(save_dir, exist_ok=True)
        time.sleep(self.save_sleep_s)
        with open(os.path.join(save_dir, "toy.json"), "w") as f:
            json.dump({"version": model.version}, f)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = state["calls"]


def _per_sample(data: SequenceSample, key: str) -> list[torch.Tensor]:
    assert data.data is not None
    offsets = [0]
    for lens in data.seqlens[key]:
        offsets.append(offsets[-1] + sum(lens))
    return [data.data[key][a:b] for a, b in zip(offsets[:-1], offsets[1:])]


@dataclasses.dataclass
class ToyNode:
    name: str
    model: str
    kind: str  # generate | inference | train_step
    inputs: list[str]
    outputs: list[str] = dataclasses.field(default_factory=list)
    sleep_s: float = 0.0
    fail_on_call: int = 0
    hang_on_call: int = 0
    hang_s: float = 3600.0
    fail_on_save: int = 0
    save_sleep_s: float = 0.0


@dataclasses.dataclass
class ToyConfig(ExperimentConfig):
    """A graph of toy interfaces (no model weights) over the built-in prompt dataset."""

    nodes: list[Any] = field_([], "The graph: a list of ToyNode.")
    n_seqs: int = field_(4, "Samples per step.", gt=0)
    tensorboard: bool = field_(False, "Write tensorboard events.")
    progress_bar: bool = field_(False, "Show a progress bar.")
    copies: dict[str, str] = field_({}, "Weight copies: copy role -> trained role.")
    staleness: int = field_(0, "How many train steps a copy's weights may lag.", ge=0)

    dataset_type = "prompt"
    dataset_keys: ClassVar[tuple[str, ...]] = ("packed_prompts",)

    def roles(self) -> dict[str, ModelRole]:
        return {
            n.model: ModelRole(ModelConfig(path="none", tokenizer_path="builtin"), head="none")
            for n in self.nodes
        }

    def weight_copies(self) -> dict[str, str]:
        return dict(self.copies)

    def max_staleness(self) -> int:
        return self.staleness

    def mfcs(self) -> list[MFCDef]:
        return [
            MFCDef(
                name=n.name,
                model_name=n.model,
                interface_type=InterfaceType(n.kind),
                interface_impl=InterfaceSpec(
                    "toy",
                    {
                        "outputs": list(n.outputs),
                        "sleep_s": n.sleep_s,
                        "fail_on_call": n.fail_on_call,
                        "hang_on_call": n.hang_on_call,
                        "hang_s": n.hang_s,
                        "fail_on_save": n.fail_on_save,
                        "save_sleep_s": n.save_sleep_s,
                    },
                ),
                n_seqs=self.n_seqs,
                input_keys=tuple(n.inputs),
                output_keys=tuple(n.outputs),
            )
            for n in self.nodes
        ]


def ppo_like_nodes(sleep_s: float = 0.0) -> list[ToyNode]:
    """The PPO graph's shape with toy calls."""
    train_in = ["seq", "rew", "ref", "val"]
    return [
        ToyNode("actor_gen", "actor", "generate", ["packed_prompts"], ["seq"], sleep_s),
        ToyNode("rew_inf", "rew", "inference", ["seq"], ["rew"], sleep_s),
        ToyNode("ref_inf", "ref", "inference", ["seq"], ["ref"], sleep_s),
        ToyNode("critic_inf", "critic", "inference", ["seq"], ["val"], sleep_s),
        ToyNode("actor_train", "actor", "train_step", train_in, [], sleep_s),
        ToyNode("critic_train", "critic", "train_step", train_in, [], sleep_s),
    ]
