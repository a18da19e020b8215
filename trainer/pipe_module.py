"""DeepSpeed's PipelineModule with an explicit per-stage layer split.

DeepSpeed's `partition_method` accepts "uniform", "parameters" or "type:REGEX", not a list of
layer counts; this subclass takes the boundaries from `model_topo.parts` instead (everything else,
including tied-weight handling, checkpoint file naming and loading, is stock DeepSpeed).
"""
from typing import Optional

from deepspeed.pipe import PipelineModule


class PartitionedPipelineModule(PipelineModule):
    def __init__(self, layers, *, boundaries: Optional[list[int]] = None, **kwargs):
        # Must be set before PipelineModule.__init__, which calls _partition_layers.
        self._explicit_boundaries = boundaries
        super().__init__(layers=layers, **kwargs)

    def _partition_layers(self, method="uniform"):
        if self._explicit_boundaries is None:
            return super()._partition_layers(method)
        if len(self._explicit_boundaries) != self.num_stages + 1 or self._explicit_boundaries[-1] != len(self._layer_specs):
            raise ValueError(
                f"stage boundaries {self._explicit_boundaries} do not split {len(self._layer_specs)} layers into {self.num_stages} stages"
            )
        self.parts = list(self._explicit_boundaries)
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    def load_state_dir_except(self, load_dir, checkpoint_engine, skip: set[int]) -> None:
        """`load_state_dir` (strict) for every local layer whose global index is not in `skip`
        (e.g. an LM checkpoint's head when this pipeline has a value head)."""
        import os

        for local, layer in enumerate(self.forward_funcs):
            index = self._local_start + local
            if index in skip or not hasattr(layer, "load_state_dict"):
                continue
            path = self.ckpt_layer_path(load_dir, local)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: missing layer file for pipe layer {index}")
            layer.load_state_dict(checkpoint_engine.load(path, map_location="cpu"), strict=True)
        self._synchronize_tied_weights()
