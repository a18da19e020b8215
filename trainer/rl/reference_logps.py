"""The DPO reference's log-probs: computed once, before training, in one pipelined forward-only pass
over the train and eval pairs, and cached, so no reference model is in memory during training.

    <cache_dir>/ref_logps-<key>.pt     {"key": parts, "train": float64[n_train, 2], "eval": float64[n_eval, 2] | None}
                                       columns: (chosen, rejected) summed answer-token log-probs

The key hashes what the values depend on: the reference checkpoint (each layer file's name, size,
modification time and the SHA-256 of its first and last MiB: identity, not a full content hash,
which would read a 7B model's 13 GB on every start), its model config, the attention implementation,
the precision, the code that computes them (models/, the log-prob sums), the torch and transformers
versions, the device type, and the data (the dataset cache key: files' content, tokenizer, template, max_seq_len,
eval split, ...). A miss is never wrong, only slow: the values are then recomputed from `ref_path`.

Where the pass runs:
  - a cache hit (e.g. every resumed run): nothing runs;
  - `ref_path` is the policy's starting checkpoint (the default) and the run starts fresh: on the
    policy engine itself, before the first step (`compute`);
  - otherwise (another reference, or a resumed run whose cache is gone): on a frozen reference
    engine (`frozen_engine`: no optimizer, freed before the policy engine is built), so a
    resumed run never scores the reference with its partially trained policy.

Every rank ends up with the values (the last stage of each data-parallel replica scores its share of
the rows, `batches.eval_row_indices`; one all-reduce); the first process of each node writes the file
(node-local cache folders work), atomically.
"""
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from data.batching import collate_pairs
from models.pipe_dir import find_layer_files, resolve_checkpoint_dir
from trainer.batches import forward_eval_rows
from trainer.engine.distributed import all_reduce_sum, broadcast_object
from trainer.files import load_tensors, save_torch_atomic
from trainer.rl.dpo import sequence_logps

logger = logging.getLogger("pipetune")
CACHE_VERSION = 1
_EDGE = 1 << 20  # bytes hashed at each end of a layer file


def checkpoint_fingerprint(model_path) -> list:
    """[(layer file name, size, mtime_ns, sha256 of its first and last MiB)] of a pipeline checkpoint
    (a hg_to_pp folder, a training save_path (its `latest`) or a global_stepN)."""
    layer_dir, _ = resolve_checkpoint_dir(Path(model_path))
    out = []
    for _, path in sorted(find_layer_files(layer_dir).items()):
        st = path.stat()
        h = hashlib.sha256()
        with open(path, "rb") as f:
            h.update(f.read(_EDGE))
            if st.st_size > 2 * _EDGE:
                f.seek(-_EDGE, os.SEEK_END)
                h.update(f.read(_EDGE))
        out.append((path.name, st.st_size, st.st_mtime_ns, h.hexdigest()))
    return out


