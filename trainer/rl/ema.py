"""An exponential moving average of the PPO actor's weights (`ppo.ema_decay`), as DeepSpeed-Chat's
`--enable_ema`: after every actor optimizer step, ema = decay * ema + (1 - decay) * weights.

Each rank keeps the average of its own stage's layers in fp32. It is saved as a pipeline checkpoint
of its own, SAVE_PATH/ema/global_stepN/layer_XX-model_states.pt (DeepSpeed's layer-file names and
keys, in the model's dtype; written by each stage's first data-parallel replica) with the actor's side
files and SAVE_PATH/ema/latest, so that `pp_to_hg --input-path SAVE_PATH/ema` exports it like any
training save_path; trainer.engine.checkpoint saves it with the actor and critic under the one `latest`.
"""
from pathlib import Path

import torch

from compat.private_api import local_layers
from models.pipe_dir import layer_file_name


class ActorEMA:
    def __init__(self, module, decay: float, dp_rank: int):
        self.module, self.decay, self.dp_rank = module, decay, dp_rank
        self.shadow = {index: {k: v.detach().float().clone() for k, v in layer.state_dict().items()}
                       for index, layer in self._layers()}

    def _layers(self):
        return [(i, layer) for i, layer in local_layers(self.module) if isinstance(layer, torch.nn.Module)]

    @torch.no_grad()
    def update(self) -> None:
        for index, layer in self._layers():
            for name, value in layer.state_dict().items():
                self.shadow[index][name].mul_(self.decay).add_(value.float(), alpha=1.0 - self.decay)

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = False) -> None:
        """The engines' save interface (trainer.engine.checkpoint's companions): layer files in save_dir/tag."""
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        if self.dp_rank != 0:
            return
        for index, layer in self._layers():
            dtypes = {k: v.dtype for k, v in layer.state_dict().items()}
            torch.save({k: v.to(dtypes[k]) for k, v in self.shadow[index].items()}, folder / layer_file_name(index))

    def load(self, folder: Path) -> None:
        for index, _ in self._layers():
            saved = torch.load(Path(folder) / layer_file_name(index), map_location="cpu", weights_only=True)
            self.shadow[index] = {k: v.float() for k, v in saved.items()}
