"""What one transformer block keeps for its backward pass: floating-point elements saved per token.

Counted from the tensors autograd saves in transformers' own `LlamaDecoderLayer` / `BloomBlock`
(checked against `torch.autograd.graph.saved_tensors_hooks` in tests/test_memory_model.py), not
including the weights (saved by reference). H hidden size, I MLP size, Hkv = kv heads x head_dim,
a attention heads, T sequence length:

  LLaMA   2 RMSNorms (input, normalised: 2H each), q/k/v after RoPE (H + 2Hkv), RoPE cos/sin (4 head_dim),
          attention output + its contiguous copy for o_proj (2H), SwiGLU: gate, silu(gate), up,
          silu(gate) * up (4I); attention: sdpa / flash keep a log-sum-exp per head (a), eager keeps the
          scores and probabilities (2 a T). Where a heads x head_dim = Q differs from H (Qwen3: explicit
          head_dim), the q-sized tensors scale with Q: measured 6 H + 1.75 Q for the norms, q and the
          attention output (sdpa's output layout makes some of its copies views), which is 7.75 H at Q = H
          (within 8% of the 7 H the LLaMA count used, and tested both ways). Qwen2 / Mistral / Llama 3
          save what LLaMA saves (biases add none).
  Qwen3   LLaMA + q_norm / k_norm over each head: their input and normalised output (2 Q + 2 Hkv) and
          one rsqrt per head (a + kv heads)
  Gemma 3 Qwen3 + 3 H + 2 Q (measured; see gemma3_block_elements)
  BLOOM   2 LayerNorms (2H), fused qkv input (H), q, k (2H), context (H), dense input (H), MLP input (H),
          gelu input and output (8H); eager attention probabilities (a T)
"""


def llama_block_elements(config, attn_implementation: str, seq_len: int) -> float:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads * head_dim == hidden:
        per_token = 7 * hidden
    else:
        per_token = 6 * hidden + 1.75 * heads * head_dim
    per_token += 2 * kv * head_dim + 4 * config.intermediate_size + 4 * head_dim
    per_token += 2 * heads * seq_len if attn_implementation == "eager" else heads
    return float(per_token)


def qwen3_block_elements(config, attn_implementation: str, seq_len: int) -> float:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    norms = 2 * heads * head_dim + 2 * kv * head_dim + heads + kv
    return llama_block_elements(config, attn_implementation, seq_len) + float(norms)


def bloom_block_elements(config, attn_implementation: str, seq_len: int) -> float:
    return float(16 * config.hidden_size + config.n_head * seq_len)


def gemma3_block_elements(config, attn_implementation: str, seq_len: int) -> float:
    """Qwen3's count (q/k norms) + what Gemma 3's block saves beyond it, measured with
    saved_tensors_hooks over hidden 128/256, heads x head_dim 128-512 and two MLP sizes (tests/
    test_families.py): 3 H (its extra post-attention / post-MLP RMSNorms) + 2 Q (heads x head_dim),
    within 3% (a further ~100 elements per token are left out); GeGLU's tanh-GELU saves what SiLU does."""
    q = config.num_attention_heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return qwen3_block_elements(config, attn_implementation, seq_len) + 3.0 * config.hidden_size + 2.0 * q
