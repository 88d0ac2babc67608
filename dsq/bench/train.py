"""``dsq bench train``: end-to-end training throughput, memory and loss of recipes, side by side.

Each recipe is a real ``--nproc``-rank run through ``launch/local.sh`` (the deepspeed launcher),
the same config, seed, ``--steps`` and threads per rank (``OMP_NUM_THREADS``, default: cores /
ranks, so ranks do not oversubscribe the CPU) for all, without checkpoints in between or MLflow; the
numbers are read back from each run's ``summary.json``: ``tokens_per_s`` (rank 0's mean over
the steps after the first, so start-up and torch.compile time are left out), ``peak_rss_bytes``
of every rank (on GPUs ``peak_gpu_bytes``, PyTorch's peak allocation), and the final
``val_loss``.

A recipe is written ``BASE[+MOD...]``:

* ``BASE``: ``fp32`` or ``bf16`` (no quantization, that DeepSpeed precision), or the name of a
  file in ``configs/recipes/`` (``w8a8``, ``w8a8g8``, ``w8a8g8-both``, ...), run at
  ``--precision`` (default bf16, the faster baseline on this CPU);
* ``MOD``: ``qadamw`` (8-bit optimizer states, ``optim.name=qadamw``), ``int8``
  (``quant.compute=int8``, with ``DSQ_QUANT_KERNEL=--kernel`` when not auto),
  ``fp32`` / ``bf16`` (precision).

``--recompute none,full`` runs every recipe with each ``train.recompute`` mode (activation
recompute, the same losses); the table then adds a ``recompute`` column and each row's peak
memory (the largest rank's) against the same recipe's ``none`` row.

``--ckpt-every N --async-ckpt false,true`` checkpoints every ``N`` steps with each
``train.async_ckpt`` mode; the table then adds the mode and ``stall/save s``: the mean seconds a
checkpoint on the cadence blocked the training loop (``summary.json``'s ``ckpt_stall_s``, the
final checkpoint, always waited for, left out), and tokens/s then include those stalls.

A run that fails (e.g. an optimizer not available) is listed with its error, not dropped
silently. The table compares tokens/s with the faster of the ``fp32`` and ``bf16`` rows (of the
same recompute mode), and the validation loss of every ``+int8`` row with the same recipe
without ``+int8`` (simulated).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from dsq.log import ArgParser

ROOT = Path(__file__).resolve().parents[2]
RECIPES_DIR = ROOT / "configs" / "recipes"
DEFAULT_RECIPES = ("fp32,bf16,w8a8,w8a8g8,w8a8g8+qadamw,w8a8g8+qadamw+int8,"
                   "w8a8g8-both+qadamw,w8a8g8-both+qadamw+int8")
MODS = ("qadamw", "int8", "fp32", "bf16")
RECOMPUTE = ("none", "selective", "full")


def resolve(spec: str, precision: str, kernel: str = "auto"
            ) -> tuple[list[str], list[str], dict[str, str]]:
    """Config files, overrides and environment of recipe ``spec``."""
    base, *mods = spec.split("+")
    files: list[str] = []
    overrides: list[str] = []
    env: dict[str, str] = {}
    if base in ("fp32", "bf16"):
        files.append(str(RECIPES_DIR / "baseline.yaml"))
        precision = base
    else:
        path = RECIPES_DIR / f"{base}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
            raise ValueError(f"recipe {spec!r}: {base!r} is neither fp32, bf16 nor one of "
                             f"configs/recipes/ ({', '.join(known)})")
        files.append(str(path))
    for m in mods:
        if m not in MODS:
            raise ValueError(f"recipe {spec!r}: unknown modifier {m!r}; use {', '.join(MODS)}")
        if m == "qadamw":
            overrides.append("optim.name=qadamw")
        elif m == "int8":
            overrides.append("quant.compute=int8")
            if kernel != "auto":
                env["DSQ_QUANT_KERNEL"] = kernel
        else:
            precision = m
    overrides.append(f"deepspeed.precision={precision}")
    return files, overrides, env


def run_recipe(spec: str, ns, base_files: list[str], log, recompute: str = "none",
               async_ckpt: bool | None = None) -> dict:
    files, overrides, extra_env = resolve(spec, ns.precision, ns.kernel)
    overrides.append(f"train.recompute={recompute}")
    name = spec if recompute == "none" else f"{spec} recompute={recompute}"
    suffix = "" if recompute == "none" else f"_recompute-{recompute}"
    if async_ckpt is not None:
        overrides.append(f"train.async_ckpt={str(async_ckpt).lower()}")
        name += f" async_ckpt={str(async_ckpt).lower()}"
        suffix += "_async" if async_ckpt else "_sync"
    out = Path(ns.out).resolve() / (spec.replace("+", "_") + suffix)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    args = [*base_files, *files, f"train.steps={ns.steps}", "train.eval_every=0",
            f"train.ckpt_every={getattr(ns, 'ckpt_every', 0)}", "train.progress=false",
            "tracking.enabled=false",
            f"train.out_dir={out}", f"train.seed={ns.seed}", *overrides, *ns.override]
    if ns.cache_dir:
        args.append(f"data.cache_dir={ns.cache_dir}")
    env = {**os.environ, "PYTHON": sys.executable, **extra_env}
    if ns.threads_per_rank:
        env["OMP_NUM_THREADS"] = str(ns.threads_per_rank)
    cmd = ["bash", str(ROOT / "launch" / "local.sh"), str(ns.nproc), *args]
    log(f"  {name}: {' '.join(cmd[2:])}" + "".join(f" [{k}={v}]" for k, v in extra_env.items()))
    t0 = time.perf_counter()
    with open(out / "bench.log", "w") as fh:
        res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                             timeout=ns.timeout, check=False)
    wall = time.perf_counter() - t0
    row = {"recipe": spec, "recompute": recompute, "async_ckpt": async_ckpt,
           "ckpt_stall_s": None, "tokens_per_s": None, "peak_rss_bytes": None,
           "val_loss": None, "wall_s": wall, "out_dir": str(out), "error": None}
    summary = out / "summary.json"
    if res.returncode != 0 or not summary.is_file():
        tail = (out / "bench.log").read_text(errors="replace").strip().splitlines()[-5:]
        errors = [t for t in tail if "Error" in t or "error" in t] or tail[-1:]
        row["error"] = f"exit {res.returncode}: {errors[-1] if errors else '?'}"[:300]
        log(f"  {name}: FAILED ({row['error']}); log in {out / 'bench.log'}")
        return row
    s = json.loads(summary.read_text())
    row.update(tokens_per_s=s["tokens_per_s"], peak_rss_bytes=s["peak_rss_bytes"],
               peak_gpu_bytes=s.get("peak_gpu_bytes"), device=s.get("device", "cpu"),
               val_loss=s["val_loss"], train_loss=s["train_loss"],
               optimizer_state_bytes=s.get("optimizer_state_bytes"))
    stalls = (s.get("ckpt_stall_s") or [])[:-1]  # the last one waits for every write
    row["ckpt_stall_s"] = sum(stalls) / len(stalls) if stalls else None
    log(f"  {name}: {s['tokens_per_s']:,.0f} tokens/s, val loss {s['val_loss']:.4f} "
        f"({wall:.0f} s)")
    return row


def _peaks(r: dict, gpu: bool) -> list:
    """Peak memory per rank: PyTorch's GPU peak on GPUs, else the peak RSS."""
    return r["peak_gpu_bytes"] if gpu and r.get("peak_gpu_bytes") else r["peak_rss_bytes"]


