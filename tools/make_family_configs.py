"""Build the tiny model folders of the LLaMA-shaped families under configs/ (config.json,
generation_config.json, tokenizer files with the family's special tokens and chat template), from
configs/tokenizers/corpus.txt. Nothing is downloaded; the outputs are committed:

    python tools/make_family_configs.py

Each is the family's real config scaled down (hidden 64, 4 layers, 4 heads, 2 KV heads, vocab 1024)
with the choices that make it that family, and a tokenizer in the family's style:

- tiny-qwen2 (Qwen2.5-0.5B-Instruct-shaped): q/k/v biases, rope theta 1e6, tied head,
  `use_sliding_window` false (sliding_window / max_window_layers as released, so a test can switch
  it on); byte-level BPE with Qwen's pre-tokenizer (single digits), specials after the BPE vocabulary
  (<|endoftext|> pad, <|im_start|>, <|im_end|> EOS), no BOS, ChatML with Qwen2.5's default system
  message; config vocab padded beyond the tokenizer's (as Qwen's 151,936 > 151,665).
- tiny-qwen3 (Qwen3-0.6B-shaped): q_norm/k_norm, head_dim 32 although hidden / heads is 16, tied
  head; Qwen's tokenizer; ChatML without a default system message (Qwen3's thinking blocks are left
  out of this tiny template).
- tiny-mistral (Mistral-7B-Instruct-v0.2-shaped): the LLaMA block, `sliding_window` null (v0.1's 4096
  is switched on by the tests), untied; the SentencePiece tokenizer of tiny-llama with Mistral's
  `[INST] ... [/INST]` template (answers end with </s>).
- tiny-llama3 (Llama-3.2-1B-Instruct-shaped): `rope_type: "llama3"` frequency scaling (original
  context 64 so that it changes the tiny model's frequencies), rope theta 5e5, tied head; byte-level
  BPE with Llama 3's pre-tokenizer, specials after the BPE vocabulary (no pad, no unk:
  <|finetune_right_pad_id|> is there to pad with, as in 3.1+), BOS added, EOS <|eot_id|>, several eos
  ids (<|end_of_text|>, <|eom_id|>, <|eot_id|>) in config.json and generation_config.json; Llama
  3.1's header template with its dated system preamble.
- tiny-gemma3 (Gemma-3-1B-it-shaped, `gemma3_text`): GeGLU, (1 + w) norms, q/k norms, head_dim 16,
  query_pre_attn_scalar 16, layers sliding, sliding, sliding, full (1B: five sliding per full) with
  RoPE bases 1e4 / 1e6, sliding_window 8 (1B: 512; short here so that tiny sequences exceed it), tied
  head; byte-level BPE with Gemma's specials first (<pad> 0, <eos> 1, <bos> 2, <unk> 3) and
  <start_of_turn>/<end_of_turn> after the vocabulary, BOS added, EOS <eos>, generation eos ids
  [<eos>, <end_of_turn>]; Gemma 3's template (assistant -> "model", system text folded into the first
  user turn).

Every tokenizer is loaded back with AutoTokenizer and must round-trip the corpus and its own chat
template's special tokens.
"""
import argparse
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "configs" / "tokenizers" / "corpus.txt"
VOCAB = 1024
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.02)

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")

QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n")
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n")
LLAMA31_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}\n")
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}\n")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}\n")

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"]


