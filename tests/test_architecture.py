"""The code base's structure rules that reviews would otherwise have to remember."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
    "broadcast_object_list", "barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "gather", "gather_object", "scatter", "scatter_object_list", "all_to_all",
    "all_to_all_single", "send", "recv", "isend", "irecv", "monitored_barrier"}
# Modules that reduce *device* tensors inside the model or the optimizer (never host values):
# they stay on the tensors' own backend (NCCL on GPUs) and are exempt from the helpers.
DEVICE_COLLECTIVES = {
    "dsq/models/quant_layers.py",  # quantization statistics / SQNR sums over the TP group
    "dsq/models/loss.py",          # vocab-parallel cross entropy over the TP group
    "dsq/optim/qadamw.py",         # block maxima of quantized states over the DP group
}


def _collective_calls(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in COLLECTIVES:
            base = ast.unparse(node.func.value)
            if base in ("dist", "torch.distributed"):
                yield node.lineno, f"{base}.{node.func.attr}"


def test_host_collectives_only_through_the_helpers():
    found = []
    for path in sorted((ROOT / "dsq").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "dsq/distributed.py" or rel in DEVICE_COLLECTIVES:
            continue
        found += [f"{rel}:{line}: {call}" for line, call in _collective_calls(path)]
    assert not found, ("direct torch.distributed collectives outside dsq/distributed.py's "
                       "helpers (host values must use them):\n" + "\n".join(found))


def test_the_rule_sees_a_direct_collective(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch.distributed as dist\n\ndef f(t):\n"
                   "    dist.all_reduce(t)\n    torch.distributed.barrier()\n")
    assert [c for _, c in _collective_calls(bad)] == ["dist.all_reduce",
                                                      "torch.distributed.barrier"]


def test_exempt_modules_exist():
    for rel in DEVICE_COLLECTIVES:
        assert list(_collective_calls(ROOT / rel)), f"{rel} no longer needs its exemption"
