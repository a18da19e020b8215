"""Checkpoint conversion benchmark: peak memory and throughput of hg_to_pp and pp_to_hg.

    python bench/convert.py [--size-gb 1.0] [--work-dir DIR] [--keep] [--repeat 3]

Builds a synthetic fp32 LLaMA (hidden 2048, intermediate 5632, vocab 32000, 16 heads / 4 KV heads,
untied head; as many blocks as needed for --size-gb) written shard by shard, so the model is never
whole in memory, then converts it HF -> pipe layers -> HF with `python convert_model.py ...`, each
direction in a fresh child process, and reports:

  * memory ratio = (peak RSS - RSS after imports and a warm-up) / largest pipe layer's tensor bytes
    (goal: <= 1.5 in both directions). RSS counts file-backed mmap pages too; the child also
    samples RssAnon / RssFile so the breakdown at the peak is shown.
  * speed ratio = conversion MB/s / `cp -r` MB/s of the HF folder (same bytes, same run).
    Caches are warm: the files were just written and nothing is dropped from the page cache,
    and no direction fsyncs its output.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB = 1e6  # bytes; all MB, MB/s and GB figures are decimal
GB = 1e9

# Model shape (LLaMA-1B-like). fp32: one block is ~180 MB, embedding and lm_head ~262 MB each.
HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 16, 4
SHARD_BYTES = 400 * 1000 * 1000  # HF shards of the synthetic checkpoint; shards cut across pipe layers

# Run in the child process by `python -c`; argv[1] = JSON stats path, argv[2:] = convert_model.py args.
# Imports everything a conversion imports, records the baseline RSS, resets the peak (VmHWM) where
# the kernel allows it, runs the conversion while a thread samples RssAnon/RssFile every 5 ms, and
# writes {baseline, peak, seconds, ...} (bytes, seconds).
CHILD = r'''
import json, os, sys, threading, time
sys.path.insert(0, os.getcwd())
import torch, transformers, safetensors, safetensors.torch  # noqa: F401
import convert_model, convert.hg_to_pp, convert.pp_to_hg  # noqa: F401
# Warm-up: a conversion's first AutoConfig / meta-device build pulls in ~85 MB of lazily imported
# modules (transformers' LLaMA model, sympy, tokenizers, ...), the same for any model size; do it here
# on the tiny config so that it is part of the baseline.
from transformers import AutoConfig, AutoTokenizer  # noqa: F401
import data.templates  # noqa: F401  (pp_to_hg's chat-template step imports it)
convert.hg_to_pp.expected_layer_shapes(AutoConfig.from_pretrained("configs/tiny-llama"))

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024  # kB -> bytes
    return out

baseline = status()
try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    hwm_reset = status()["VmHWM"] <= baseline["VmRSS"] + (1 << 20)
except OSError:
    hwm_reset = False

sampled = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
at_peak = dict(sampled)
stop = threading.Event()

def sample():
    while not stop.is_set():
        s = status()
        for k in sampled:
            sampled[k] = max(sampled[k], s[k])
        if s["VmRSS"] >= at_peak["VmRSS"]:
            at_peak.update({k: s[k] for k in at_peak})
        time.sleep(0.005)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
t0 = time.perf_counter()
rc = convert_model.main(sys.argv[2:])
seconds = time.perf_counter() - t0
stop.set()
thread.join()
end = status()
json.dump({"rc": rc, "seconds": seconds, "baseline_rss": baseline["VmRSS"], "baseline": baseline,
           "peak_rss": end["VmHWM"], "hwm_reset": hwm_reset, "sampled_max": sampled,
           "sampled_at_peak": at_peak}, open(sys.argv[1], "w"))
'''


def llama_config(num_layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, vocab_size=VOCAB, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, num_hidden_layers=num_layers, tie_word_embeddings=False, dtype="float32",
    )


def hf_tensor_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) in checkpoint order, from the transformers model built on the meta device."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def layers_for_size(size_gb: float) -> int:
    """Fewest blocks so that the fp32 checkpoint is at least size_gb GB."""
    shapes = hf_tensor_shapes(llama_config(1))
    params = {k: math.prod(s) for k, s in shapes}
    block = sum(n for k, n in params.items() if k.startswith("model.layers.0."))
    rest = sum(params.values()) - block
    return max(1, math.ceil((size_gb * GB / 4 - rest) / block))  # 4 bytes per fp32 parameter


def write_synthetic_llama(folder: Path, num_layers: int, seed: int = 0) -> int:
    """Sharded fp32 safetensors + index + config.json; holds at most one shard (<= SHARD_BYTES, or one
    tensor if larger) in memory. Returns the total tensor bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = llama_config(num_layers)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    shapes = hf_tensor_shapes(config)
    gen = torch.Generator().manual_seed(seed)

    groups, current, size = [], [], 0  # consecutive tensors, <= SHARD_BYTES per shard
    for name, shape in shapes:
        nbytes = math.prod(shape) * 4
        if current and size + nbytes > SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    groups.append(current)

    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        shard_name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if name.endswith("norm.weight"):
                tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            else:
                tensors[name] = 0.02 * torch.randn(shape, generator=gen)
            weight_map[name] = shard_name
            total += tensors[name].nbytes
        save_file(tensors, str(folder / shard_name), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def folder_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def largest_layer_bytes(pp_dir: Path) -> tuple[str, int]:
    """(file name, tensor bytes) of the largest layer file written by hg_to_pp (memory-mapped read)."""
    import torch

    best = ("", 0)
    for path in sorted(pp_dir.glob("layer_*-model_states.pt")):
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        nbytes = sum(t.nbytes for t in state.values())
        del state
        best = max(best, (path.name, nbytes), key=lambda x: x[1])
    return best


def run_child(args: list[str], stats_path: Path) -> dict:
    """Run convert_model.py ARGS in a fresh interpreter under CHILD; return its stats (+ wall_s)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(stats_path), *args, "--quiet"], cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"convert_model.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    stats = json.loads(stats_path.read_text())
    stats["wall_s"] = wall  # includes interpreter start and imports
    return stats


def time_cp(src: Path, dest: Path) -> float:
    """Seconds for `cp -r src dest` (warm page cache, no sync)."""
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dest)], check=True)
    return time.perf_counter() - t0


def check_round_trip(a: Path, b: Path) -> int:
    """Compare every tensor of two HF folders one at a time; returns the number compared."""
    import torch
    from safetensors import safe_open

    def where(folder):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            return {k: folder / "model.safetensors" for k in f.keys()}

    wa, wb = where(a), where(b)
    if set(wa) != set(wb):
        sys.exit(f"round trip changed the tensor names: {sorted(set(wa) ^ set(wb))[:5]}")
    for name in wa:
        with safe_open(str(wa[name]), framework="pt") as fa, safe_open(str(wb[name]), framework="pt") as fb:
            if not torch.equal(fa.get_tensor(name), fb.get_tensor(name)):
                sys.exit(f"round trip changed {name}")
    return len(wa)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0,
                        help="smallest size of the synthetic fp32 checkpoint, in GB (1e9 bytes; default 1.0)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="folder for the checkpoints, about 4x --size-gb of disk (default: a new folder under the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (default: delete what was written at the end)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed rounds (cp, hg_to_pp, pp_to_hg interleaved); medians of times, max of peaks (default 3)")
    parser.add_argument("--max-shard-size", default="5GB", help="pp_to_hg --max-shard-size (default 5GB)")
    args = parser.parse_args(argv)

    own_work = args.work_dir is None  # a --work-dir is kept; only what this script writes in it is removed
    work = Path(tempfile.mkdtemp(prefix="pipetune-bench-convert-")) if own_work else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    hf, pp, back, copy = work / "hf", work / "pp", work / "hf_back", work / "hf_cp"
    ours = [hf, pp, back, copy, work / "hg_to_pp.json", work / "pp_to_hg.json"]
    for d in (hf, pp, back, copy):
        if d.exists():
            shutil.rmtree(d)
    try:
        num_layers = layers_for_size(args.size_gb)
        t0 = time.perf_counter()
        tensor_bytes = write_synthetic_llama(hf, num_layers)
        hf_bytes = folder_bytes(hf, "*.safetensors")  # bytes; tensors + safetensors headers
        print(f"synthetic LLaMA: {num_layers} blocks, {tensor_bytes / GB:.3f} GB of fp32 tensors in "
              f"{len(list(hf.glob('*.safetensors')))} shards ({time.perf_counter() - t0:.1f} s to build)", flush=True)

        # Interleaved repeats (cp, hg_to_pp, pp_to_hg); medians of the times, max of the peaks.
        runs = {"cp": [], "hg_to_pp": [], "pp_to_hg": []}
        for _ in range(args.repeat):
            for d in (copy, pp, back):
                shutil.rmtree(d, ignore_errors=True)
            os.sync()  # flush earlier writes so they are not written back during a timed step
            runs["cp"].append(time_cp(hf, copy))  # seconds
            os.sync()
            runs["hg_to_pp"].append(run_child(["hg_to_pp", "--input-path", str(hf), "--save-path", str(pp)], work / "hg_to_pp.json"))
            os.sync()
            runs["pp_to_hg"].append(run_child(["pp_to_hg", "--input-path", str(pp), "--save-path", str(back),
                                               "--max-shard-size", args.max_shard_size], work / "pp_to_hg.json"))
        pp_bytes = folder_bytes(pp, "layer_*-model_states.pt")
        layer_name, layer_bytes = largest_layer_bytes(pp)
        back_bytes = folder_bytes(back, "*.safetensors")
        compared = check_round_trip(hf, back)
    finally:
        if not args.keep:
            for path in ([work] if own_work else ours):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                elif path.exists():
                    path.unlink()

    cp_s = statistics.median(runs["cp"])  # seconds
    cp_mbs = hf_bytes / MB / cp_s
    rows = []
    for name, nbytes in (("hg_to_pp", hf_bytes), ("pp_to_hg", pp_bytes)):
        above = [r["peak_rss"] - r["baseline_rss"] for r in runs[name]]  # bytes, per repeat
        worst = runs[name][above.index(max(above))]
        at, base = worst["sampled_at_peak"], worst["baseline"]
        seconds = statistics.median(r["seconds"] for r in runs[name])
        mbs = nbytes / MB / seconds
        rows.append((name, max(above) / layer_bytes, mbs / cp_mbs, max(above) / MB, mbs, seconds,
                     statistics.median(r["wall_s"] for r in runs[name]),
                     (at["RssAnon"] - base["RssAnon"]) / MB, (at["RssFile"] - base["RssFile"]) / MB,
                     all(r["hwm_reset"] for r in runs[name])))

    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; warm page cache")
    print(f"HF checkpoint: {hf_bytes / MB:.0f} MB ({num_layers} blocks); pipe layer files: {pp_bytes / MB:.0f} MB; "
          f"round-trip HF: {back_bytes / MB:.0f} MB, {compared} tensors bit-identical")
    print(f"largest pipe layer: {layer_name}, {layer_bytes / MB:.1f} MB of tensors")
    print(f"cp -r of the HF folder: {cp_s:.2f} s, {cp_mbs:.0f} MB/s; times are medians of {args.repeat} interleaved rounds, "
          f"peaks the max")
    for name in runs:  # seconds per round, to show the spread
        print(f"  {name} rounds: " + " ".join(f"{(t if name == 'cp' else t['seconds']):.2f}" for t in runs[name]) + " s")
    print()
    print("| direction | peak RSS above baseline / largest layer (goal <= 1.5) | MB/s / cp MB/s "
          "| peak above baseline MB | MB/s | convert s | child wall s | anon / file MB above baseline at sampled peak |")
    print("|---|---|---|---|---|---|---|---|")
    for name, mem, speed, above, mbs, sec, wall, anon, file_, reset in rows:
        note = "" if reset else " (VmHWM not reset: peak may include imports)"
        print(f"| {name} | {mem:.2f}{note} | {speed:.2f} | {above:.0f} | {mbs:.0f} | {sec:.2f} | {wall:.2f} | {anon:.0f} / {file_:.0f} |")
    ok = all(r[1] <= 1.5 for r in rows)
    print()
    print("memory goal (<= 1.5 x largest layer, both directions): " + ("met" if ok else "MISSED"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