def byte_level_bpe(split: str, n_tokens: int, specials: list[str]):
    """A byte-level BPE of `n_tokens` learned tokens, then `specials` appended after them (as the real
    models number them: BPE ranks first, special tokens at the end)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train([str(CORPUS)], trainers.BpeTrainer(vocab_size=n_tokens, show_progress=False,
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def save_tokenizer(tok, out: Path, template: str, **kwargs):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, model_max_length=2048, **kwargs)
    fast.chat_template = template
    fast.save_pretrained(out)
    return fast


def write_config(out: Path, config, generation: dict) -> None:
    config.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({**generation, "max_new_tokens": 64}, indent=2) + "\n")


def build_qwen(out: Path, model_type: str) -> None:
    from transformers import Qwen2Config, Qwen3Config

    out.mkdir(parents=True, exist_ok=True)
    tok = byte_level_bpe(QWEN_SPLIT, 900, QWEN_SPECIALS)
    ids = {s: tok.token_to_id(s) for s in QWEN_SPECIALS}
    save_tokenizer(tok, out, QWEN25_TEMPLATE if model_type == "qwen2" else QWEN3_TEMPLATE,
                   eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"],
                   errors="replace", split_special_tokens=False)
    common = dict(SHAPE, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=2, attention_dropout=0.0)
    if model_type == "qwen2":
        config = Qwen2Config(**common)
    else:
        config = Qwen3Config(**common, head_dim=32, attention_bias=False)
    write_config(out, config, {"bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
                               "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]})


def build_llama3(out: Path) -> None:
    from tokenizers import processors
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    tok = byte_level_bpe(LLAMA3_SPLIT, VOCAB - len(LLAMA3_SPECIALS), LLAMA3_SPECIALS)
    ids = {s: tok.token_to_id(s) for s in LLAMA3_SPECIALS}
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids[bos])])])
    save_tokenizer(tok, out, LLAMA31_TEMPLATE, bos_token=bos, eos_token="<|eot_id|>")
    eos = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(**dict(SHAPE, vocab_size=len(tok.get_vocab())), head_dim=16, bos_token_id=ids[bos],
                         eos_token_id=eos, tie_word_embeddings=True, rope_parameters=rope, attention_bias=False,
                         mlp_bias=False)
    write_config(out, config, {"bos_token_id": ids[bos], "eos_token_id": eos})


def build_gemma3(out: Path) -> None:
    from tokenizers import AddedToken, processors
    from transformers import Gemma3TextConfig

    out.mkdir(parents=True, exist_ok=True)
    first = ["<pad>", "<eos>", "<bos>", "<unk>"]
    turns = ["<start_of_turn>", "<end_of_turn>"]
    # Gemma numbers <pad> <eos> <bos> <unk> 0-3: they come first, the turn markers after the BPE.
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train([str(CORPUS)], trainers.BpeTrainer(vocab_size=904, special_tokens=first, show_progress=False,
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in turns])
    ids = {t: tok.token_to_id(t) for t in first + turns}
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", ids["<bos>"])])
    save_tokenizer(tok, out, GEMMA3_TEMPLATE, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                   additional_special_tokens=turns)
    layer_types = ["sliding_attention"] * 3 + ["full_attention"]
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}
    config = Gemma3TextConfig(**SHAPE, head_dim=16, query_pre_attn_scalar=16, layer_types=layer_types, sliding_window=8,
                              rope_parameters=rope, bos_token_id=ids["<bos>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
                              pad_token_id=ids["<pad>"], tie_word_embeddings=True, final_logit_softcapping=None,
                              attn_logit_softcapping=None, hidden_activation="gelu_pytorch_tanh")
    write_config(out, config, {"bos_token_id": ids["<bos>"], "pad_token_id": ids["<pad>"],
                               "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]]})


def build_mistral(out: Path) -> None:
    from transformers import MistralConfig

    out.mkdir(parents=True, exist_ok=True)
    llama = REPO / "configs" / "tiny-llama"
    shutil.copy(llama / "tokenizer.model", out / "tokenizer.model")
    tok_cfg = json.loads((llama / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(MISTRAL_TEMPLATE)
    config = MistralConfig(**SHAPE, head_dim=16, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                           sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    write_config(out, config, {"bos_token_id": 1, "eos_token_id": 2})


def check(out: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    config = AutoConfig.from_pretrained(out)
    assert len(tok) <= config.vocab_size, (out.name, len(tok), config.vocab_size)
    lines = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if not line[:1].isspace()]
    for line in lines + ["Unseen words: ξ∑ 𝔘 ok"]:
        ids = tok(line, add_special_tokens=False)["input_ids"]
        assert ids and tok.decode(ids) == line, (out.name, line, tok.decode(ids))
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = tok.apply_chat_template(chat, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text, (out.name, text, tok.decode(ids))
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert set(ids) & set(eos if isinstance(eos, list) else [eos]), (out.name, "no eos id ends the rendered answer")
    print(f"{out.name}: {len(tok)} tokens, vocab {config.vocab_size}, eos {tok.eos_token!r}, chat: {text!r}")


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    configs = REPO / "configs"
    build_qwen(configs / "tiny-qwen2", "qwen2")
    build_qwen(configs / "tiny-qwen3", "qwen3")
    build_mistral(configs / "tiny-mistral")
    build_llama3(configs / "tiny-llama3")
    build_gemma3(configs / "tiny-gemma3")
    for name in ("tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-llama3", "tiny-gemma3"):
        check(configs / name)


if __name__ == "__main__":
    main()
