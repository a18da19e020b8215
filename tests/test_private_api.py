"""compat/private_api.py is the one module that touches private DeepSpeed/transformers internals."""
import logging
import re

from conftest import REPO

from compat import private_api

# Private attributes of DeepSpeed / transformers objects that pipetune uses (and a few it must not
# reach for elsewhere). Our own private names (self._x, module-level _helpers) are not in this list.
FOREIGN_PRIVATE = ("_local_start", "_local_stop", "forward_funcs", "tied_comms", "tied_modules", "_recursive_getattr",
                   "_synchronize_tied_weights", "_global_grad_norm", "_INSTRUCTION_MAP", "_model_mapping",
                   "_attn_implementation", "_set_bounds", "_partition_layers", "_layer_specs", "_topo",
                   "ds_pipe_replicated", "shm_vector_kernel_level", "cdb", "_exec_schedule", "_aggregate_total_loss")
PATTERN = re.compile(r"(?<![A-Za-z0-9_])(?:\.|\b)(" + "|".join(map(re.escape, FOREIGN_PRIVATE)) + r")\b")


def source_files():
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in (".venv", "tests", ".git", "runs", "build") or rel.parts[0].startswith("."):
            continue
        yield rel, path.read_text()


def test_private_internals_only_in_compat_module():
    users = {}
    for rel, text in source_files():
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        found = {m.group(1) for m in PATTERN.finditer(code) if f".{m.group(1)}" in code or f"{m.group(1)}(" in code}
        if found:
            users[str(rel)] = sorted(found)
    assert set(users) <= {"compat/private_api.py"}, users
    assert users.get("compat/private_api.py"), "the pattern no longer finds the internals compat uses"


def test_version_check_names_the_mismatch(monkeypatch, caplog):
    monkeypatch.setitem(private_api.WRITTEN_FOR, "deepspeed", "0.0.1")
    private_api.check_versions.cache_clear()
    with caplog.at_level(logging.WARNING, logger="pipetune"):
        mismatches = private_api.check_versions()
    private_api.check_versions.cache_clear()
    assert len(mismatches) == 1 and mismatches[0].startswith("deepspeed ") and "(written for 0.0.1)" in mismatches[0]
    assert "install the pinned versions" in caplog.text and "compat/private_api.py" in caplog.text


def test_pinned_versions_match_setup_py():
    setup = (REPO / "setup.py").read_text()
    for name, version in private_api.WRITTEN_FOR.items():
        assert f'"{name}=={version}"' in setup
