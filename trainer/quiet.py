"""DeepSpeed's lines that alarm on CPU and say nothing a pipetune user can act on, dropped from the
ranks' output. Every entry point calls quiet_deepspeed() before DeepSpeed is imported (its accelerator
line is logged at import); the quickstarts also pass `--quiet` to the `deepspeed` runner, whose own
process logs the hostfile and CUDA_VISIBLE_DEVICES lines.

    Setting accelerator to CPU ... unable to detect it    the CPU is the accelerator here, on purpose
    Unable to find hostfile ...                           one node: no hostfile is needed
    Setting CUDA_VISIBLE_DEVICES=...                      the runner's bookkeeping
    Attempting to get learning rate from scheduler ...    the progress bar reads the lr before step 1

The per-stage layer listing DeepSpeed prints while building a PipelineModule is silenced where it is
built (trainer/engine/build.py); pipetune logs its own split (trainer.metrics.log_plan)."""
import logging

NOISE = ("Setting accelerator to CPU", "Unable to find hostfile", "Setting CUDA_VISIBLE_DEVICES",
         "Attempting to get learning rate from scheduler before it has started")


class DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(NOISE)


def quiet_deepspeed() -> None:
    """Filter NOISE out of DeepSpeed's logger ("DeepSpeed"; the filter stays when DeepSpeed later
    configures that logger). Idempotent."""
    ds_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, DropNoise) for f in ds_logger.filters):
        ds_logger.addFilter(DropNoise())
