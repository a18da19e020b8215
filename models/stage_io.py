"""What flows between pipeline stages, and how each block rebuilds what it needs from it.

The contract (written once, here):

    stage 0 input   (input_ids int64[B,T], attention_mask int64[B,T][, segment_ids int64[B,T]])
    between stages  (hidden_states float[B,T,H], attention_mask int64[B,T][, segment_ids int64[B,T]])
    last stage out  logits float[B,T,V] (LM head) or values float[B,T] (value head)

- attention_mask: 1 for real tokens, 0 for padding (right padding in training, left in generation).
- segment_ids (optional, packing): 1..k for the k records packed in a row, 0 for padding. Attention
  never crosses segments and positions restart at 0 in each segment.
- Only `hidden_states` is floating point, so it is the only tensor DeepSpeed sends a gradient back
  for; integer tensors cross stage boundaries for free.

Every block rebuilds position ids, the causal mask (and RoPE cos/sin or BLOOM's alibi) from the
integer tensors. That is cheap next to attention, and nothing fragile (float masks, cached
rotary tensors) ever crosses a stage boundary.
"""
from typing import Callable, Optional

import torch

from compat.private_api import set_attn_implementation


def split_stage_inputs(inputs: tuple) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(x, attention_mask[, segment_ids]) -> x, attention_mask, segment_ids-or-None."""
    if not isinstance(inputs, (tuple, list)) or len(inputs) not in (2, 3):
        raise TypeError(
            "pipe layers take a tuple (tensor, attention_mask[, segment_ids]); "
            f"got {type(inputs).__name__} of length {len(inputs) if isinstance(inputs, (tuple, list)) else '-'}"
        )
    segment_ids = inputs[2] if len(inputs) == 3 else None
    return inputs[0], inputs[1], segment_ids


def join_stage_outputs(hidden: torch.Tensor, attention_mask: torch.Tensor, segment_ids: Optional[torch.Tensor]) -> tuple:
    return (hidden, attention_mask) if segment_ids is None else (hidden, attention_mask, segment_ids)


def position_ids_from(attention_mask: torch.Tensor, segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int64[B,T] positions: 0,1,2,... over real tokens (left padding shifts them, as HF generate
    does), restarting at each new segment when `segment_ids` is given. Pad positions are 1 (HF's
    choice), they are masked anyway."""
    if segment_ids is None:
        positions = attention_mask.long().cumsum(-1) - 1
    else:
        seq_len = segment_ids.shape[-1]
        idx = torch.arange(seq_len, device=segment_ids.device).expand_as(segment_ids)
        # A segment starts where the id changes; positions count from that start.
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values
        positions = idx - start_idx
    return positions.masked_fill(attention_mask == 0, 1)


# Attention implementations that take packed rows padding-free, as cu_seqlens (transformers'
# FlashAttentionKwargs): no mask is built for them, the kernel never sees another segment's tokens.
VARLEN_IMPLEMENTATIONS = frozenset({"flash_attention_2", "flash_attention_3"})


def varlen_kwargs(segment_ids: torch.Tensor) -> dict:
    """FlashAttentionKwargs for packed rows: the [B,T] rows flattened into one sequence of B*T tokens,
    cut at every row start and every change of segment id (a row's trailing padding is a sequence of
    its own, whose outputs no loss reads). cu_seq_lens int32[n+1] (the offsets), max_length the longest."""
    batch, seq_len = segment_ids.shape
    flat = segment_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::seq_len] = True
    offsets = torch.cat([starts.nonzero().flatten(), torch.tensor([batch * seq_len], device=flat.device)]).to(torch.int32)
    longest = int((offsets[1:] - offsets[:-1]).max())  # one host sync per stage forward
    return {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": longest, "max_length_k": longest}


def same_segment_mask_fn(segment_ids: torch.Tensor) -> Callable:
    """An `and_mask_function` for transformers' `create_causal_mask`: token q may attend to kv only
    within the same segment (a block-diagonal causal mask for packed rows)."""

    def same_segment(batch_idx, head_idx, q_idx, kv_idx):
        return segment_ids[batch_idx, q_idx] == segment_ids[batch_idx, kv_idx]

    return same_segment


def resolve_attn_implementation(config, requested: Optional[str], supported: tuple[str, ...]) -> str:
    """Pick and set the config's attention implementation explicitly.

    A freshly built config has none set (None); transformers then builds no causal
    mask and attention silently becomes NON-causal. So this is never left to a default.
    `requested`: None (first of `supported`), "eager", "sdpa" or "flash_attention_2".
    """
    choice = requested or supported[0]
    if choice not in supported:
        raise ValueError(
            f"attention implementation {choice!r} is not supported for model_type "
            f"{config.model_type!r}; use one of {list(supported)}"
        )
    if choice == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise RuntimeError(
                "flash attention was requested (use_flash_attn) but the flash_attn package is not "
                "usable here: install it on a CUDA machine (pip install flash-attn --no-build-isolation) "
                "or set use_flash_attn to false"
            )
    set_attn_implementation(config, choice)
    return choice
