"""The code base's structure rules that reviews would otherwise have to remember."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
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
        if rel == "dsq/parallel/__init__.py" or rel in DEVICE_COLLECTIVES:
            continue
        found += [f"{rel}:{line}: {call}" for line, call in _collective_calls(path)]
    assert not found, ("direct torch.distributed collectives outside dsq/parallel/__init__.py's "
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


# ----------------------------------------------------------------------------- imports
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, lazy: bool):
    """dsq modules imported by ``path`` (module level only unless ``lazy``)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = ast.walk(tree) if lazy else ast.iter_child_nodes(tree)
    me = _module_name(path)
    pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("dsq"):
                    yield a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] +
                                ([base] if base else []))
            if not base.startswith("dsq"):
                continue
            for a in node.names:  # `from dsq.x import y`: y may be a module
                yield f"{base}.{a.name}"
            yield base


def _graph(lazy: bool):
    mods = {_module_name(p): p for p in (ROOT / "dsq").rglob("*.py")}
    graph = {}
    for name, path in mods.items():
        deps = set()
        for imp in _imports(path, lazy):
            while imp and imp not in mods:
                imp = imp.rpartition(".")[0]
            if imp and imp != name:
                deps.add(imp)
        graph[name] = deps
    return graph


def _cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def _ancestors(name: str):
    """``dsq.a.b`` -> ``dsq.a``, ``dsq``: importing a module runs its packages' __init__."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def test_no_import_cycle_at_module_level():
    """Module-level imports (and the package __init__ files they run) form no cycle."""
    graph = _graph(lazy=False)
    full = {n: {a for d in deps for a in [d, *_ancestors(d)] if a != n and
                not n.startswith(a + ".")} for n, deps in graph.items()}
    cycle = _cycle(full)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_imports_the_tools_or_the_cli():
    """The command layer sits on top: dsq.tools.* and dsq.cli are imported by nothing else
    (lazy imports included)."""
    bad = [f"{n} imports {d}" for n, deps in _graph(lazy=True).items() for d in deps
           if (d == "dsq.cli" or d.startswith("dsq.tools")) and not
           (n == "dsq.cli" or n.startswith("dsq.tools"))]
    assert not bad, "\n".join(bad)


def test_packages_do_not_depend_on_each_other_in_a_cycle():
    """Between the packages of dsq (lazy imports included), dependencies go one way."""
    def pkg(n):
        parts = n.split(".")
        return ".".join(parts[:2])

    graph = {}
    for n, deps in _graph(lazy=True).items():
        graph.setdefault(pkg(n), set()).update(pkg(d) for d in deps if pkg(d) != pkg(n))
    for deps in list(graph.values()):
        for d in deps:
            graph.setdefault(d, set())
    cycle = _cycle(graph)
    assert cycle is None, "package cycle: " + " -> ".join(cycle)


def test_the_cycle_rule_sees_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) in (["a", "b", "c", "a"],)
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_over_the_line_limit():
    long = [f"{p.relative_to(ROOT)}: {n}" for p in sorted((ROOT / "dsq").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines:\n" + "\n".join(long)
