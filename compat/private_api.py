"""Every use pipetune makes of a private DeepSpeed or transformers API, in one module.

Each function below names the private attribute it touches and why no public API does the job.
They were written against the versions in `WRITTEN_FOR` (the ones setup.py pins); `check_versions`
warns once, naming what to do, when the installed versions differ. The test suite exercises every
function here (2-stage training, tied embeddings, fp32 clipping, AutoTP demo, bench/train.py), so
after an upgrade `make test` says which of them broke.

Nothing heavy is imported at module import: DeepSpeed and transformers are imported inside the
functions that need them.
"""
import contextlib
import functools
import logging
import os

logger = logging.getLogger("pipetune")

WRITTEN_FOR = {"deepspeed": "0.19.8", "transformers": "5.23.0"}


@functools.lru_cache(maxsize=None)
def check_versions() -> list[str]:
    """Warn (once per process) when DeepSpeed or transformers are not the versions this module was
    written for; returns the mismatches as "name installed (written for X)" strings."""
    from importlib.metadata import PackageNotFoundError, version

    mismatches = []
    for name, expected in WRITTEN_FOR.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue
        if installed != expected:
            mismatches.append(f"{name} {installed} (written for {expected})")
    if mismatches and os.environ.get("RANK", "0") == "0":
        logger.warning(
            "pipetune uses private internals of %s: install the pinned versions (pip install -e . picks them from "
            "setup.py), or check compat/private_api.py against the installed ones and run `make test`",
            ", ".join(mismatches))
    return mismatches


# ---------------------------------------------------------------------------------------------
# transformers

def set_attn_implementation(config, name: str) -> None:
    """`config._attn_implementation = name`. transformers 5 takes `attn_implementation` only when a
    config or model is constructed (`from_pretrained(..., attn_implementation=...)`); a config that
    already exists (read from a checkpoint folder, then copied) has no public setter."""
    config._attn_implementation = name


def attn_implementation(config):
    """The attention implementation a config will use, or None when none was set (then
    `create_causal_mask` builds no mask and attention is silently non-causal)."""
    return getattr(config, "_attn_implementation", None)


# ---------------------------------------------------------------------------------------------
# DeepSpeed: PipelineModule

@functools.lru_cache(maxsize=None)
def partitioned_pipeline_module_class():
    """DeepSpeed's PipelineModule with an explicit per-stage layer split.

    `partition_method` accepts "uniform", "parameters" or "type:REGEX", not a list of layer counts,
    so this subclass overrides the private `_partition_layers` and sets the stage's range with
    `_set_bounds` (reading the private `_topo` and `_layer_specs`). Everything else (tied weights,
    checkpoint file naming and loading) is stock DeepSpeed.
    """
    check_versions()
    from deepspeed.pipe import PipelineModule

    class PartitionedPipelineModule(PipelineModule):
        def __init__(self, layers, *, boundaries=None, **kwargs):
            # Must be set before PipelineModule.__init__, which calls _partition_layers.
            self._explicit_boundaries = boundaries
            super().__init__(layers=layers, **kwargs)

        def _partition_layers(self, method="uniform"):
            if self._explicit_boundaries is None:
                return super()._partition_layers(method)
            if len(self._explicit_boundaries) != self.num_stages + 1 or self._explicit_boundaries[-1] != len(self._layer_specs):
                raise ValueError(f"stage boundaries {self._explicit_boundaries} do not split {len(self._layer_specs)} "
                                 f"layers into {self.num_stages} stages")
            self.parts = list(self._explicit_boundaries)
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    return PartitionedPipelineModule


def local_layers(module) -> list:
    """[(global pipe-layer index, layer)] for this rank's stage. DeepSpeed keeps the built layers in
    `forward_funcs` (modules, or functions for a tied head) starting at the private `_local_start`."""
    return [(module._local_start + i, layer) for i, layer in enumerate(module.forward_funcs)]


