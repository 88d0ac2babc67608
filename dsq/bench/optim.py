"""``dsq bench optim``: one optimizer step, side by side, on the same parameters and gradients.

Candidates: torch AdamW (foreach, fused), dsq's QAdamW (8-bit m and v; 4-bit m with 8-bit v;
4-bit m and v; one moment quantized, the other fp32: ``dsq_m8``, ``dsq_m4``, ``dsq_v8``), and,
when importable (optional extra ``bench``), bitsandbytes AdamW8bit and torchao AdamW8bit /
AdamW4bit. Parameters are realistic linear weights (GPT-2 small layer
shapes, repeated up to ``--params``); gradients are fixed random tensors shared by all
candidates, each candidate gets its own copy of the initial parameters. Reported: median
ms per step over ``--repeat`` steps after ``--warmup`` (the first steps allocate state and
compile), parameters per second, and optimizer state bytes per parameter.

Usage: ``dsq bench optim [--params 20e6] [--repeat 10] [--json out.json]`` or
``python -m dsq.bench.optim ...``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch
from dsq.log import ArgParser

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]  # qkv, proj, fc1, fc2
HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def make_params(n_params: int, seed: int = 0):
    """Linear weights cycling through ``SHAPES`` until ``n_params`` is reached; gradients."""
    g = torch.Generator().manual_seed(seed)
    shapes, total = [], 0
    while total < n_params:
        s = SHAPES[len(shapes) % len(SHAPES)]
        shapes.append(s)
        total += s[0] * s[1]
    params = [torch.randn(s, generator=g) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
    return params, grads


def state_bytes(opt) -> int:
    """Bytes of all tensors in the optimizer state (inner tensors of tensor subclasses, shared
    tensors such as quantization maps counted once)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            for n in names:
                add(getattr(t, n))
            return
        if t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                add(v)
    return total


def candidates(kernel: str) -> Dict[str, Callable]:
    from dsq.optim import QAdamW

    def q(**kw):
        def make(ps):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return QAdamW(ps, kernel=kernel, **HP, **kw)
        return make

    out = {
        "torch_adamw_foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **HP),
        "torch_adamw_fused": lambda ps: torch.optim.AdamW(ps, fused=True, **HP),
        "dsq_8bit": q(m_bits=8, v_bits=8),
        "dsq_4bit": q(m_bits=4, v_bits=8),
        "dsq_4bit_v4": q(m_bits=4, v_bits=4),
        "dsq_m8": q(m_bits=8, v_bits=32),   # one moment quantized, the other fp32
        "dsq_m4": q(m_bits=4, v_bits=32),
        "dsq_v8": q(m_bits=32, v_bits=8),
    }
    out["bnb_adamw8bit"] = _lazy("bitsandbytes.optim", "AdamW8bit")
    out["torchao_adamw8bit"] = _lazy("torchao.optim", "AdamW8bit")
    out["torchao_adamw4bit"] = _lazy("torchao.optim", "AdamW4bit")
    return out


def _lazy(module: str, cls: str) -> Callable:
    def make(ps):
        import importlib

        from dsq.bench import quiet_import

        with quiet_import():
            mod = importlib.import_module(module)
        return getattr(mod, cls)(ps, **HP)
    return make


def build(make: Callable, params, grads, warmup: int):
    ps = [torch.nn.Parameter(p.clone()) for p in params]  # on the device of ``params``
    for p, g in zip(ps, grads):
        p.grad = g
    opt = make(ps)
    for _ in range(warmup):
        opt.step()
    return opt, ps


def timed_step(opt, cuda: bool = False) -> float:
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    opt.step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def run(n_params: int, warmup: int, repeat: int, only: Optional[List[str]], kernel: str,
        log=print, device: str = "cpu") -> List[Dict]:
    params, grads = make_params(n_params)
    params, grads = [p.to(device) for p in params], [g.to(device) for g in grads]
    n = sum(p.numel() for p in params)
    built = {}
    for name, make in candidates(kernel).items():
        if only and name not in only:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built[name] = build(make, params, grads, warmup)
        except ImportError as e:
            log(f"  {name}: skipped (not installed: {e.name or e}; pip install 'dsq[bench]')")
        except Exception as e:  # a competitor that does not run here (e.g. no CPU kernel)
            log(f"  {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    times: Dict[str, List[float]] = {name: [] for name in built}
    for _ in range(repeat):
        for name, (opt, _) in built.items():
            times[name].append(timed_step(opt, device == "cuda"))
    rows = []
    for name, (opt, ps) in built.items():
        ms = statistics.median(times[name]) * 1e3
        row = {"name": name, "device": device, "ms_per_step": ms, "params_per_s": n / (ms / 1e3),
               "state_bytes_per_param": state_bytes(opt) / n, "params": n}
        if not all(torch.isfinite(p).all() for p in ps):
            row["note"] = "non-finite parameters"
        rows.append(row)
    fused = next((r["ms_per_step"] for r in rows if r["name"] == "torch_adamw_fused"), None)
    for r in rows:
        if fused:
            r["relative_to_fused"] = fused / r["ms_per_step"]
    return rows


def table(rows: List[Dict], cpu: Optional[Dict] = None) -> str:
    """The rows as a table; with ``cpu`` (:func:`dsq.bench.cpu_info`) headed by the CPU and the
    instruction set of dsq's QAdamW kernel (also in each row's ``kernel``)."""
    lines = []
    if cpu:
        from dsq.bench import cpu_line

        lines += [cpu_line(cpu), f"dsq QAdamW kernel: {_kernel_label(cpu)}", ""]
    lines += ["| optimizer | ms/step | Mparam/s | state B/param | speed vs fused | kernel |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        rel = f"{r['relative_to_fused']:.2f}x" if "relative_to_fused" in r else "-"
        lines.append(f"| {r['name']} | {r['ms_per_step']:.1f} | {r['params_per_s'] / 1e6:.0f} | "
                     f"{r['state_bytes_per_param']:.3f} | {rel} | {r.get('kernel', '')} |")
    return "\n".join(lines)


def _kernel_label(cpu: Dict) -> str:
    isa = cpu["qadamw_kernel"]
    return f"C/{isa}" if isa != "reference" else "eager PyTorch (no native build)"


def main(argv: Optional[List[str]] = None) -> None:
    ap = ArgParser(prog="dsq bench optim", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=20e6, help="parameters (default 20e6)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--kernel", default="auto", help="QAdamW kernel: auto|cpp|eager|compile")
    ap.add_argument("--only", nargs="*", help="names of the candidates to run")
    from dsq.bench import add_common_args, setup

    add_common_args(ap)
    args = ap.parse_args(argv)
    device, where = setup(args)
    print(f"optimizer step over {int(args.params) / 1e6:.0f}M fp32 parameters, "
          f"{where}, median of {args.repeat} after {args.warmup} "
          f"warm-up steps", file=sys.stderr)
    rows = run(int(args.params), args.warmup, args.repeat, args.only, args.kernel,
               log=lambda s: print(s, file=sys.stderr), device=device)
    cpu = None
    if device == "cpu":
        from dsq.bench import cpu_info

        cpu = cpu_info()
        for r in rows:
            r["cpu"] = cpu["model"]
            own = ({"eager": "eager PyTorch", "compile": "torch.compile"}.get(args.kernel)
                   or _kernel_label(cpu))
            r["kernel"] = own if r["name"].startswith("dsq") else "PyTorch / library"
    print(table(rows, cpu))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
