"""``dsq bench linear``: forward + backward of one linear layer, side by side.

Rows (each shape ``tokens x in -> out``, the same inputs cast to each row's dtype):

* ``fp32 nn.Linear``, ``bf16 nn.Linear``: PyTorch's own layer;
* ``torchao int8 MP``: torchao's int8 mixed-precision training (all three GEMMs dynamically
  quantized to int8, row-wise), bf16 weights; ``torchao int8 MP (compiled)`` the same under
  ``torch.compile`` (with ``--compile``); only when torchao is importable (extra ``bench``);
* ``dsq simulate``: :func:`dsq.quant.quantized_linear`, W8A8 with G8 on both backward GEMMs
  (``int8:channel``, ``int8:token``, ``int8:token``), bf16, quantize-dequantize + bf16 GEMMs;
* ``dsq simulate, full backward``: the same with ``backward_operands: full`` (the study's
  backward: ``X`` and ``W`` kept in full precision for the backward GEMMs), to compare what each
  keeps for backward (``saved_MiB``);
* ``dsq int8``: the same recipe with ``compute: int8`` (integer GEMMs) and the default C
  kernels for quantization and rescale; ``dsq int8 (eager)`` with the eager reference kernels,
  ``dsq int8 (compiled)`` with the torch.compile ones (with ``--compile``, the default).

One timed iteration is ``y = layer(x); y.backward(g)`` with ``x`` requiring grad (a layer inside
a network computes all three GEMMs) plus the bias gradient. Rows run interleaved, one iteration
each per round, after ``--warmup`` rounds (compilation happens there), and the median of
``--repeats`` rounds is reported: a machine shared with other work slows all rows alike.
``saved_MiB`` is what autograd keeps for backward, parameters excluded (measured with
``torch.autograd.graph.saved_tensors_hooks``).

Speed-ups are against the fastest float row of each shape (``baseline``: bf16 on CPUs with bf16
hardware, fp32 where bf16 is emulated); ``speedup_vs_bf16`` is kept in the JSON. The table is
headed by the CPU (model, the flags that pick kernels) and the instruction set each dsq kernel
runs as (:func:`dsq.bench.cpu_info`, also under ``cpu`` in the JSON; ``kernels`` per row); where
dsq int8 is slower than the baseline, a line after the table says why.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from dsq.log import ArgParser

from dsq.bench import quiet_import

DEFAULT_SHAPES = "768x3072,3072x768,1024x4096"
RECIPE = {"weight": "int8:channel", "activation": "int8:token", "grad": "int8:token",
          "grad_gemms": "both"}


@dataclass
class Row:
    name: str
    dtype: torch.dtype
    layer: Callable  # x -> y
    params: list[torch.Tensor]
    kernel: str = "auto"
    """dsq's quantization kernels for this row (dsq.quant.fused.set_kernel)."""


def parse_shapes(spec: str) -> list[tuple]:
    out = []
    for part in spec.split(","):
        a, b = part.lower().split("x")
        out.append((int(a), int(b)))
    return out


def _linear(n_in, n_out, dtype, w, b):
    m = torch.nn.Linear(n_in, n_out, dtype=dtype)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    return m


def _torchao(n_in, n_out, w, b, compile_: bool) -> Row | None:
    try:
        with quiet_import():
            from torchao.prototype.quantized_training import Int8MixedPrecisionTrainingConfig
            from torchao.quantization import quantize_
    except Exception:  # noqa: BLE001  (not installed, or an incompatible build)
        return None
    m = _linear(n_in, n_out, torch.bfloat16, w, b)
    # module swap: with the default tensor-subclass weight, torch 2.13 does not route
    # F.linear to torchao's Function and the layer silently runs plain bf16 GEMMs
    quantize_(m, Int8MixedPrecisionTrainingConfig(module_swap=True))
    name = "torchao int8 MP"
    layer = m
    if compile_:
        layer, name = torch.compile(m), name + " (compiled)"
    return Row(name, torch.bfloat16, layer, list(m.parameters()))


def _dsq(n_in, n_out, w, b, compute: str, name: str, kernel: str = "auto",
         backward_operands: str = "quantized") -> Row:
    from dsq.quant import LinearQuant, quantized_linear

    qc = LinearQuant(**RECIPE, compute=compute, backward_operands=backward_operands)
    wp = torch.nn.Parameter(w.to(torch.bfloat16).clone())
    bp = torch.nn.Parameter(b.to(torch.bfloat16).clone())
    return Row(name, torch.bfloat16, lambda x: quantized_linear(x, wp, qc, bias=bp), [wp, bp],
               kernel)


