"""Data pipeline benchmark: tokenization records/s and packing efficiency on a mixed-length set.

    python bench/data.py [--records 20000] [--max-seq-len 1024] [--tokenizer configs/tiny-llama]

Generates a deterministic synthetic record set (every type; lengths log-uniform from a few tokens to
about max_seq_len), then times build_dataset end to end (validate + render + batched fast tokenization
with offsets + masks + fitting) without cache, and reports padding efficiency = real tokens / computed
tokens (rows * max_seq_len) with and without packing. Goal with packing: >= 0.95.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = ("the model stage pipeline token answer question data train loss layer 模型 数据 训练 流水线 "
         "parallel device batch micro gradient 长城 熊猫 reference").split()


def synthetic_records(n: int, max_words: int, seed: int = 0):
    rng = random.Random(seed)

    def text(lo=2):
        k = int(round(2 ** rng.uniform(1, max(2.0, (max_words // 2).bit_length()))))  # log-uniform length
        return " ".join(rng.choice(WORDS) for _ in range(max(lo, k)))

    out = []
    for i in range(n):
        t = i % 5
        if t == 0:
            out.append({"type": "pretrain", "text": text()})
        elif t == 1:
            out.append({"type": "instruct", "instruct": text(), "input": text(), "output": text()})
        elif t == 2:
            out.append({"type": "conversation", "rounds": [[r, text()] for r in ("ask", "ans", "ask", "ans")]})
        elif t == 3:
            out.append({"type": "ref_qa", "reference": text(), "rounds": [["ask", text()], ["ans", text()]]})
        else:
            out.append({"type": "pairwise", "prompt": text(), "chosen": text(), "rejected": text()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--tokenizer", default="configs/tiny-llama")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer
    from data.dataset import build_dataset
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.jsonl")
        with open(path, "w", encoding="utf-8") as fh:
            for r in synthetic_records(args.records, args.max_seq_len // 3):
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"# {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}  "
              f"{os.cpu_count()} CPUs  tokenizer={args.tokenizer}  records={args.records}  "
              f"max_seq_len={args.max_seq_len}")
        results = {}
        for pack in (False, True):
            t0 = time.perf_counter()
            built = build_dataset(path, tok, args.max_seq_len, pack=pack)
            dt = time.perf_counter() - t0
            st = built.stats["train"]
            results[pack] = st
            print(f"pack={str(pack):5}  build {dt:6.2f} s  {args.records / dt:8.0f} records/s  "
                  f"{st['real_tokens'] / dt:9.0f} tokens/s  samples {st['samples']}  rows {st['rows']}  "
                  f"truncated {st['truncated']}  efficiency {st['efficiency']:.4f}")
        t0 = time.perf_counter()
        cache = os.path.join(tmp, "cache")
        build_dataset(path, tok, args.max_seq_len, pack=True, cache_dir=cache)
        t1 = time.perf_counter()
        build_dataset(path, tok, args.max_seq_len, pack=True, cache_dir=cache)
        t2 = time.perf_counter()
        print(f"cache: first build {t1 - t0:.2f} s, reuse {t2 - t1:.2f} s")
        print(f"packing efficiency {results[True]['efficiency']:.4f} vs {results[False]['efficiency']:.4f} "
              f"unpacked: {results[True]['efficiency'] / results[False]['efficiency']:.2f}x fewer computed tokens "
              f"per real token")


if __name__ == "__main__":
    main()
