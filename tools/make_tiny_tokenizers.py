"""Build the tiny tokenizers shipped under configs/ from configs/tokenizers/corpus.txt.

Run once (the outputs are committed; SentencePiece output differs by a few bytes between runs,
the vocabulary does not):
    python tools/make_tiny_tokenizers.py

- LLaMA: a SentencePiece BPE `tokenizer.model` with byte fallback, as real LLaMA ships it
  (ids: 0 <unk>, 1 <s>, 2 </s>; BOS added, EOS not, like LLaMA-2).
- BLOOM: a byte-level BPE `tokenizer.json` (ids: 0 <unk>, 1 <s>, 2 </s>, 3 <pad>, like BLOOM;
  no BOS/EOS added).
Both are loaded back with `AutoTokenizer.from_pretrained` and must round-trip the corpus: transformers
5 can silently build a tokenizer that maps every text to [] (`LlamaTokenizer(vocab_file=...)` ignores
the file and has 3 tokens), so the folder is loaded with `from_pretrained`.
"""
import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "configs" / "tokenizers" / "corpus.txt"
LLAMA_DIR = REPO / "configs" / "tiny-llama"
BLOOM_DIR = REPO / "configs" / "tiny-bloom"
LLAMA_VOCAB = 1024
BLOOM_VOCAB = 1024


def build_llama(out_dir: Path) -> None:
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "sp")
        spm.SentencePieceTrainer.train(
            input=str(CORPUS), model_prefix=prefix, model_type="bpe", vocab_size=LLAMA_VOCAB,
            byte_fallback=True, character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, hard_vocab_limit=False, num_threads=1, minloglevel=2,
        )
        shutil.copy(prefix + ".model", out_dir / "tokenizer.model")
    tok_cfg = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "model_max_length": 2048, "legacy": False, "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")


def build_bloom(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BLOOM_VOCAB, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train([str(CORPUS)], trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "model_max_length": 2048, "clean_up_tokenization_spaces": False, "padding_side": "left",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")


def check_round_trip(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    # Lines that start with spaces are left out: HF's LlamaTokenizer (like real LLaMA's) drops one
    # leading space on decode, a known property of the SentencePiece dummy prefix, not of our files.
    lines = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if not line[:1].isspace()]
    for line in lines + ["Unseen words: ξ∑ 𝔘 ok"]:
        ids = tok(line, add_special_tokens=False)["input_ids"]
        assert ids, f"{model_dir.name}: tokenizer returned no ids for {line!r}"
        back = tok.decode(ids)
        assert back == line, f"{model_dir.name}: round trip changed {line!r} -> {back!r}"
    print(f"{model_dir.name}: {len(tok)} tokens, round trip ok")


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    for d in (LLAMA_DIR, BLOOM_DIR):
        d.mkdir(parents=True, exist_ok=True)
    build_llama(LLAMA_DIR)
    build_bloom(BLOOM_DIR)
    check_round_trip(LLAMA_DIR)
    check_round_trip(BLOOM_DIR)


if __name__ == "__main__":
    main()
