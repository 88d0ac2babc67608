"""``dsq report``: the study's comparison table and validation curves from an MLflow experiment."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPORT_TAG = "dsq.kind"


class ReportError(ValueError):
    pass


def _fmt(v: Optional[str]) -> str:
    return "-" if v in (None, "", "None", "null") else str(v)


def _optim_states(p: Dict[str, str]) -> str:
    """``fp32``, or QAdamW's formats: ``m8/v8 b256``; a moment of 32 bits is fp32
    (``m8/fp32 v b256``, ``fp32 m/v8 b256``), an fp8 one is named (``m fp8e4m3/v fp8e5m2
    b256``)."""
    if p.get("optim.name") != "qadamw":
        return "fp32"
    block = p.get("optim.block_size", "?")
    m, v = (_moment(p, k) for k in ("m", "v"))
    if p.get("optim.v_signed") in ("True", "true"):
        v += " signed"
    return f"{m}/{v} b{block}"


def _moment(p: Dict[str, str], k: str) -> str:
    form, bits = p.get(f"optim.{k}_format", ""), p.get(f"optim.{k}_bits")
    if form.startswith("fp8"):
        return f"{k} {form}"
    return f"fp32 {k}" if bits == "32" else f"{k}{bits}"


def _last(m: Dict[str, float], *keys: str) -> float:
    for k in keys:
        if k in m:
            return m[k]
    return float("nan")


T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060,
        2.056, 2.052, 2.048, 2.045, 2.042)
"""Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (1.96 beyond)."""


def t975(df: int) -> float:
    return T975[df - 1] if 1 <= df <= len(T975) else 1.96


def _format(p: Dict[str, str], name: str) -> str:
    """An operand's format as its short string: logged as one param (``quant.weight``), or,
    given as a mapping, as one param per field (``quant.weight.bits`` ...)."""
    if f"quant.{name}" in p:
        return _fmt(p[f"quant.{name}"])
    fields = {k[len(f"quant.{name}."):]: v for k, v in p.items()
              if k.startswith(f"quant.{name}.")}
    if not fields:
        return "-"
    from omegaconf import OmegaConf

    from dsq.quant import QuantFormat

    try:  # the params are strings: let YAML give them their types back
        spec = {k: OmegaConf.to_container(OmegaConf.create(f"v: {v}"))["v"]
                for k, v in fields.items()}
        return _fmt(str(QuantFormat.parse(spec)))
    except (ValueError, TypeError):
        return ", ".join(f"{k}={v}" for k, v in sorted(fields.items()))


OPERANDS = (("W", "weight"), ("A", "activation"), ("G", "grad"))
REF_HIDDEN = 1024
"""Reduction dimension assumed for bits per element when a run logged no ``model.hidden_size``."""


def _sqnr(m: Dict[str, float], p: Dict[str, str], name: str) -> float:
    """Mean over layer types of the last SQNR (dB) measured of one operand: the metrics
    ``sqnr_db/<layer>/<operand>`` that dsq train logs at eval steps (``run.data.metrics`` holds
    each key's value at its last step); nan when the operand is not quantized."""
    if _format(p, name) == "-":
        return float("nan")
    return _mean([v for k, v in m.items() if k.startswith("sqnr_db/") and k.endswith("/" + name)])


def _ref_size(p: Dict[str, str]) -> Tuple[int, bool]:
    """The reference shape's size (rows = cols = ``model.hidden_size``) and whether it was
    logged (False: :data:`REF_HIDDEN` assumed)."""
    try:
        return int(float(p["model.hidden_size"])), True
    except (KeyError, TypeError, ValueError):
        return REF_HIDDEN, False


def _bits(p: Dict[str, str], name: str) -> float:
    """Storage bits per element, scales included, of an operand's format for a hidden x hidden
    operand (reduction dimension ``model.hidden_size``); nan when it is not quantized."""
    from dsq.quant import QuantFormat

    fmt = _format(p, name)
    if fmt == "-":
        return float("nan")
    try:
        f = QuantFormat.parse(fmt)
    except ValueError:
        return float("nan")
    n, _ = _ref_size(p)
    return float("nan") if f is None else f.bits_per_element(cols=n, rows=n)


def _run_row(r) -> Dict:
    p, m, t = r.data.params, r.data.metrics, r.data.tags
    grad = _format(p, "grad")
    if grad != "-":
        grad += f" ({p.get('quant.grad_gemms', 'weight')})"
    quantized = any(_format(p, k) != "-" for k in ("weight", "activation", "grad"))
    seed = p.get("train.seed")
    return {
        "run_id": r.info.run_id,
        "recipe": t.get("dsq.recipe") or r.info.run_name,
        "seed": int(float(seed)) if seed not in (None, "", "None") else None,
        "status": r.info.status,
        "start": r.info.start_time or 0,
        "W": _format(p, "weight"), "A": _format(p, "activation"), "G": grad,
        "backward": p.get("quant.backward_operands", "quantized") if quantized else "-",
        "states": _optim_states(p),
        "steps": int(float(p.get("train.steps", "nan"))) if p.get("train.steps") else None,
        "train_loss": _last(m, "summary/train_loss", "train/loss"),
        "val_loss": _last(m, "summary/val_loss", "val/loss"),
        "val_ppl": _last(m, "summary/val_ppl", "val/ppl"),
        "last_val": _last(m, "val/loss"), "last_train": _last(m, "train/loss"),
        "tokens_per_s": _last(m, "summary/tokens_per_s"),
        "state_bpp": _last(m, "summary/optimizer_state_bytes_per_param"),
        "sqnr": {o: _sqnr(m, p, name) for o, name in OPERANDS},
        "bits": {o: _bits(p, name) for o, name in OPERANDS},
        "ref_size": _ref_size(p),
    }


def _mean(xs: List[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs: List[float]) -> float:
    """Sample standard deviation (n - 1); nan below two values."""
    xs = [x for x in xs if not math.isnan(x)]
    if len(xs) < 2:
        return float("nan")
    mu = sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def collect(client, experiment: str) -> List[Dict]:
    """One row per recipe (runs grouped by their ``dsq.recipe`` tag), over its seeds: the most
    recent finished run of each seed (running and failed runs are left out), val loss mean and
    sample std, and
    the difference to ``baseline`` paired by seed with its standard error and whether it is
    beyond the noise (a two-sided paired t-test at 95%: ``|d| > t(n-1) s.e.``)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ReportError(f"no experiment {experiment!r} at this tracking URI (experiments: "
                          f"{names}): check --experiment and --tracking-uri")
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=5000)
            if r.data.tags.get(REPORT_TAG) != "report"]
    if not runs:
        raise ReportError(f"experiment {experiment!r} has no training runs")
    latest: Dict[Tuple[str, object], Dict] = {}
    failed: Dict[Tuple[str, object], Dict] = {}
    for row in sorted(map(_run_row, runs), key=lambda r: r["start"]):
        if row["status"] == "FINISHED":
            latest[(row["recipe"], row["seed"])] = row
        elif row["status"] == "FAILED":
            failed[(row["recipe"], row["seed"])] = row
    failed = {k: v for k, v in failed.items() if k not in latest}
    if not latest and not failed:
        raise ReportError(f"experiment {experiment!r} has no finished training run yet")
    groups: Dict[str, List[Dict]] = {}
    for (recipe, _), row in latest.items():
        groups.setdefault(recipe, []).append(row)
    fails: Dict[str, List[Dict]] = {}
    for (recipe, _), row in failed.items():
        fails.setdefault(recipe, []).append(row)
        groups.setdefault(recipe, [])
    out = []
    for recipe, rs in groups.items():
        if not rs:  # every seed failed: the row says so, with what the runs reached
            f = fails[recipe]
            out.append(dict(f[0], runs=[], n=0, seeds=[], failed=f, val_std=float("nan"),
                            val_loss=float("nan"), train_loss=float("nan"),
                            val_ppl=float("nan"), tokens_per_s=float("nan"),
                            state_bpp=float("nan")))
            continue
        rs.sort(key=lambda r: (r["seed"] is None, r["seed"] or 0))
        head = max(rs, key=lambda r: r["start"])
        vals = [r["val_loss"] for r in rs]
        out.append(dict(head, runs=rs, n=len(rs), seeds=[r["seed"] for r in rs],
                        failed=fails.get(recipe, []),
                        val_loss=_mean(vals), val_std=_std(vals),
                        train_loss=_mean([r["train_loss"] for r in rs]),
                        val_ppl=_mean([r["val_ppl"] for r in rs]),
                        tokens_per_s=_mean([r["tokens_per_s"] for r in rs]),
                        state_bpp=_mean([r["state_bpp"] for r in rs]),
                        sqnr={o: _mean([r["sqnr"][o] for r in rs]) for o, _ in OPERANDS},
                        bits={o: _mean([r["bits"][o] for r in rs]) for o, _ in OPERANDS}))
    out.sort(key=lambda r: (r["recipe"] != "baseline", r["recipe"]))
    base = groups.get("baseline")
    base_by_seed = {r["seed"]: r["val_loss"] for r in base} if base else {}
    for row in out:
        row["delta_val"] = row["delta_se"] = float("nan")
        row["beyond_noise"] = None
        if not base:
            continue
        d = [r["val_loss"] - base_by_seed[r["seed"]] for r in row["runs"]
             if r["seed"] in base_by_seed and not math.isnan(r["val_loss"])]
        if not d:  # no common seed: difference of the means
            row["delta_val"] = row["val_loss"] - _mean(list(base_by_seed.values()))
            continue
        row["delta_val"], row["paired"] = _mean(d), len(d)
        if len(d) >= 2 and row["recipe"] != "baseline":
            row["delta_se"] = _std(d) / math.sqrt(len(d))
            row["beyond_noise"] = abs(row["delta_val"]) > t975(len(d) - 1) * row["delta_se"]
    return out


def _se(x) -> str:
    """A standard error: 4 decimals, or 2 significant digits below 0.0005 (seeds that move
    alike give an s.e. that 4 decimals would print as 0)."""
    if x is None or math.isnan(x):
        return "-"
    if 0 < x < 0.0005:
        return f"{x:.{1 - math.floor(math.log10(x))}f}"
    return f"{x:.4f}"


def markdown(rows: List[Dict], experiment: str) -> str:
    def f(x, nd=4, sign=False):
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return "-"
        return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"

    lines = [f"# dsq report: experiment `{experiment}`", "",
             "| recipe | W | A | G | backward | optimizer states | steps | seeds | train loss "
             "| val loss | ± std | Δ val vs baseline | ± s.e. | beyond noise | val ppl "
             "| tokens/s | state B/param | SQNR W / A / G (dB) | bits/elem W / A / G |",
             "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        tps = "-" if math.isnan(r["tokens_per_s"]) else f"{r['tokens_per_s']:,.0f}"
        noise = {None: "-", True: "yes", False: "no"}[r["beyond_noise"]]
        seeds = str(r["n"]) + (f" ({len(r['failed'])} failed)" if r.get("failed") else "")
        lines.append(
            f"| {r['recipe']} | {r['W']} | {r['A']} | {r['G']} | {r['backward']} | {r['states']} | "
            f"{r['steps'] or '-'} | {seeds} | {f(r['train_loss'])} | {f(r['val_loss'])} | "
            f"{f(r['val_std'])} | {f(r['delta_val'], sign=True)} | {_se(r['delta_se'])} | {noise} | "
            f"{f(r['val_ppl'], 2)} | {tps} | {f(r['state_bpp'], 2)} | "
            f"{' / '.join(f(r['sqnr'][o], 1) for o, _ in OPERANDS)} | "
            f"{' / '.join(f(r['bits'][o], 3) for o, _ in OPERANDS)} |")
    lines += ["", "Means over seeds (`train.seed`); ± std: sample standard deviation of the final "
              "validation loss; Δ: mean difference to `baseline` paired by seed, ± its standard "
              "error; beyond noise: a two-sided paired t-test at 95% (|Δ| > t(n-1) s.e.), \"-\" "
              "with fewer than two common seeds."]
    sizes = sorted({r["ref_size"] for r in rows if "ref_size" in r})
    ref = ", ".join(f"{n}" + ("" if logged else " (assumed: no `model.hidden_size` logged)")
                    for n, logged in sizes)
    lines += ["", "SQNR W / A / G: per operand, the last SQNR measured (`sqnr_db/<layer>/<operand>`) "
              "averaged over the quantized layer types, then over seeds; bits/elem W / A / G: "
              "storage bits per element, scales included, of each operand's format for a square "
              f"operand of the model's hidden size (reduction dimension {ref or '-'}); \"-\": the "
              "operand is not quantized (16-bit)."]
    failed = [(r["recipe"], x) for r in rows for x in r.get("failed", [])]
    if failed:
        lines += ["", "Failed runs (left out of the means; a diverging recipe stops with an error):"]
        lines += [f"- {name} seed {x['seed']}: last validation loss {f(x['last_val'])}, last "
                  f"training loss {f(x['last_train'])}" for name, x in failed]
    if not any(r["recipe"] == "baseline" for r in rows):
        lines += ["", "No run tagged `baseline` in this experiment: differences are not shown."]
    return "\n".join(lines) + "\n"


MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", "-.", ":")


def styles(n: int) -> List[Dict]:
    """Line styles for ``n`` curves, pairwise distinct in (colour, marker, line style): colour
    cycles over 10, marker over 7, line style every 10 curves."""
    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors
    return [dict(color=colors[i % 10], marker=MARKERS[i % len(MARKERS)],
                 linestyle=LINESTYLES[(i // 10) % len(LINESTYLES)]) for i in range(n)]


def _curves(client, row: Dict):
    """Mean and std of the validation loss at each step over the row's runs."""
    by_step: Dict[int, List[float]] = {}
    for r in row["runs"]:
        for m in client.get_metric_history(r["run_id"], "val/loss"):
            by_step.setdefault(m.step, []).append(m.value)
    steps = sorted(by_step)
    mean = [_mean(by_step[s]) for s in steps]
    std = [(_std(by_step[s]) if len(by_step[s]) > 1 else 0.0) for s in steps]
    return steps, mean, std


def _y_range(curves: Dict[str, tuple]) -> Optional[Tuple[float, float]]:
    """Limits of the plot's y axis that keep the curves near the best one readable: curves that
    end more than 1 nat above the lowest final loss are drawn off scale (None: all fit)."""
    ends = {k: c[1][-1] for k, c in curves.items() if c[0] and not math.isnan(c[1][-1])}
    if not ends:
        return None
    best = min(ends.values())
    near = [k for k, e in ends.items() if e <= best + 1.0]
    if len(near) == len(ends):
        return None
    hi = max(m + s for k in near for m, s in zip(curves[k][1], curves[k][2]))
    lo = min(m - s for k in near for m, s in zip(curves[k][1], curves[k][2]))
    pad = 0.05 * (hi - lo + 0.1)
    return lo - pad, hi + pad


def plot(client, rows: List[Dict], path: Path, experiment: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    others = [r for r in rows if r["recipe"] != "baseline"]
    curves = {r["recipe"]: _curves(client, r) for r in rows}
    yr = _y_range(curves)
    for r, st in zip(rows, [dict(color="black", marker=".", linestyle="-")] + styles(len(others))
                     if rows and rows[0]["recipe"] == "baseline" else styles(len(rows))):
        steps, mean, std = curves[r["recipe"]]
        if not steps:
            continue
        lw = 2.2 if r["recipe"] == "baseline" else 1.3
        label = r["recipe"] + (f" (n={r['n']})" if r["n"] > 1 else "")
        off = yr is not None and max(mean) > yr[1]
        if off:
            label += " (off scale)"
        ax.plot(steps, mean, lw=lw, markersize=4, label=label, **st)
        if any(std) and not off:
            lo = [m - s for m, s in zip(mean, std)]
            hi = [m + s for m, s in zip(mean, std)]
            ax.fill_between(steps, lo, hi, color=st["color"], alpha=0.15, lw=0)
    if yr is not None:
        ax.set_ylim(*yr)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"validation loss: {experiment} (mean, band: ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(rows) > 8 else 1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(experiment: str, uri: str, out_dir: Path) -> Tuple[Path, Path, str]:
    from mlflow.tracking import MlflowClient

    from dsq.tracking import normalize_uri

    uri = normalize_uri(uri)
    client = MlflowClient(uri)
    rows = collect(client, experiment)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, png = out_dir / "report.md", out_dir / "val_curves.png"
    md.write_text(markdown(rows, experiment))
    plot(client, rows, png, experiment)
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    run = client.create_run(exp_id, run_name=f"report-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={REPORT_TAG: "report"})
    client.log_artifact(run.info.run_id, str(md))
    client.log_artifact(run.info.run_id, str(png))
    client.set_terminated(run.info.run_id)
    return md, png, run.info.run_id