def log_prob_code_version(root: Optional[Path] = None) -> str:
    """Hash of the code the log-probs come from: models/*.py (the layers and heads), trainer/losses.py and
    trainer/rl/dpo.py (the sums). root: the project folder (default: this checkout)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    files = sorted((root / "models").glob("*.py")) + [root / "trainer" / "losses.py", root / "trainer" / "rl" / "dpo.py"]
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def runtime_identity() -> dict:
    """What else the values depend on: that code, the torch and transformers versions and the device
    type (a CPU-computed cache is not reused by a GPU run: kernels differ)."""
    import transformers

    from trainer.engine.distributed import collective_device

    return {"code": log_prob_code_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": collective_device().type}


def reference_identity(cfg, plan) -> dict:
    """What of the reference model its log-probs depend on (the cache key's model part)."""
    return {"layers": checkpoint_fingerprint(plan.model_path), "config": plan.hf_config.to_json_string(use_diff=False),
            "flash_attn": cfg.use_flash_attn, "precision": cfg.precision}


class ReferenceLogps:
    """The reference's (chosen, rejected) log-prob sums per pair, on every rank; `missing` until
    loaded or computed."""

    def __init__(self, key_parts: Optional[dict], path: Optional[str], train=None, eval=None, policy_is_reference=False):
        self.key_parts, self.path = key_parts, path
        self.train, self.eval = train, eval
        self.policy_is_reference = policy_is_reference  # ref_path holds the policy's starting weights

    @property
    def missing(self) -> bool:
        return self.train is None

    @classmethod
    def unused(cls, n_train: int, n_eval: int) -> "ReferenceLogps":
        """Zeros, for reference-free losses (SimPO): no pass, no cache."""
        return cls(None, None, torch.zeros(n_train, 2, dtype=torch.float64),
                   torch.zeros(n_eval, 2, dtype=torch.float64) if n_eval else None)

    @classmethod
    def lookup(cls, cfg, topo, data, policy_plan, ref_plan, n_train: int) -> "ReferenceLogps":
        """Collective: rank 0 computes the key and reads the cache when present; broadcast to every rank."""
        answer = None
        if topo.rank == 0:
            identity = reference_identity(cfg, ref_plan)
            key_parts = {"version": CACHE_VERSION, "reference": identity, "runtime": runtime_identity(),
                         "data": data.data.stats["cache"]["key"]}
            key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:32]
            path = os.path.join(cfg.data_cache_dir(), f"ref_logps-{key}.pt")
            same = ref_plan.model_path == policy_plan.model_path or identity == reference_identity(cfg, policy_plan)
            train = evals = None
            if os.path.isfile(path):
                saved = load_tensors(path)
                if saved.get("key") == json.dumps(key_parts, sort_keys=True) and len(saved["train"]) == n_train:
                    train, evals = saved["train"], saved["eval"]
            answer = (key_parts, path, train, evals, same)
        key_parts, path, train, evals, same = broadcast_object(answer)
        if train is not None and topo.rank == 0:
            logger.info("reference log-probs: reused %s", path)
        ref = cls(key_parts, path, train, evals, same)
        if train is not None:
            ref.write_once_per_node()  # a node-local cache folder of another node may lack it
        return ref

    def compute(self, engine, cfg, topo, data, n_train: int, n_eval: int, source: str) -> None:
        """Collective: score the train and eval pairs on `engine` (its current weights), then cache."""
        self.train = score_pairs(engine, data.data.train if data.data is not None else None, n_train, cfg, topo)
        self.eval = score_pairs(engine, data.eval, n_eval, cfg, topo) if n_eval else None
        if topo.rank == 0:
            logger.info("reference log-probs of %d train + %d eval pairs computed on %s; cached in %s",
                        n_train, n_eval, source, self.path)
        self.write_once_per_node()

    def write_once_per_node(self) -> None:
        if int(os.environ.get("LOCAL_RANK", 0)) != 0 or os.path.isfile(self.path):
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        save_torch_atomic({"key": json.dumps(self.key_parts, sort_keys=True), "train": self.train, "eval": self.eval}, self.path)


def score_pairs(engine, pairs, n_rows: int, cfg, topo) -> torch.Tensor:
    """Collective: float64[n_rows, 2] summed answer log-probs (chosen, rejected) of every pair, on
    every rank. `pairs`: the PairwiseDataset on data ranks, None elsewhere."""
    def micro_batch_of(indices):
        inputs, labels, _ = collate_pairs([pairs[max(i, 0)] for i in indices])
        return inputs, (labels, torch.tensor(indices))

    sums = torch.zeros(n_rows, 2, dtype=torch.float64)
    seen = torch.zeros(n_rows, dtype=torch.float64)
    for results in forward_eval_rows(engine, cfg, topo, n_rows, micro_batch_of if pairs is not None else None, _row_logps,
                                     deferred_logits=cfg.chunked_loss):
        for logps, indices in results or []:
            real = indices >= 0
            sums[indices[real]] = logps.view(2, -1).t()[real]
            seen[indices[real]] += 1
    sums, seen = all_reduce_sum(sums), all_reduce_sum(seen)
    assert bool((seen == 1).all()), "every pair is scored by exactly one replica"
    return sums


def _row_logps(logits, labels):
    answer_labels, indices = labels  # DeepSpeed moved both to the device
    return sequence_logps(logits, answer_labels)[0].double().cpu(), indices.cpu()


# ---------------------------------------------------------------------------------------------
# Feeding them to the last stage, each pair with its own values.

class WithReference(Dataset):
    """A PairwiseDataset whose items also carry the pair's reference log-probs float64[2] (chosen, rejected);
    collated by `data.batching.collate_dpo`."""

    def __init__(self, pairs, ref_logps: torch.Tensor):
        assert len(pairs) == len(ref_logps), (len(pairs), len(ref_logps))
        self.pairs, self.ref_logps = pairs, ref_logps

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        inputs, labels, margin = self.pairs[i]
        return inputs, labels, margin, self.ref_logps[i]
