"""Checks before a (multi-node) run starts, where users otherwise lose days to hangs and silent
mismatches. Collective: every rank calls `preflight`; one process per node does the file work.

- every node sees the same training config and data files (content hashes; the node that differs
  is named), and model_path's config.json;
- save_path is writable on every node;
- on a multi-node job, whether save_path is shared or node-local (each node writes a marker and
  looks for the others'); node-local is allowed but warned about, since each node then holds only
  the layer files of its own stages.
The world size against model_topo.dims is checked earlier, by the config validation on every rank.
"""
import os
import socket
import uuid
from pathlib import Path

import torch

from data.hashing import file_sha256
from trainer.config import TrainConfig
from trainer.engine.distributed import broadcast_object


class PreflightError(RuntimeError):
    pass


def _data_files(cfg: TrainConfig) -> list[str]:
    from data.records import expand_paths

    files = expand_paths(cfg.data_path)[0]
    if cfg.eval_data_path:
        files += expand_paths(cfg.eval_data_path)[0]
    return files


def _model_config_file(cfg: TrainConfig) -> str:
    """model_path's config.json: in model_path itself, or for a training run's global_stepN, in the
    save_path above it."""
    from models.pipe_dir import CheckpointError
    from trainer.engine.plan import model_side_dir

    try:
        return str(model_side_dir(Path(cfg.model_path), cfg.from_scratch) / "config.json")
    except CheckpointError:  # no layer files: reported by the model plan, which names what to give
        return os.path.join(cfg.model_path, "config.json")


def node_name() -> str:
    """This node's name: $PIPETUNE_NODE_NAME when set (containers that all share one hostname;
    the tests' simulated nodes), else the hostname."""
    return os.environ.get("PIPETUNE_NODE_NAME") or socket.gethostname()


def _node_report(cfg: TrainConfig, nonce: str) -> dict:
    """What this node sees (local rank 0 only)."""
    report = {"host": node_name(), "files": {}, "missing": [], "save_error": None, "marker": None}
    for path in [cfg.config_path] + _data_files(cfg) + [_model_config_file(cfg)]:
        if os.path.isfile(path):
            report["files"][path] = file_sha256(path)
        else:
            report["missing"].append(path)
    try:
        Path(cfg.save_path).mkdir(parents=True, exist_ok=True)
        marker = Path(cfg.save_path) / f".preflight-{nonce}-{report['host']}-{os.getpid()}"
        marker.write_text(report["host"])
        report["marker"] = marker.name
    except OSError as e:
        report["save_error"] = f"{type(e).__name__}: {e}"
    return report


def preflight(cfg: TrainConfig, rank: int, world_size: int) -> list[str]:
    """Returns each rank's hostname (index = global rank); raises PreflightError on every rank
    with rank 0's message when a check fails; logs warnings on rank 0."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    nonce = broadcast_object(uuid.uuid4().hex[:8] if rank == 0 else None)
    report = _node_report(cfg, nonce) if local_rank == 0 else {"host": node_name()}
    reports = [None] * world_size
    torch.distributed.all_gather_object(reports, report)
    # Each node now looks for the other nodes' markers: seen -> save_path is shared.
    seen = None
    if local_rank == 0 and report.get("marker"):
        present = set(os.listdir(cfg.save_path))
        seen = [r["host"] for r in reports if r.get("marker") and r["marker"] in present]
    seen_all = [None] * world_size
    torch.distributed.all_gather_object(seen_all, seen)
    torch.distributed.barrier()
    if local_rank == 0 and report.get("marker"):
        (Path(cfg.save_path) / report["marker"]).unlink(missing_ok=True)

    hosts = [r["host"] for r in reports]
    message, warnings = None, []
    if rank == 0:
        message, warnings = judge(reports, seen_all, cfg)
        for w in warnings:
            import logging

            logging.getLogger("pipetune").warning(w)
    message = broadcast_object(message)
    if message:
        raise PreflightError(message)
    return hosts


def judge(reports: list[dict], seen_all: list, cfg: TrainConfig) -> tuple:
    """(error message or None, warnings) from every rank's report (pure; unit-testable)."""
    nodes = [(rank, r) for rank, r in enumerate(reports) if "files" in r]
    problems, warnings = [], []
    reference_rank, reference = nodes[0]
    for rank, r in nodes:
        for path in r["missing"]:
            problems.append(f"node {r['host']} (rank {rank}) cannot see {path}: every node needs the same paths "
                            "(a shared filesystem or identical copies)")
        for path, digest in r["files"].items():
            expected = reference["files"].get(path)
            if expected is not None and digest != expected:
                problems.append(f"node {r['host']} (rank {rank}) has a different {path} than node "
                                f"{reference['host']} (rank {reference_rank}) (sha256 {digest[:12]} vs {expected[:12]}): copy the same file to every node")
        if r["save_error"]:
            problems.append(f"node {r['host']} (rank {rank}) cannot write save_path {cfg.save_path}: {r['save_error']}")
    hosts = sorted({r["host"] for _, r in nodes})
    if len(hosts) > 1 and not problems:
        local_only = [reports[rank]["host"] for rank, _ in nodes if seen_all[rank] is not None and len(set(seen_all[rank])) < len(hosts)]
        if local_only:
            warnings.append(
                f"save_path {cfg.save_path} is node-local on {', '.join(sorted(set(local_only)))} (the nodes do not see each "
                "other's files): each node will hold only the layer files of its own pipeline stages. Before "
                "`convert_model.py pp_to_hg`, copy every node's global_stepN/layer_* files into one folder (pp_to_hg names "
                "any that are missing and the node that wrote them), and resume needs each node's files back in place."
            )
    return ("preflight failed:\n" + "\n".join(f"  - {p}" for p in problems)) if problems else None, warnings
