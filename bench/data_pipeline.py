"""Data pipeline benchmark: tokenization records/s and packing efficiency on a mixed-length set; peak
memory of building from a large JSONL file.

    python bench/data_pipeline.py [--records 20000] [--max-seq-len 1024] [--tokenizer configs/tiny-llama]
    python bench/data_pipeline.py --rss-gb 1 [--max-seq-len 1024] [--tokenizer configs/tiny-llama] [--keep]

Generates a deterministic synthetic record set (every type; lengths log-uniform from a few tokens to
about max_seq_len), then times build_dataset end to end (validate + render + batched fast tokenization
with offsets + masks + fitting) without cache, and reports padding efficiency = real tokens / computed
tokens (rows * max_seq_len) with and without packing. Goal with packing: >= 0.95.

--rss-gb G writes a JSONL file of G GB of such records to /tmp (streamed, so the generator itself stays
small), then builds the SFT dataset from it in a child process with a cache_dir (as training does) and
reports the child's peak RSS (ru_maxrss), next to a child that builds from a one-record file (imports +
tokenizer) and to the size of the built token arrays (5 bytes per token: int32 id + bool target).
``--old-tree DIR`` runs the same child with DIR first on sys.path (e.g. an older ``git archive`` of
data/) for a before/after figure.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # "data" is the package, not this file
if ROOT not in sys.path:
    sys.path.append(ROOT)  # after PYTHONPATH, so that --old-tree takes precedence

WORDS = ("the model stage pipeline token answer question data train loss layer 模型 数据 训练 流水线 "
         "parallel device batch micro gradient 长城 熊猫 reference").split()


def iter_synthetic_records(max_words: int, seed: int = 0):
    """An endless deterministic stream of records of every type."""
    rng = random.Random(seed)

    def text(lo=2):
        k = int(round(2 ** rng.uniform(1, max(2.0, (max_words // 2).bit_length()))))  # log-uniform length
        return " ".join(rng.choice(WORDS) for _ in range(max(lo, k)))

    for i in itertools.count():
        t = i % 5
        if t == 0:
            yield {"type": "pretrain", "text": text()}
        elif t == 1:
            yield {"type": "instruct", "instruct": text(), "input": text(), "output": text()}
        elif t == 2:
            yield {"type": "conversation", "rounds": [[r, text()] for r in ("ask", "ans", "ask", "ans")]}
        elif t == 3:
            yield {"type": "ref_qa", "reference": text(), "rounds": [["ask", text()], ["ans", text()]]}
        else:
            yield {"type": "pairwise", "prompt": text(), "chosen": text(), "rejected": text()}


def synthetic_records(n: int, max_words: int, seed: int = 0):
    return list(itertools.islice(iter_synthetic_records(max_words, seed), n))


def write_jsonl_of_size(path: str, target_bytes: int, max_words: int) -> int:
    """Stream records into ``path`` until it holds ``target_bytes``; returns the record count."""
    size, n = 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        for rec in iter_synthetic_records(max_words):
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            fh.write(line)
            size += len(line.encode("utf-8"))
            n += 1
            if size >= target_bytes:
                return n
    return n


def build_child(path: str, tokenizer: str, max_seq_len: int, cache_dir: str) -> None:
    """(In a child process) build the SFT dataset from ``path``; print one JSON line of figures."""
    import resource

    import torch
    from transformers import AutoTokenizer

    from data.dataset import build_dataset
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    t0 = time.perf_counter()
    built = build_dataset(path, tok, max_seq_len, cache_dir=cache_dir)
    seconds = time.perf_counter() - t0
    st = built.stats["train"]
    print(json.dumps({"seconds": round(seconds, 1), "records": built.stats["records"], "samples": st["samples"],
                      "real_tokens": st["real_tokens"], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_child(path: str, args, cache_dir: str, tree: str = None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (tree, ROOT) if p))
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", path, "--tokenizer", args.tokenizer,
           "--max-seq-len", str(args.max_seq_len), "--_cache", cache_dir]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_bench(args) -> None:
    path = os.path.join(tempfile.gettempdir(), f"pipetune-bench-{args.rss_gb:g}gb.jsonl")
    t0 = time.perf_counter()
    n = write_jsonl_of_size(path, int(args.rss_gb * 1e9), args.max_seq_len // 3)
    size = os.path.getsize(path)
    print(f"# {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}  {os.cpu_count()} CPUs  "
          f"tokenizer={args.tokenizer}  max_seq_len={args.max_seq_len}")
    print(f"file: {path}  {size / 1e9:.2f} GB  {n} records  (written in {time.perf_counter() - t0:.0f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        one = os.path.join(tmp, "one.jsonl")
        write_jsonl_of_size(one, 1, args.max_seq_len // 3)
        base = run_child(one, args, os.path.join(tmp, "c0"))
        print(f"baseline (imports + tokenizer, one record): peak RSS {base['peak_rss_mb']:.0f} MB")
        for label, tree in (("this tree", None), (f"old tree {args.old_tree}", args.old_tree)):
            if label.startswith("old") and not tree:
                continue
            r = run_child(path, args, os.path.join(tmp, "c1" if tree is None else "c2"), tree)
            arrays = r["real_tokens"] * 5 / 1e6
            print(f"{label}: build {r['seconds']:.0f} s  {r['records'] / r['seconds']:.0f} records/s  samples "
                  f"{r['samples']}  tokens {r['real_tokens']}  token arrays {arrays:.0f} MB  peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB  (above baseline: {r['peak_rss_mb'] - base['peak_rss_mb']:.0f} MB = "
                  f"{(r['peak_rss_mb'] - base['peak_rss_mb']) / arrays:.2f} x the token arrays, "
                  f"{(r['peak_rss_mb'] - base['peak_rss_mb']) * 1e6 / size:.2f} x the file)")
    if not args.keep:
        os.unlink(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--tokenizer", default="configs/tiny-llama")
    ap.add_argument("--rss-gb", type=float, help="peak RSS of building from a JSONL file of this many GB")
    ap.add_argument("--old-tree", help="with --rss-gb: also measure the data/ package of this folder")
    ap.add_argument("--keep", action="store_true", help="keep the generated JSONL file")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        return build_child(args._child, args.tokenizer, args.max_seq_len, args._cache)
    if args.rss_gb:
        return rss_bench(args)

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
