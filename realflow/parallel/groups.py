"""torch.distributed process groups of one mesh, seen from one worker.

    groups = MeshGroups.build(mesh)          # every worker of the world, same order, same meshes
    model = build_model(config, "lm", groups) # realflow.parallel.model

`dist.new_group` is collective over the whole world: every process must call `build` for the
same meshes in the same order, also the processes outside the mesh (they get an object whose
`member` is False). Worker ids in a mesh are global ranks of the default process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from realflow.parallel.layout import Coords, Mesh
from realflow.parallel.partition import ShardSpec


@dataclass
class MeshGroups:
    """This worker's groups in `mesh` (all None and `coords` None when it is not a member).

    - `tp_group`: its tensor-parallel peers; `dp_group`: the same shard in other replicas
      (pass it to the train engine); `pp_group`: the stages of its pipeline; `mp_group`: the
      tp x pp workers of its replica; `embed_group`: its pipeline's first and last stage (the
      two copies of a tied embedding; None when pp = 1).
    - `*_ranks`: the global ranks of each group, in order (stage order for `pp_ranks`).
    """

    mesh: Mesh
    rank: int
    coords: Coords | None
    tp_group: Any = None
    dp_group: Any = None
    pp_group: Any = None
    mp_group: Any = None
    embed_group: Any = None
    tp_ranks: tuple[int, ...] = ()
    dp_ranks: tuple[int, ...] = ()
    pp_ranks: tuple[int, ...] = ()
    mp_ranks: tuple[int, ...] = ()

    @property
    def member(self) -> bool:
        return self.coords is not None

    @classmethod
    def build(cls, mesh: Mesh, rank: int | None = None) -> MeshGroups:
        """Create the mesh's groups (a collective call over the whole default group)."""
        if not dist.is_initialized():
            raise ValueError(f"MeshGroups.build({mesh}) needs torch.distributed initialised")
        rank = dist.get_rank() if rank is None else rank
        world = dist.get_world_size()
        if max(mesh.workers) >= world:
            raise ValueError(f"mesh {mesh} names worker {max(mesh.workers)}; world size {world}")
        out = cls(mesh=mesh, rank=rank, coords=mesh.coords(rank) if rank in mesh else None)
        axes = {
            "tp": mesh.tp_groups(),
            "dp": mesh.dp_groups(),
            "pp": mesh.pp_groups(),
            "mp": mesh.mp_groups(),
        }
        if mesh.layout.pp > 1:
            axes["embed"] = [(g[0], g[-1]) for g in mesh.pp_groups()]
        for axis, rank_lists in axes.items():
            for ranks in rank_lists:
                group = dist.new_group(list(ranks))
                if rank in ranks:
                    setattr(out, f"{axis}_group", group)
                    if axis != "embed":
                        setattr(out, f"{axis}_ranks", tuple(ranks))
        return out

    def shard_spec(self) -> ShardSpec:
        """What this worker builds of the model (see PackedTransformer's `shard`)."""
        if self.coords is None:
            raise ValueError(f"worker {self.rank} is not in mesh {self.mesh}: it holds no shard")
        lay = self.mesh.layout
        return ShardSpec(
            tp_rank=self.coords.tp,
            tp_size=lay.tp,
            pp_stage=self.coords.pp,
            pp_size=lay.pp,
            tp_group=self.tp_group,
        )