def synchronize_tied_weights(module) -> None:
    """Broadcast tied weights (embedding <-> tied LM head) from their first stage, as DeepSpeed does
    after building the module; needed again after weights are written in place (init, partial load).
    DeepSpeed has only the private `_synchronize_tied_weights` for it."""
    module._synchronize_tied_weights()


def is_replica_of_tied_weight(param) -> bool:
    """True for a tied weight's copy on a stage other than its first one: DeepSpeed marks those
    copies with `ds_pipe_replicated` so that norms count a tied weight once."""
    return bool(getattr(param, "ds_pipe_replicated", False))


# ---------------------------------------------------------------------------------------------
# DeepSpeed: engine

def clip_fp32_gradients_over_whole_pipeline(engine) -> None:
    """Gradient clipping in plain fp32 over the *whole* pipeline, and the norm kept for logging.

    DeepSpeed 0.19's fp32 path (`clip_fp32_gradients` -> `runtime.utils.clip_grad_norm_`) counts only
    the gradients of parameters on the rank whose model-parallel rank is 0 (with a pipeline grid that
    is the first stage) before summing over the stages, so the clipping norm ignores every later stage
    (measured: 2-stage SGD drifted from the single-process loop by 4e-3 in loss after one clipped
    step), and it keeps no norm to log. This replaces that one method on this engine instance: the
    squared norms of each stage's gradients (a tied weight counted once, on its first stage) are summed
    over the pipeline group, gradients are scaled like torch.nn.utils.clip_grad_norm_, and the norm is
    stored in the private `_global_grad_norm` that the public `get_global_grad_norm()` returns.
    Data-parallel replicas hold identical, already averaged gradients at this point. DeepSpeed's
    fp16/bf16/ZeRO optimizers compute (over every stage) and keep their own norms: left alone.
    """
    import torch
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    if engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization():
        return
    module = engine.module

    def clip_and_record():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        device = grads[0].device if grads else torch.device(get_accelerator().current_device_name())
        local = torch.zeros((), dtype=torch.float32, device=device)
        for p in module.parameters():
            if p.grad is not None and not is_replica_of_tied_weight(p):
                local += p.grad.detach().float().pow(2).sum()
        dist.all_reduce(local, group=engine.grid.get_pipe_parallel_group())
        norm = float(local.sqrt())
        coef = engine.gradient_clipping() / (norm + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        engine._global_grad_norm = norm

    engine.clip_fp32_gradients = clip_and_record


def time_pipe_instructions(engine, wrap) -> None:
    """Wrap each pipeline-schedule instruction handler of this engine: `wrap(name, handler)` returns
    the replacement. The handlers live in the private class table `_INSTRUCTION_MAP`
    (instruction type -> method); DeepSpeed's own timers do not split time per instruction.
    Used by bench/train.py only."""
    engine._INSTRUCTION_MAP = {k: wrap(k.__name__, v) for k, v in type(engine)._INSTRUCTION_MAP.items()}


# ---------------------------------------------------------------------------------------------
# DeepSpeed: comm (inference all-reduce on CPU)

def avoid_shm_allreduce_segfault(environ=None) -> bool:
    """Route AutoTP's all-reduce through torch.distributed when not every rank is on this machine.

    DeepSpeed 0.19.8 (CPU) sets up its shared-memory all-reduce only when LOCAL_SIZE == WORLD_SIZE
    (deepspeed/ops/csrc/cpu/comm/shm_interface.cpp), but `inference_all_reduce` calls the shm kernel
    whenever the backend's `shm_vector_kernel_level` allows it (deepspeed/comm/torch.py), and then
    segfaults. The deepspeed launcher on one machine sets LOCAL_SIZE == WORLD_SIZE; torchrun (no
    LOCAL_SIZE) and multi-node runs do not. Level 0 makes it fall back to torch.distributed.all_reduce.
    The backend object is the private module global `deepspeed.comm.comm.cdb`.
    Returns True when it changed the setting."""
    environ = os.environ if environ is None else environ
    if environ.get("LOCAL_SIZE") == environ.get("WORLD_SIZE"):
        return False
    from deepspeed.comm import comm

    backend = comm.cdb
    if backend is None or getattr(backend, "shm_vector_kernel_level", 0) == 0:
        return False  # no shm op built, or already off: the fallback is used anyway
    backend.shm_vector_kernel_level = 0
    return True


def release_shm_allreduce_names(environ=None) -> str | None:
    """Remove this rank's shared-memory all-reduce segment name from /dev/shm once every rank has mapped it.

    On the CPU accelerator DeepSpeed 0.19.8's comm backend builds its shm all-reduce op at
    init_distributed and, when LOCAL_SIZE == WORLD_SIZE, each rank creates a 69 MB POSIX segment
    `deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>` that peers open by name
    (deepspeed/ops/csrc/cpu/comm/shm.cpp) and that nothing ever unlinks: every launch leaves
    WORLD_SIZE of them in RAM-backed /dev/shm until reboot (a test suite of ~100 launches filled 20 GB).
    The name is needed only while peers open it, inside init_distributed; the mappings outlive the
    unlink (shm_unlink semantics), so after a barrier each rank removes its own name. The naming
    scheme is DeepSpeed's internal, hence here. Returns the removed path, or None."""
    import torch.distributed as dist

    environ = os.environ if environ is None else environ
    if environ.get("LOCAL_SIZE") != environ.get("WORLD_SIZE", "1") or not dist.is_initialized():
        return None  # the op made no segment (not all ranks local), or there is no group to wait on
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{environ.get('MASTER_ADDR', '')}_"
            f"{environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    path = os.path.join("/dev/shm", name)
    if not os.path.exists(path):
        return None  # no shm op on this build (CUDA has none) or a non-Linux /dev/shm: no barrier needed
    dist.barrier()  # every peer has opened and mapped every segment (shm_initialize ran in init_distributed)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    return path


def load_checkpoint_with_own_model_states(engine, load_dir: str, tag: str, **kwargs):
    """`engine.load_checkpoint` that also works when this node sees only its own stages' files
    (a node-local save_path).

    DeepSpeed lists every stage's `mp_rank_XX_model_states.pt` in the tag folder (the private
    `_get_all_ckpt_names`), opens the first one only to compare their number with the saved
    `mp_world_size`, then loads the one at this rank's model-parallel index: its own. When the folder
    holds fewer files than that (other stages' files are on other nodes), the list handed to it
    names this rank's own file (`_get_ckpt_name`) mp_world_size times, which passes the count check
    and loads the same file as before. With every file present the stock list is used."""
    own = engine._get_ckpt_name(load_dir, tag)
    stock = engine._get_all_ckpt_names

    def names(checkpoints_path, tag_):
        found = stock(checkpoints_path, tag_)
        if len(found) < engine.mp_world_size and os.path.isfile(own):
            return [own] * engine.mp_world_size
        return found

    engine._get_all_ckpt_names = names
    try:
        return engine.load_checkpoint(load_dir, tag=tag, **kwargs)
    finally:
        del engine._get_all_ckpt_names  # back to the class's method


@contextlib.contextmanager
def tied_weights_sync_deferred(module):
    """Within: `module.load_state_dir` skips its closing tied-weight broadcast (the private
    `_synchronize_tied_weights`, a collective), so that the ranks can first agree whether every
    rank's layer files loaded (compat.checkpoint_files.load_state_dir_weights_only); call
    `synchronize_tied_weights` after. A rank whose file was refused would otherwise leave the
    others waiting in that broadcast."""
    module._synchronize_tied_weights = lambda: None
    try:
        yield
    finally:
        del module._synchronize_tied_weights  # back to the class's method
