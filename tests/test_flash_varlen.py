"""Packed rows under flash attention (issue 16.2): the LLaMA block builds no mask and hands the
kernel cu_seqlens instead (models.stage_io.varlen_kwargs), as transformers' padding-free varlen path
takes them. No flash kernel runs on CPU, so the "flash_attention_2" entry of transformers' attention
registry is replaced here by a reference varlen attention written with sdpa, segment by segment: the
block's output must equal the sdpa path with the block-diagonal segment mask (the CPU default), and
the kernel must have been given the right offsets and no mask. What only a GPU can check (the real
kernel's numerics and speed) is left to bench/train.py there."""
import torch
import torch.nn.functional as F

from compat.private_api import set_attn_implementation
from models.stage_io import varlen_kwargs


def test_varlen_offsets_cut_rows_and_segments():
    segments = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 2, 2, 2, 3, 3]])
    kw = varlen_kwargs(segments)
    # row 0: [0,3) [3,5) [5,6) pad; row 1 starts at 6: [6,7) [7,10) [10,12)
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 7, 10, 12]
    assert kw["cu_seq_lens_q"].dtype == torch.int32 and kw["cu_seq_lens_k"] is kw["cu_seq_lens_q"]
    assert kw["max_length_q"] == kw["max_length_k"] == 3


def test_a_row_that_continues_the_previous_rows_segment_id_is_cut_at_its_start():
    kw = varlen_kwargs(torch.tensor([[1, 1], [1, 1]]))
    assert kw["cu_seq_lens_q"].tolist() == [0, 2, 4] and kw["max_length_q"] == 2


def reference_varlen_attention(calls):
    """An attention function with flash_attention_2's registry signature, computing causal attention
    within each [cu[i], cu[i+1]) span of the flattened batch (query [B,h,T,d] as transformers passes it)."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        calls.append({"mask": attention_mask, **{k: kwargs.get(k) for k in ("cu_seq_lens_q", "max_length_q")}})
        batch, heads, seq_len, dim = query.shape
        groups = heads // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        flat = [x.transpose(1, 2).reshape(batch * seq_len, heads, dim) for x in (query, key, value)]
        out = torch.empty_like(flat[0])
        cu = kwargs["cu_seq_lens_q"].tolist()
        for a, b in zip(cu[:-1], cu[1:]):
            q, k, v = (x[a:b].transpose(0, 1) for x in flat)  # [h, n, d]
            out[a:b] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling).transpose(0, 1)
        return out.view(batch, seq_len, heads, dim), None

    return attention


def test_packed_block_under_flash_equals_the_segment_mask_path():
    from conftest import CONFIGS
    from transformers import AttentionInterface, AutoConfig
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from models.pipeline import build_layers, prepare_config

    config = prepare_config(AutoConfig.from_pretrained(CONFIGS["llama"]), "sdpa")
    torch.manual_seed(0)
    block = build_layers(config, "lm")[1].eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    segments = torch.tensor([[1, 1, 1, 2, 2, 0, 0], [1, 1, 2, 2, 2, 2, 3]])
    mask = (segments > 0).long()
    hidden = torch.randn(2, 7, config.hidden_size)
    with torch.no_grad():
        expected = block((hidden, mask, segments))[0]
    calls = []
    original = ALL_ATTENTION_FUNCTIONS["flash_attention_2"]
    AttentionInterface.register("flash_attention_2", reference_varlen_attention(calls))
    try:
        set_attn_implementation(config, "flash_attention_2")
        with torch.no_grad():
            got = block((hidden, mask, segments))[0]
    finally:
        set_attn_implementation(config, "sdpa")
        AttentionInterface.register("flash_attention_2", original)
    assert calls and calls[0]["mask"] is None and calls[0]["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 9, 13, 14]
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)
    assert not torch.allclose(got[real], block((hidden, mask))[0][real].detach(), atol=1e-3)  # segments matter here
