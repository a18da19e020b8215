"""Where a rank sits in the (pipe, data) grid: the one place that does rank arithmetic.

DeepSpeed's PipeDataParallelTopology (axes [pipe, data]) numbers ranks data-fastest:
    rank = stage * D + dp_rank        (P stages, D data-parallel replicas, world size P x D)
so stage s holds ranks s*D .. s*D + D - 1, and replica r of the pipeline is ranks r, D + r, 2D + r, ...
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    pipe: int   # P: pipeline stages
    data: int   # D: data-parallel replicas

    @classmethod
    def from_config(cls, cfg, rank: int, world_size: int) -> "Topology":
        return cls(rank, world_size, cfg.model_topo.pipe, cfg.model_topo.data)

    @property
    def stage(self) -> int:
        return self.rank // self.data

    @property
    def dp_rank(self) -> int:
        return self.rank % self.data

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pipe - 1

    @property
    def is_data_stage(self) -> bool:
        """Only the first stage (input ids) and the last stage (labels) read data."""
        return self.is_first_stage or self.is_last_stage

    def ranks_of_stage(self, stage: int) -> range:
        return range(stage * self.data, (stage + 1) * self.data)

    def deepspeed_topology(self):
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

        return PipeDataParallelTopology(num_pp=self.pipe, num_dp=self.data)
