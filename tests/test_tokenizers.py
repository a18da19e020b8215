"""The shipped tiny tokenizers really tokenize: transformers 5 can silently build a tokenizer that
maps every text to [] (LlamaTokenizer(vocab_file=...) ignores the file)."""
import pytest
from conftest import CONFIGS
from transformers import AutoTokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "人工智能是计算机科学的一个分支。",
    "Mixed 中文 and English, numbers 3.14 and symbols {}[]!",
    "Unseen: ξ∑ 𝔘",  # byte fallback
]


@pytest.mark.parametrize("model_type", ["llama", "bloom"])
def test_round_trip(model_type):
    tok = AutoTokenizer.from_pretrained(CONFIGS[model_type])
    assert len(tok) == 1024
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) >= 3, f"{model_type} tokenizer gave {ids} for {text!r}"
        assert tok.decode(ids) == text


def test_special_token_conventions():
    llama = AutoTokenizer.from_pretrained(CONFIGS["llama"])
    bloom = AutoTokenizer.from_pretrained(CONFIGS["bloom"])
    # LLaMA adds BOS (id 1) and no EOS; BLOOM adds neither. EOS is id 2 for both; BLOOM pads with 3.
    assert llama("hi")["input_ids"][0] == 1 and llama("hi")["input_ids"][-1] != 2
    assert bloom("hi")["input_ids"][0] != 1
    assert (llama.eos_token_id, bloom.eos_token_id, bloom.pad_token_id) == (2, 2, 3)
    # SentencePiece model, as real LLaMA ships it: a tokenizer.model file, a LlamaTokenizer class.
    assert (CONFIGS["llama"] / "tokenizer.model").is_file()
    assert type(llama).__name__ == "LlamaTokenizer"


@pytest.mark.parametrize("reserved", [True, False])
def test_llama3_style_test_tokenizer_round_trips_and_has_no_pad_or_unk(reserved):
    """tests/data_fixtures.py's Llama-3-style tokenizer (the pad-token tests build datasets with it)."""
    from data_fixtures import LLAMA3_BOS, LLAMA3_EOS, llama3_style_tokenizer

    tok = llama3_style_tokenizer(reserved)
    assert tok.pad_token is None and tok.unk_token is None
    assert (tok.bos_token, tok.eos_token) == (LLAMA3_BOS, LLAMA3_EOS)
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # BOS added, like Llama-3
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) >= 3 and tok.decode(ids) == text
