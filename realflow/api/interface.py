"""The interface protocol: how a model function call turns a SequenceSample into model work.

An interface is registered by name in `realflow.api.registry.INTERFACES` and built with the
keyword arguments of its `InterfaceSpec`. A worker calls the method matching the MFC's
`InterfaceType` with the model and the batch (already restricted to the MFC's input keys and
remapped to the interface's names).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from realflow.api.data import SequenceSample
from realflow.api.dfg import MicroBatchSpec


@dataclasses.dataclass
class Model:
    """A model as interfaces see it.

    `module` is what the worker built for this role: a train engine for trained roles, an
    inference engine otherwise (see realflow.engines), or any object a toy interface expects.
    `version` counts the train steps applied to the weights (the parameter version). `rng` is a
    torch.Generator the worker seeds for each call from (seed, step, MFC): interfaces draw every
    random number from it, so calls that overlap on other workers cannot disturb each other and
    a resumed run replays the same samples.
    """

    name: str
    module: Any
    tokenizer: Any = None
    version: int = 0
    rng: Any = None


class ModelInterface:
    """Base class of interfaces. Override the call kinds the interface supports.

    - `generate` / `inference` return a SequenceSample with the same ids holding the output keys
      (or None when the call produces no data);
    - `train_step` returns a flat dict of float statistics (logged to metrics.jsonl);
    - `evaluate` returns a flat dict of float statistics of the batch under the current weights
      (evaluation graphs; logged under `eval/`), changing nothing; its means are averaged over
      the eval batches with the optional key `weight` (e.g. the batch's answer tokens);
    - `save` writes the model as an HF directory;
    - `state_dict` / `load_state_dict` hold interface state that must survive a resume (e.g. an
      adaptive KL coefficient).
    """

    def generate(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample | None:
        raise NotImplementedError(f"{type(self).__name__} does not support generate")

    def inference(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample | None:
        raise NotImplementedError(f"{type(self).__name__} does not support inference")

    def train_step(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, float]:
        raise NotImplementedError(f"{type(self).__name__} does not support train_step")

    def evaluate(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, float]:
        raise NotImplementedError(f"{type(self).__name__} does not support evaluate")

    def save(self, model: Model, save_dir: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support save")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(
                f"{type(self).__name__} has no state to load, got keys {sorted(state)}"
            )
