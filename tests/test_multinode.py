"""Multi-node runs on one machine: DeepSpeed's launcher with a hostfile naming two "nodes".

1. --no_ssh: one launcher per node rank (what a cluster scheduler does), --master_addr 127.0.0.1.
2. The real pdsh + ssh path: sshd on 127.0.0.1 only (key-only auth, temporary config), pdsh,
   `deepspeed --hostfile ...`. Skipped, with the reason, where pdsh/openssh-server are missing and
   cannot be installed (root + apt-get). Never signal a pdsh-mode runner: on SIGINT/SIGTERM it runs
   `pkill -f` over every launcher of this venv; a hung run is SIGKILLed (no handler runs).
Plus the preflight's judgement (pure function) and pp_to_hg's message for files left on another node.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

from convert.errors import ConversionError
from convert.hg_to_pp import hg_to_pp
from convert.pp_to_hg import pp_to_hg
from trainer.engine.preflight import judge
from trainer.recipes import validate_config as validate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_config(tmp: Path, pp: Path, name: str) -> Path:
    cfg = {
        "model_path": str(pp), "save_path": str(tmp / name), "data_path": str(REPO / "data" / "samples" / "mixed.json"),
        "max_seq_len": 64, "train_steps": 4, "seed": 5, "resume": "never",
        "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [3, 4]},
        "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**6,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def pp_dir(tiny_hf, tmp_path_factory):
    return hg_to_pp(tiny_hf("llama", False), tmp_path_factory.mktemp("mn") / "pp", progress=False)


def runner_cmd(hostfile: Path, port: int, *extra) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--master_addr", "127.0.0.1",
            "--master_port", str(port), *extra]


@pytest.mark.multirank
def test_two_nodes_no_ssh_train_save_and_export(pp_dir, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # names only label the nodes with --no_ssh
    config = train_config(tmp_path, pp_dir, "run")
    port = free_port()
    procs = []
    for node_rank, name in enumerate(["node-a", "node-b"]):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PIPETUNE_NODE_NAME": name}
        cmd = runner_cmd(hostfile, port, "--no_ssh", "--node_rank", str(node_rank), "train_ds.py", "--config", str(config))
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "done: 4 steps" in outputs[0]  # rank 0 lives on node-a
    save = tmp_path / "run"
    assert (save / "latest").read_text() == "global_step4"
    topo = json.loads((save / "topology.json").read_text())
    assert topo["stage_hosts"] == {"0": ["node-a"], "1": ["node-b"]} and topo["layer_stage"] == [0, 0, 0, 1, 1, 1, 1]
    hf = pp_to_hg(save, tmp_path / "hf", progress=False)
    assert (hf / "model.safetensors").is_file()

    # Node-local save_paths: the layers of stage 1 never reached node-a's folder.
    gathered = tmp_path / "gathered"
    shutil.copytree(save, gathered)
    for i in (4, 5):
        (gathered / "global_step4" / f"layer_{i:02d}-model_states.pt").unlink()
    with pytest.raises(ConversionError, match=r"missing layer files for pipe layers 4 \(block.3\), 5 \(final_norm\).*"
                                              r"layers 4, 5 were written by stage 1 on node\(s\) node-b"):
        pp_to_hg(gathered, tmp_path / "hf2", progress=False)


def mount_namespaces_unavailable() -> str:
    """'' when this process may run commands in a private mount namespace (unshare -m, as root)."""
    if not shutil.which("unshare"):
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True)
    return "" if probe.returncode == 0 else f"cannot create a mount namespace here: {probe.stderr.strip()[:200]}"


def on_own_disk(disk: Path, mount_point: Path, cmd: list[str]) -> list[str]:
    """`cmd` in a private mount namespace where `mount_point` shows `disk`: a node-local save_path
    (the other launcher sees its own disk at the same path)."""
    disk.mkdir(parents=True, exist_ok=True)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"',
            "sh", str(disk), str(mount_point), *cmd]


def launch_two_nodes(tmp: Path, config: Path, disks: dict, env_extra=None, timeout=600) -> list:
    hostfile = tmp / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    save = Path(json.loads(config.read_text())["save_path"])
    save.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for node_rank, name in enumerate(["node-a", "node-b"]):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PIPETUNE_NODE_NAME": name, **(env_extra or {})}
        cmd = runner_cmd(hostfile, port, "--no_ssh", "--node_rank", str(node_rank), "train_ds.py", "--config", str(config))
        procs.append(subprocess.Popen(on_own_disk(disks[name], save, cmd), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


def step_tags(folder: Path) -> list[str]:
    return sorted((p.name for p in folder.glob("global_step*")), key=lambda n: int(n[len("global_step"):]))


@pytest.mark.multirank
def test_node_local_save_paths_resume_exactly_and_prune_on_every_node(pp_dir, tmp_path):
    """Issue 11.4: each node sees only its own save_path. Killed after the step-2 checkpoint (during
    the step-4 save), the rerun resumes on every node from rank 0's decision and ends with the weights
    of an uninterrupted run; keep_last prunes on both nodes."""
    reason = mount_namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    config = train_config(tmp_path, pp_dir, "local")
    cfg = json.loads(config.read_text())
    cfg.update(train_steps=6, save_interval=2, keep_last=1, resume="auto")
    config.write_text(json.dumps(cfg))
    reference = {n: tmp_path / f"reference-{n}" for n in ("node-a", "node-b")}
    disks = {n: tmp_path / f"disk-{n}" for n in ("node-a", "node-b")}

    results = launch_two_nodes(tmp_path, config, reference)
    assert [rc for rc, _ in results] == [0, 0], "\n".join(out[-3000:] for _, out in results)
    assert "is node-local on node-a, node-b" in results[0][1]
    killed = launch_two_nodes(tmp_path, config, disks, env_extra={"PIPETUNE_TEST_KILL_DURING_SAVE_AT_STEP": "4"})
    assert all(rc != 0 for rc, _ in killed)
    for disk in disks.values():  # latest written on every node; step 4 partial, unused
        assert (disk / "latest").read_text() == "global_step2" and (disk / "global_step2" / "trainer_state.json").is_file()
    resumed = launch_two_nodes(tmp_path, config, disks)
    assert [rc for rc, _ in resumed] == [0, 0], "\n".join(out[-3000:] for _, out in resumed)
    assert "resumed from" in resumed[0][1] and "at step 2" in resumed[0][1] and "done: 6 steps" in resumed[0][1]

    for node, layers in (("node-a", {0, 1, 2}), ("node-b", {3, 4, 5, 6})):
        assert step_tags(reference[node]) == ["global_step6"]
        assert step_tags(disks[node]) == ["global_step2", "global_step6"]  # 4 pruned on both nodes; 2 resumed from
        assert (disks[node] / "latest").read_text() == "global_step6"
        files = sorted((disks[node] / "global_step6").glob("layer_*-model_states.pt"))
        assert {int(f.name[6:8]) for f in files} == layers  # each node holds only its stage's layers
        for f in files:
            a = torch.load(reference[node] / "global_step6" / f.name, weights_only=True)
            b = torch.load(f, weights_only=True)
            worst = max((a[k] - b[k]).abs().max().item() for k in a)
            assert worst <= 1e-6, (node, f.name, worst)
    state = json.loads((disks["node-b"] / "global_step6" / "trainer_state.json").read_text())
    assert [s for s, _ in state["history"]] == [1, 2, 3, 4, 5, 6]


def test_preflight_names_the_node_that_differs_and_warns_about_node_local_save_path():
    cfg = validate({"model_path": "m", "save_path": "/ckpt", "data_path": "d.json", "train_steps": 1,
                    "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [3, 4]},
                    "train_micro_batch_size_per_gpu": 1}, "c.json", world_size=2)
    ok = {"host": "a", "files": {"c.json": "1" * 64, "d.json": "2" * 64}, "missing": [], "save_error": None, "marker": "m-a"}
    differs = {"host": "b", "files": {"c.json": "1" * 64, "d.json": "3" * 64}, "missing": [], "save_error": None, "marker": "m-b"}
    message, _ = judge([ok, differs], [["a", "b"], ["a", "b"]], cfg)
    assert message == ("preflight failed:\n  - node b (rank 1) has a different d.json than node a (rank 0) "
                       "(sha256 333333333333 vs 222222222222): copy the same file to every node")
    unwritable = {**ok, "host": "b", "save_error": "PermissionError: denied", "marker": None}
    missing = {**ok, "host": "b", "missing": ["d.json"]}
    assert "node b (rank 1) cannot write save_path /ckpt: PermissionError: denied" in judge([ok, unwritable], [["a"], None], cfg)[0]
    assert "node b (rank 1) cannot see d.json" in judge([ok, missing], [["a", "b"], ["a", "b"]], cfg)[0]
    # Same files, but each node sees only its own marker: a node-local save_path (allowed, warned).
    twin = {**ok, "host": "b", "marker": "m-b"}
    message, warnings = judge([ok, twin], [["a"], ["b"]], cfg)
    assert message is None and len(warnings) == 1 and "save_path /ckpt is node-local on a, b" in warnings[0]
    assert judge([ok, twin], [["a", "b"], ["a", "b"]], cfg) == (None, [])


# ---------------------------------------------------------------------------------------------
# The real pdsh + ssh path.

def ensure_ssh_tools() -> str:
    """'' when pdsh and sshd are usable, else the reason to skip."""
    if shutil.which("pdsh") and Path("/usr/sbin/sshd").exists() and shutil.which("ssh-keygen"):
        return ""
    if os.geteuid() != 0 or not shutil.which("apt-get") or os.environ.get("PIPETUNE_TEST_NO_APT"):
        return "pdsh/openssh-server are not installed and cannot be installed here (needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "pdsh", "openssh-server", "openssh-client"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            return f"could not install pdsh/openssh-server: {' '.join(cmd)} failed: {proc.stderr.strip()[-300:]}"
    return ""


@pytest.fixture
def sshd(tmp_path):
    reason = ensure_ssh_tools()
    if reason:
        pytest.skip(reason)
    d = tmp_path / "ssh"
    d.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "user_key")], check=True)
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
    )
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd refuses to start without it
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE, text=True)
    ssh_args = f"-i {d / 'user_key'} -p {port} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR"
    for _ in range(50):
        probe = subprocess.run(["ssh", *ssh_args.split(), "127.0.0.1", "true"], capture_output=True)
        if probe.returncode == 0:
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"sshd did not come up: {proc.stderr.read() if proc.stderr else ''}")
    yield ssh_args
    os.kill(proc.pid, signal.SIGTERM)  # sshd itself, by PID
    proc.wait(timeout=10)


@pytest.mark.multirank
def test_two_nodes_over_pdsh_and_ssh(pp_dir, tmp_path, sshd):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two names, both this machine
    config = train_config(tmp_path, pp_dir, "pdsh-run")
    # Carried to every node by DeepSpeed's runner: no blank lines, no comments (both break it).
    env_file = tmp_path / "deepspeed_env"
    env_file.write_text(f"PATH={os.path.dirname(sys.executable)}:{os.environ['PATH']}\nOMP_NUM_THREADS=1\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PDSH_SSH_ARGS_APPEND": sshd, "DS_ENV_FILE": str(env_file)}
    cmd = runner_cmd(hostfile, free_port(), "--no_ssh_check", "train_ds.py", "--config", str(config))
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:  # subprocess SIGKILLs the runner: its pkill handler never runs
        subprocess.run(["pkill", "-9", "-f", str(config)])
        raise
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "pdsh" in out and "done: 4 steps" in out
    save = tmp_path / "pdsh-run"
    assert (save / "latest").read_text() == "global_step4"
    assert (pp_to_hg(save, tmp_path / "hf", progress=False) / "config.json").is_file()
