"""`group_filter`: DAPO's dynamic-sampling filter (Yu et al. 2025), the filter MFC of a sampling
loop (see realflow.api.dfg.FilterLoop and docs/runtime.md).

inference reads `rewards` (one score per answer, a sample's answers being one prompt's group)
and returns the samples whose group scores are not all equal: a group of equal scores has zero
group-normalised advantage and teaches nothing. Only the outcome scores count, as DAPO filters
on accuracy: process rewards (`dense_rewards`) do not make a group pass. It writes no keys; the
master counts what it kept (`dyn_filter/qualified`, `/rounds`, ...).
"""

from __future__ import annotations

from realflow.algorithms import groups_with_distinct_scores
from realflow.api.data import SequenceSample
from realflow.api.dfg import MicroBatchSpec
from realflow.api.interface import Model, ModelInterface
from realflow.api.registry import INTERFACES


@INTERFACES.register("group_filter")
class GroupFilterInterface(ModelInterface):
    """inference: the samples of `rewards` whose answers did not all score the same."""

    def inference(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample:
        rewards_B = data.data["rewards"].float()
        sizes = [len(lens) for lens in data.seqlens["rewards"]]
        keep_G = groups_with_distinct_scores(rewards_B, sizes)
        return data.index(keep_G.nonzero().flatten().tolist())
