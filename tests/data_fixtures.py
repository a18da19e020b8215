"""Shared helpers for tests/test_data_*.py (imported by name; tests/conftest.py is not ours)."""
import functools
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIXED = os.path.join(ROOT, "data", "samples", "mixed.json")
TOKENIZER_DIRS = {"llama": os.path.join(ROOT, "configs", "tiny-llama"),
                  "bloom": os.path.join(ROOT, "configs", "tiny-bloom")}


@functools.lru_cache(maxsize=None)
def load_tokenizer(name):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TOKENIZER_DIRS[name])


@pytest.fixture(params=sorted(TOKENIZER_DIRS))
def tok(request):
    return load_tokenizer(request.param)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False)
    return str(path)


def msg(role, content):
    return {"role": role, "content": content}


def items(built):
    """Every training item of a data.dataset.Built as nested lists (comparable)."""
    def plain(x):
        return [plain(y) for y in x] if isinstance(x, (tuple, list)) else x.tolist()
    return [plain(built.train[i]) for i in range(len(built.train))]


def write_jsonl(path, lines):
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
    return str(path)


# Llama-3-style tokenizers: byte-level BPE with neither a pad nor an unk token, BOS added by the
# post-processor. Built from the tokenizer corpus in a second (nothing is downloaded).
LLAMA3_BOS, LLAMA3_EOS = "<|begin_of_text|>", "<|end_of_text|>"
LLAMA3_RESERVED = ("<|reserved_special_token_0|>", "<|reserved_special_token_1|>")


@functools.lru_cache(maxsize=None)
def llama3_style_tokenizer(reserved: bool = True, bos: str = LLAMA3_BOS, vocab_size: int = 600):
    """A PreTrainedTokenizerFast without pad and unk; ``reserved``: with two reserved special tokens
    (ids 2 and 3, as Llama-3 has them), else none; ``bos``: the BOS text (== the EOS text: a tokenizer
    with nothing safe to pad with)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([bos, LLAMA3_EOS])) + (list(LLAMA3_RESERVED) if reserved else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train([os.path.join(ROOT, "configs", "tokenizers", "corpus.txt")],
              trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=LLAMA3_EOS,
                                   additional_special_tokens=list(LLAMA3_RESERVED) if reserved else None,
                                   clean_up_tokenization_spaces=False)


# Chat templates written here in the style of real chat models (no downloads). LLAMA3_TEMPLATE is
# Llama-3-Instruct's (content trimmed, BOS from the template, no {% generation %} blocks); CHATML_TEMPLATE
# is ChatML (Qwen, SmolLM) and CHATML_GENERATION_TEMPLATE the same with {% generation %} blocks around
# what an assistant turn trains on (its content and <|im_end|>).
LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
_CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}OPEN{{ message['content'] + '<|im_end|>' }}"
    "CLOSE{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_TEMPLATE = _CHATML.replace("OPEN", "").replace("CLOSE", "")
CHATML_GENERATION_TEMPLATE = _CHATML.replace("OPEN", "{% generation %}").replace("CLOSE", "{% endgeneration %}")
# Llama-3's pre-tokenizer split: "\n\n" stays one piece before a word, so a prompt ending with the
# header's "\n\n" tokenizes as the start of the whole sample does.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


@functools.lru_cache(maxsize=None)
def chat_tokenizer(style: str, template: str = None):
    """A byte-level BPE tokenizer with the special tokens of a chat model and no usable pad token:
    "llama3": Llama-3-Instruct's (BOS added, EOS <|eot_id|>, no pad and no unk; reserved tokens);
    "chatml": SmolLM2-Instruct's (no BOS added, EOS <|im_end|>, pad == EOS, unk <|endoftext|>).
    ``template``: its chat_template (default: LLAMA3_TEMPLATE / CHATML_GENERATION_TEMPLATE)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style == "llama3":
        specials = [LLAMA3_BOS, LLAMA3_EOS, *LLAMA3_RESERVED, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train([os.path.join(ROOT, "configs", "tokenizers", "corpus.txt")],
              trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if style == "llama3":
        bos_id = tok.token_to_id(LLAMA3_BOS)
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{LLAMA3_BOS} $A", pair=f"{LLAMA3_BOS} $A {LLAMA3_BOS} $B",
                                          special_tokens=[(LLAMA3_BOS, bos_id)])])
        out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=LLAMA3_BOS, eos_token="<|eot_id|>",
                                      additional_special_tokens=[*LLAMA3_RESERVED, "<|start_header_id|>",
                                                                 "<|end_header_id|>"],
                                      clean_up_tokenization_spaces=False)
    else:
        out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                      pad_token="<|im_end|>", unk_token="<|endoftext|>",
                                      clean_up_tokenization_spaces=False)
    out.chat_template = template or (LLAMA3_TEMPLATE if style == "llama3" else CHATML_GENERATION_TEMPLATE)
    return out
