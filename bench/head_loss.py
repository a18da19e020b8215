"""Peak memory of the LM head stage's loss: full logits (today's `global_token_mean_loss` on the
head's [B,T,V] output) vs the chunked head + cross-entropy (`trainer.losses.chunked_lm_head_loss_sum`).

    python bench/head_loss.py [--vocab 250880] [--hidden 1024] [--seq-len 2048] [--micro-batch 1] [--chunk 1024]
                              [--loss ce|logps]

--loss logps measures PPO's actor loss shape instead (`trainer.losses.shifted_token_logps`: per-token
log-probs and entropies, weighted by random advantages), full logits vs DeferredLogits.

Each path runs in its own child process (ru_maxrss only grows): the head weight [V,H] and the final
norm's output [B,T,H] (fp32, requiring grad) are allocated first, the resident memory is read (the
baseline), then one forward + backward of the loss; printed: the peak above the baseline, the ratio
chunked / full (goal <= 0.25 at BLOOM's vocabulary), and the two losses (they agree).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> dict:
    import torch

    from models.heads import DeferredLogits
    from trainer.losses import chunked_lm_head_loss_sum, global_token_mean_loss, shifted_token_logps

    torch.manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden) * 0.02).requires_grad_()
    hidden = torch.randn(args.micro_batch, args.seq_len, args.hidden).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len))
    n_targets = args.micro_batch * (args.seq_len - 1)
    scale = torch.tensor(1.0 / n_targets, dtype=torch.float64)
    advantages = torch.randn(args.micro_batch, args.seq_len - 1) / n_targets
    before = rss()
    if args.loss == "logps":
        head = torch.nn.functional.linear(hidden, weight) if args.path == "full" else DeferredLogits(hidden, weight)
        logp, entropy = shifted_token_logps(head, labels[:, 1:], with_entropy=True, chunk_tokens=args.chunk)
        loss = (logp * advantages).sum() + 0.01 * entropy.mean()
    elif args.path == "full":
        loss = global_token_mean_loss(torch.nn.functional.linear(hidden, weight), (labels, scale))
    else:
        total, _ = chunked_lm_head_loss_sum(hidden, weight, labels, chunk_tokens=args.chunk)
        loss = total * scale.float()
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_above_baseline": peak - before, "loss": float(loss.detach()),
            "grad_weight_norm": float(weight.grad.norm()), "grad_hidden_norm": float(hidden.grad.norm())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=250880)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--chunk", type=int, help="tokens per chunk (default: trainer.losses.CHUNK_BYTES of fp32 logits)")
    p.add_argument("--loss", choices=["ce", "logps"], default="ce", help="SFT's cross-entropy or PPO's log-probs + entropy")
    p.add_argument("--path", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [str(REPO)] + [q for q in sys.path if Path(q or ".").resolve() != Path(here)]
    if args.path:
        print(json.dumps(child(args)))
        return 0
    # A fixed mmap threshold: freed tensors return to the OS, so the peak follows live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    results = {}
    for path in ("full", "chunked"):
        proc = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--path", path], capture_output=True,
                              text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results[path] = json.loads(proc.stdout.strip().splitlines()[-1])
    gib = 2**30
    full, chunked = results["full"], results["chunked"]
    chunk = args.chunk or max(1, 2**27 // (4 * args.vocab))
    print(f"{args.loss}: vocab {args.vocab}, hidden {args.hidden}, seq {args.seq_len}, micro-batch {args.micro_batch}, fp32; "
          f"chunk {chunk} tokens")
    print(f"full logits: peak {full['peak_above_baseline'] / gib:.2f} GiB above the baseline, loss {full['loss']:.6f}")
    print(f"chunked:     peak {chunked['peak_above_baseline'] / gib:.2f} GiB above the baseline, loss {chunked['loss']:.6f}")
    print(f"ratio chunked / full: {chunked['peak_above_baseline'] / full['peak_above_baseline']:.3f} (goal <= 0.25); "
          f"gradient norms weight {full['grad_weight_norm']:.6f} vs {chunked['grad_weight_norm']:.6f}, "
          f"hidden {full['grad_hidden_norm']:.6f} vs {chunked['grad_hidden_norm']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