def _mode(r: dict) -> tuple:
    """What a row is compared within: its recompute mode and checkpoint write mode."""
    return r.get("recompute", "none"), r.get("async_ckpt")


def compare(rows: list[dict]) -> None:
    """Add speedup vs the best baseline (of the same recompute mode), the int8 rows' val loss vs
    their simulation, and the peak memory (largest rank) vs the same recipe without recompute."""
    gpu = any(r.get("device") == "cuda" for r in rows)
    ok = {(r["recipe"], _mode(r)): r for r in rows if r["error"] is None}
    for r in rows:
        mode = _mode(r)
        base = max((ok[b, mode]["tokens_per_s"] for b in ("fp32", "bf16") if (b, mode) in ok),
                   default=None)
        r["speedup_vs_best_baseline"] = (r["tokens_per_s"] / base if base and r["tokens_per_s"]
                                         else None)
        r["val_loss_vs_simulated"] = r["peak_vs_no_recompute"] = None
        if r["error"] is not None:
            continue
        if "+int8" in r["recipe"]:
            sim = ok.get((r["recipe"].replace("+int8", ""), mode))
            if sim is not None:
                r["val_loss_vs_simulated"] = r["val_loss"] / sim["val_loss"] - 1
        plain = ok.get((r["recipe"], ("none", mode[1])))
        if mode[0] != "none" and plain is not None:
            r["peak_vs_no_recompute"] = max(_peaks(r, gpu)) / max(_peaks(plain, gpu)) - 1


