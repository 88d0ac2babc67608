"""``dsq bench quant``: milliseconds per quantize + dequantize of the floating-point (and int8)
formats on CPU-sized operands, one row per format and shape.

One timed iteration is ``quantize(x, fmt).dequantize()`` of an fp32 tensor (what the simulated
GEMMs of :mod:`dsq.quant.float_linear` do to each operand); rows run interleaved, one iteration
each per round, after ``--warmup`` rounds, and the median of ``--repeats`` rounds is reported (a
machine shared with other work slows all rows alike). The default shapes are the ``small``
model's activations (``2048 x 256``: 8 x 256 tokens by 256 features) and its LM head's gradient
(``2048 x 8192``). Before/after comparisons are reruns at two commits on the same machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dsq.bench import add_common_args, setup

FORMATS = ("int8:token", "fp8e4m3:token", "fp8e5m2:token", "fp8e4m3:block128", "mxfp8",
           "mxfp4", "nvfp4", "nvfp4:2d", "nvfp4:stochastic")
SHAPES = ("2048x256", "2048x8192")


def _shape(s: str) -> tuple[int, int]:
    try:
        r, c = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {s!r}: give ROWSxCOLS, e.g. 2048x256") from None
    return r, c


def run(formats, shapes, repeats: int, warmup: int, device: str) -> list[dict]:
    from dsq.quant import QuantFormat, quantize

    g = torch.Generator(device=device).manual_seed(0)
    cases = []
    for r, c in shapes:
        x = torch.randn(r, c, generator=g, device=device)
        for spec in formats:
            fmt = QuantFormat.parse(spec)
            kw = {"generator": g} if getattr(fmt, "rounding", "") == "stochastic" else {}
            cases.append((spec, f"{r}x{c}", x, fmt, kw))
    times: list[list[float]] = [[] for _ in cases]
    for i in range(warmup + repeats):
        for j, (_, _, x, fmt, kw) in enumerate(cases):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            quantize(x, fmt, **kw).dequantize()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[j].append((time.perf_counter() - t) * 1e3)
    return [{"format": spec, "shape": shape, "ms": statistics.median(ts)}
            for (spec, shape, *_), ts in zip(cases, times)]


def main(argv) -> None:
    p = argparse.ArgumentParser(prog="dsq bench quant", description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", nargs="+", default=list(FORMATS), help="format strings")
    p.add_argument("--shapes", nargs="+", type=_shape, default=[_shape(s) for s in SHAPES],
                   help="ROWSxCOLS operands (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    add_common_args(p)
    ns = p.parse_args(argv)
    from dsq.quant import QuantFormat

    for spec in ns.formats:
        try:
            QuantFormat.parse(spec)
        except ValueError as e:
            p.exit(2, f"dsq: error: --formats: {e}\n")
    device, where = setup(ns)
    rows = run(ns.formats, ns.shapes, ns.repeats, ns.warmup, device)
    print(f"quantize + dequantize, fp32 input, {device} ({where}), median of {ns.repeats}")
    print(f"{'format':<20} {'shape':>10} {'ms':>9}")
    for r in rows:
        print(f"{r['format']:<20} {r['shape']:>10} {r['ms']:>9.3f}")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"device": device, "where": where, "rows": rows}, f, indent=1)
