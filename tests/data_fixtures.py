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
