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

from conftest import REPO
from convert.errors import ConversionError
from convert.hg_to_pp import hg_to_pp
from convert.pp_to_hg import pp_to_hg
from trainer.config import validate
from trainer.preflight import judge


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
