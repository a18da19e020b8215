"""DeepSpeed's checkpoint engine, made to read weights without unpickling and to report a failed
write instead of raising it inside DeepSpeed's save.

- `WeightsOnlyCheckpointEngine`: DeepSpeed's `TorchCheckpointEngine.load` calls
  `torch.load(path, weights_only=False)`, which runs whatever a crafted layer file pickles. This one
  loads with weights_only=True (`trainer.files.load_tensors`) and refuses anything else.
- `load_state_dir_weights_only`: `PipelineModule.load_state_dir` with that engine. A refused file is
  on one rank (its stage's layers), while `load_state_dir` ends with the private
  `_synchronize_tied_weights`, a collective: the other ranks would wait there for ever. The tied
  weights are synchronised only after every rank said its files loaded (`raise_on_every_rank`;
  the deferral itself is compat.private_api.tied_weights_sync_deferred).
- `recording_save_errors`: DeepSpeed's `save_checkpoint` writes through the engine's
  `checkpoint_engine` attribute and ends with a barrier. A write that raises there (a full disk)
  leaves the other ranks in that barrier; recording the first failure, skipping the rank's further
  writes and returning lets every rank reach the end of the save and agree on what happened.
"""
from __future__ import annotations

import contextlib

from compat.private_api import synchronize_tied_weights, tied_weights_sync_deferred


def weights_only_checkpoint_engine():
    """A TorchCheckpointEngine whose `load` never unpickles anything but tensors and containers."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from trainer.files import load_tensors

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_tensors(path, map_location=map_location)

    return WeightsOnlyCheckpointEngine()


def load_state_dir_weights_only(module, layer_dir, strict: bool = True) -> None:
    """Collective: `module.load_state_dir(layer_dir)` reading each layer file with weights_only=True.
    A refused (or missing, or mismatched) file on any rank stops every rank with its one line."""
    from trainer.files import raise_on_every_rank

    error = None
    with tied_weights_sync_deferred(module):
        try:
            module.load_state_dir(str(layer_dir), checkpoint_engine=weights_only_checkpoint_engine(), strict=strict)
        except Exception as e:  # noqa: BLE001 - every rank learns of it before the collective below
            error = e
    raise_on_every_rank(error)
    synchronize_tied_weights(module)


class _RecordingEngine:
    """Wraps a DeepSpeed checkpoint engine: `save` records the first failure (path, exception) and
    skips this rank's later writes; everything else is the wrapped engine's."""

    def __init__(self, inner):
        self._inner = inner
        self.failures: list[tuple[str, BaseException]] = []

    def save(self, state_dict, path):
        from trainer.files import inject_enospc

        if self.failures:
            return None
        try:
            return inject_enospc(path, lambda: self._inner.save(state_dict, path))
        except (OSError, RuntimeError) as e:
            self.failures.append((str(path), e))
            return None

    def makedirs(self, path, exist_ok=False):
        try:
            return self._inner.makedirs(path, exist_ok=exist_ok)
        except OSError as e:
            self.failures.append((str(path), e))
            return None

    def __getattr__(self, name):
        return getattr(self._inner, name)


@contextlib.contextmanager
def recording_save_errors(*engines):
    """Within: every DeepSpeed engine in `engines` saves through a recorder, and every other saver
    with the engines' `save_checkpoint(save_dir, tag=...)` (trainer.ema.ActorEMA) records instead of
    raising; yields the list this rank's failures (path, exception) go to, in order."""
    failures: list = []
    undo = []
    for engine in engines:
        if hasattr(engine, "checkpoint_engine"):
            recorder = _RecordingEngine(engine.checkpoint_engine)
            recorder.failures = failures
            engine.checkpoint_engine = recorder
            undo.append(lambda engine=engine, inner=recorder._inner: setattr(engine, "checkpoint_engine", inner))
        else:
            engine.save_checkpoint = _recording_saver(engine.save_checkpoint, failures)
            undo.append(lambda engine=engine: delattr(engine, "save_checkpoint"))  # back to the class's method
    try:
        yield failures
    finally:
        for restore in undo:
            restore()


def _recording_saver(save_checkpoint, failures: list):
    def save(save_dir, tag, **kwargs):
        if failures:
            return None
        try:
            return save_checkpoint(save_dir, tag=tag, **kwargs)
        except (OSError, RuntimeError) as e:
            failures.append((getattr(e, "filename", None) or f"{save_dir}/{tag}", e))
            return None
    return save