def build_rows(n_in, n_out, w, b, *, compile_: bool, torchao: bool,
               device: str = "cpu") -> list[Row]:
    """The rows of one shape. On CUDA ``dsq int8`` runs the default (Triton-compiled) kernels
    and ``dsq int8 (eager)`` the reference ones; on the CPU ``dsq int8`` runs the C kernels."""
    rows = []
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        m = _linear(n_in, n_out, dtype, w, b)
        rows.append(Row(f"{label} nn.Linear", dtype, m, list(m.parameters())))
    if torchao:
        for c in ((False, True) if compile_ else (False,)):
            r = _torchao(n_in, n_out, w, b, c)
            if r is not None:
                rows.append(r)
    rows.append(_dsq(n_in, n_out, w, b, "simulate", "dsq simulate"))
    rows.append(_dsq(n_in, n_out, w, b, "simulate", "dsq simulate, full backward",
                     backward_operands="full"))
    rows.append(_dsq(n_in, n_out, w, b, "int8", "dsq int8 (eager)", "eager"))
    if device == "cuda":
        rows.append(_dsq(n_in, n_out, w, b, "int8", "dsq int8", "auto"))
        return rows
    rows.append(_dsq(n_in, n_out, w, b, "int8", "dsq int8", "cpp"))
    if compile_:
        rows.append(_dsq(n_in, n_out, w, b, "int8", "dsq int8 (compiled)", "compile"))
    return rows


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _Kernel:
    """Run a block with dsq's kernel ``name`` (both passes: backward runs after forward)."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        from dsq.quant import fused

        self.prev = fused.kernel()
        fused.set_kernel(self.name)

    def __exit__(self, *exc):
        from dsq.quant import fused

        fused.set_kernel(self.prev)


def _step(row: Row, x, g) -> None:
    for p in row.params:
        p.grad = None
    x.grad = None
    with _Kernel(row.kernel):
        row.layer(x).backward(g)


def _int_mm_calls(row: Row, x, g) -> int:
    """Integer GEMMs (torch._int_mm or dsq's AMX driver) in one forward + backward."""
    from dsq.quant.gemm import counting_int_gemms

    with counting_int_gemms() as calls:
        _step(row, x, g)
    return len(calls)


def saved_bytes(row: Row, x) -> int:
    params = {p.data_ptr() for p in row.params}
    sizes: dict = {}

    def pack(t):
        if t.data_ptr() not in params:
            sizes[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _Kernel(row.kernel):
        y = row.layer(x)
    del y
    return sum(sizes.values())


def bench_shape(tokens: int, n_in: int, n_out: int, *, repeats: int, warmup: int,
                compile_: bool, torchao: bool, seed: int = 0, log=print,
                device: str = "cpu") -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=gen).to(device)
    w = torch.randn(n_out, n_in, generator=gen).to(device) / n_in**0.5
    b = torch.randn(n_out, generator=gen).to(device) * 0.1
    g = torch.randn(tokens, n_out, generator=gen).to(device) / tokens
    with torch.device(device):
        rows = build_rows(n_in, n_out, w, b, compile_=compile_, torchao=torchao, device=device)
    inputs = {dt: (x.to(dt).requires_grad_(), g.to(dt)) for dt in {r.dtype for r in rows}}
    for r in [r for r in rows if "int8" in r.name]:  # the integer GEMMs really run
        n = _int_mm_calls(r, *inputs[r.dtype])
        if n < 3:
            log(f"  {r.name}: {n} integer GEMMs in forward+backward (expected 3): "
                f"left out, it does not run int8 GEMMs here")
            rows.remove(r)
    times = {r.name: [] for r in rows}
    t0 = time.perf_counter()
    for i in range(warmup + repeats):
        for r in rows:
            xi, gi = inputs[r.dtype]
            _sync(device)
            s = time.perf_counter()
            _step(r, xi, gi)
            _sync(device)
            if i >= warmup:
                times[r.name].append(time.perf_counter() - s)
        if i == warmup - 1:
            log(f"  {tokens}x{n_in}->{n_out}: warm-up (incl. compilation) "
                f"{time.perf_counter() - t0:.1f} s")
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    bf16 = ms.get("bf16 nn.Linear")
    floats = {k: v for k, v in ms.items() if k in ("fp32 nn.Linear", "bf16 nn.Linear")}
    baseline = min(floats, key=floats.get) if floats else None
    flops = 6 * tokens * n_in * n_out
    out = []
    for r in rows:
        out.append({
            "name": r.name, "shape": f"{tokens}x{n_in}->{n_out}",
            "tokens": tokens, "in": n_in, "out": n_out, "ms": ms[r.name], "device": device,
            "speedup_vs_bf16": bf16 / ms[r.name] if bf16 else None,
            "baseline": baseline,
            "speedup_vs_baseline": ms[baseline] / ms[r.name] if baseline else None,
            "kernels": _row_kernels(r, device),
            "gop_s": flops / ms[r.name] / 1e6,
            "saved_MiB": saved_bytes(r, inputs[r.dtype][0]) / 2**20,
            "min_ms": 1e3 * min(times[r.name]), "repeats": repeats})
    return out


def _row_kernels(r: Row, device: str) -> str:
    """What computes a row: PyTorch's GEMMs, or dsq's quantization kernels and integer GEMM
    (with the instruction set each runs as)."""
    if "nn.Linear" in r.name or "torchao" in r.name:
        return "PyTorch"
    if device == "cuda" or "simulate" in r.name:
        return "PyTorch" if "simulate" in r.name else "see the start-up line"
    from dsq.quant import cpu_gemm, cpu_kernels

    quant = {"eager": "eager PyTorch", "compile": "torch.compile"}.get(r.kernel) or (
        f"C/{cpu_kernels.isa()}" if cpu_kernels.isa() != "reference" else "eager PyTorch")
    gemm = "dsq AMX driver" if cpu_gemm.available() else "torch._int_mm"
    return f"{quant} + {gemm}"


def format_table(rows: list[dict], cpu: dict | None = None) -> str:
    """The rows as a table; with ``cpu`` (:func:`dsq.bench.cpu_info`), headed by the CPU and
    the kernels' instruction sets, with a line per shape where dsq int8 loses to the fastest
    float row, saying why."""
    lines = []
    if cpu:
        from dsq.bench import cpu_line

        lines += [cpu_line(cpu),
                  f"dsq kernels: quantization and rescale C/{cpu['quant_kernels']}, integer "
                  f"GEMMs {cpu['int8_gemm']}; 'vs float': against the fastest float row of "
                  f"each shape (fp32 or bf16 nn.Linear, named in the last column)", ""]
    head = f"| {'layer':<28} | {'shape':<16} | {'ms':>8} | {'vs float':>8} | {'GOP/s':>6} | " \
           f"{'saved MiB':>9} | {'kernels':<30} | {'float baseline':<14} |"
    lines += [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        sp = f"{r['speedup_vs_baseline']:.2f}x" if r.get("speedup_vs_baseline") else "-"
        lines.append(f"| {r['name']:<28} | {r['shape']:<16} | {r['ms']:>8.1f} | {sp:>8} | "
                     f"{r['gop_s']:>6.0f} | {r['saved_MiB']:>9.1f} | {r.get('kernels', ''):<30} | "
                     f"{r.get('baseline') or '-':<14} |")
    for r in rows:
        if cpu and r["name"] == "dsq int8" and (r.get("speedup_vs_baseline") or 1) < 1:
            why = (cpu["int8_why"] if not cpu["int8_pays"] else
                   "the quantization passes and the rescale cost more than the integer GEMMs "
                   f"save at this shape ({cpu['int8_why']})")
            lines.append(f"dsq int8 at {r['shape']}: {r['speedup_vs_baseline']:.2f}x the fastest "
                         f"float row ({r['baseline']}): {why}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    p = ArgParser(prog="dsq bench linear", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="rows of X (default 4096)")
    p.add_argument("--shapes", default=DEFAULT_SHAPES,
                   help=f"comma-separated in x out (default {DEFAULT_SHAPES})")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile rows (dsq int8 compiled, torchao compiled)")
    p.add_argument("--no-torchao", dest="torchao", action="store_false")
    from dsq.bench import add_common_args, setup

    add_common_args(p)
    ns = p.parse_args(argv)
    device, where = setup(ns)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    log(f"dsq bench linear: torch {torch.__version__}, {where}, "
        f"fwd+bwd, median of {ns.repeats} after {ns.warmup} warm-up rounds")
    from dsq.bench import cpu_info

    cpu = cpu_info()
    rows = []
    for n_in, n_out in parse_shapes(ns.shapes):
        rows += bench_shape(ns.tokens, n_in, n_out, repeats=ns.repeats, warmup=ns.warmup,
                            compile_=ns.compile, torchao=ns.torchao, log=log, device=device)
    print(format_table(rows, cpu if device == "cpu" else None))
    if ns.json:
        with open(ns.json, "w") as fh:
            json.dump({"rows": rows, "torch": torch.__version__, "device": where,
                       "threads": torch.get_num_threads(), "cpu": cpu}, fh, indent=2)


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when a GPU is visible, else cpu; ``cuda`` without one is an error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        print("dsq: error: --device cuda but no CUDA device is visible", file=sys.stderr)
        sys.exit(2)
    return name