def format_table(rows: list[dict]) -> str:
    gpu = any(r.get("device") == "cuda" for r in rows)
    mem = "peak GPU/rank MiB" if gpu else "peak RSS/rank MiB"
    rc = any(r.get("recompute", "none") != "none" for r in rows)
    extra = f" {'recompute':<9} | {'peak vs none':>12} |" if rc else ""
    ck = any(r.get("async_ckpt") is not None for r in rows)
    extra += f" {'ckpt':<5} | {'stall/save s':>12} |" if ck else ""
    head = (f"| {'recipe':<28} |{extra} {'tokens/s':>9} | {'vs best base':>12} | "
            f"{mem:>17} | {'val loss':>8} | {'vs sim':>6} |")
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        cols = ""
        if rc:
            pv = r.get("peak_vs_no_recompute")
            cols = (f" {r.get('recompute', 'none'):<9} | "
                    f"{f'{100 * pv:+.0f}%' if pv is not None else '':>12} |")
        if ck:
            st = r.get("ckpt_stall_s")
            cols += (f" {'async' if r.get('async_ckpt') else 'sync':<5} | "
                     f"{f'{st:.3f}' if st is not None else '-':>12} |")
        if r["error"]:
            lines.append(f"| {r['recipe']:<28} |{cols} {'failed: ' + r['error']}")
            continue
        rss = "/".join(f"{b / 2**20:.0f}" for b in _peaks(r, gpu))
        sp = f"{r['speedup_vs_best_baseline']:.2f}x" if r["speedup_vs_best_baseline"] else "-"
        vs = (f"{100 * r['val_loss_vs_simulated']:+.1f}%"
              if r["val_loss_vs_simulated"] is not None else "")
        lines.append(f"| {r['recipe']:<28} |{cols} {r['tokens_per_s']:>9,.0f} | {sp:>12} | "
                     f"{rss:>17} | {r['val_loss']:>8.4f} | {vs:>6} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    p = ArgParser(prog="dsq bench train", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", help="model preset (default small); uses "
                   "configs/<preset>.yaml when it exists")
    p.add_argument("--config", nargs="+", default=None,
                   help="base YAML config(s) instead of the preset's")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--recipes", default=DEFAULT_RECIPES,
                   help=f"comma-separated BASE[+MOD...] (default {DEFAULT_RECIPES})")
    p.add_argument("--recompute", default="none",
                   help="comma-separated train.recompute modes (none, selective, full): every "
                   "recipe runs with each; the table adds peak memory vs none (default none)")
    p.add_argument("--ckpt-every", type=int, default=0,
                   help="train.ckpt_every of every run (default 0: only the final checkpoint)")
    p.add_argument("--async-ckpt", default=None,
                   help="comma-separated train.async_ckpt modes (false, true): every recipe "
                   "runs with each; the table adds the seconds each checkpoint blocked "
                   "training (use with --ckpt-every)")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"),
                   help="DeepSpeed precision of quantized recipes (default bf16)")
    p.add_argument("--kernel", default="auto", choices=("auto", "eager", "cpp", "compile"),
                   help="quantization kernels of +int8 runs (DSQ_QUANT_KERNEL; default auto: "
                   "the C kernels)")
    p.add_argument("--threads-per-rank", type=int, default=None,
                   help="OMP_NUM_THREADS of every rank, all recipes alike (default: CPU cores / "
                   "nproc, at least 1; 0 leaves the environment as it is)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default="runs/bench_train", help="folder of the runs")
    p.add_argument("--cache-dir", default=None, help="data.cache_dir for all runs")
    p.add_argument("--override", action="append", default=[],
                   help="extra key.sub=value for every run (repeatable)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    ns = p.parse_args(argv)
    if ns.config:
        base_files = list(ns.config)
    else:
        preset_file = ROOT / "configs" / f"{ns.preset}.yaml"
        base_files = [str(preset_file)] if preset_file.is_file() else []
        ns.override.insert(0, f"model.preset={ns.preset}")
    if ns.threads_per_rank is None:
        ns.threads_per_rank = max(1, (os.cpu_count() or 1) // ns.nproc)
    specs = [s.strip() for s in ns.recipes.split(",") if s.strip()]
    for s in specs:
        resolve(s, ns.precision, ns.kernel)  # fail on a typo before any run starts
    modes = [m.strip() for m in ns.recompute.split(",") if m.strip()]
    bad = [m for m in modes if m not in RECOMPUTE]
    if bad or not modes:
        p.error(f"--recompute {ns.recompute!r}: use a comma-separated list of "
                f"{', '.join(RECOMPUTE)}")
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    log(f"dsq bench train: {len(specs)} recipes x {len(modes)} recompute modes x {ns.steps} "
        f"steps on {ns.nproc} ranks, "
        f"{ns.threads_per_rank or 'default'} threads each "
        f"({', '.join(base_files) or 'preset ' + ns.preset})")
    ckpt_modes: list = [None]
    if ns.async_ckpt:
        ckpt_modes = [{"true": True, "false": False}.get(m.strip().lower(), m)
                      for m in ns.async_ckpt.split(",") if m.strip()]
        if any(not isinstance(m, bool) for m in ckpt_modes) or not ckpt_modes:
            p.error(f"--async-ckpt {ns.async_ckpt!r}: use a comma-separated list of false, true")
    rows = [run_recipe(s, ns, base_files, log, m, a) for s in specs for m in modes
            for a in ckpt_modes]
    compare(rows)
    print(format_table(rows))
    if ns.json:
        Path(ns.json).write_text(json.dumps({"rows": rows, "steps": ns.steps,
                                             "nproc": ns.nproc, "config": base_files,
                                             "recompute": modes,
                                             "threads_per_rank": ns.threads_per_rank},
                                            indent=2))
    if any(r["error"] for r in rows):
        print("note: failed runs are listed with their error; see bench.log in their out_dir",
              file=sys.stderr)

