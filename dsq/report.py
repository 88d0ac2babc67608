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
    (``m8/fp32 v b256``, ``fp32 m/v8 b256``)."""
    if p.get("optim.name") != "qadamw":
        return "fp32"
    block = p.get("optim.block_size", "?")
    m, v = p.get("optim.m_bits"), p.get("optim.v_bits")
    m = "fp32 m" if m == "32" else f"m{m}"
    v = "fp32 v" if v == "32" else f"v{v}"
    if p.get("optim.v_signed") in ("True", "true"):
        v += " signed"
    return f"{m}/{v} b{block}"


def _last(m: Dict[str, float], *keys: str) -> float:
    for k in keys:
        if k in m:
            return m[k]
    return float("nan")


def collect(client, experiment: str) -> List[Dict]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ReportError(f"no experiment {experiment!r} at this tracking URI (experiments: "
                          f"{names}): check --experiment and --tracking-uri")
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=5000)
            if r.data.tags.get(REPORT_TAG) != "report"]
    if not runs:
        raise ReportError(f"experiment {experiment!r} has no training runs")
    rows = []
    for r in runs:
        p, m, t = r.data.params, r.data.metrics, r.data.tags
        grad = _fmt(p.get("quant.grad"))
        if grad != "-":
            grad += f" ({p.get('quant.grad_gemms', 'weight')})"
        rows.append({
            "run_id": r.info.run_id,
            "recipe": t.get("dsq.recipe") or r.info.run_name,
            "status": r.info.status,
            "start": r.info.start_time or 0,
            "W": _fmt(p.get("quant.weight")), "A": _fmt(p.get("quant.activation")), "G": grad,
            "states": _optim_states(p),
            "steps": int(float(p.get("train.steps", "nan"))) if p.get("train.steps") else None,
            "train_loss": _last(m, "summary/train_loss", "train/loss"),
            "val_loss": _last(m, "summary/val_loss", "val/loss"),
            "val_ppl": _last(m, "summary/val_ppl", "val/ppl"),
            "tokens_per_s": _last(m, "summary/tokens_per_s"),
            "state_bpp": _last(m, "summary/optimizer_state_bytes_per_param"),
        })
    # one row per recipe: the most recent finished run (else the most recent)
    best: Dict[str, Dict] = {}
    for row in sorted(rows, key=lambda r: (r["status"] == "FINISHED", r["start"])):
        best[row["recipe"]] = row
    out = sorted(best.values(), key=lambda r: (r["recipe"] != "baseline", r["recipe"]))
    base = best.get("baseline")
    for row in out:
        row["delta_val"] = row["val_loss"] - base["val_loss"] if base else float("nan")
    return out


def markdown(rows: List[Dict], experiment: str) -> str:
    def f(x, nd=4):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"

    lines = [f"# dsq report: experiment `{experiment}`", "",
             "| recipe | W | A | G | optimizer states | steps | train loss | val loss | val ppl "
             "| Δ val vs baseline | tokens/s | state B/param |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        delta = r["delta_val"]
        d = "-" if math.isnan(delta) else f"{delta:+.4f}"
        tps = "-" if math.isnan(r["tokens_per_s"]) else f"{r['tokens_per_s']:,.0f}"
        lines.append(f"| {r['recipe']} | {r['W']} | {r['A']} | {r['G']} | {r['states']} | "
                     f"{r['steps'] or '-'} | {f(r['train_loss'])} | {f(r['val_loss'])} | "
                     f"{f(r['val_ppl'], 2)} | {d} | {tps} | {f(r['state_bpp'], 2)} |")
    if not any(r["recipe"] == "baseline" for r in rows):
        lines += ["", "No run tagged `baseline` in this experiment: differences are not shown."]
    return "\n".join(lines) + "\n"


def plot(client, rows: List[Dict], path: Path, experiment: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for r in rows:
        hist = sorted((m.step, m.value) for m in client.get_metric_history(r["run_id"], "val/loss"))
        if hist:
            style = dict(lw=2.2, color="black") if r["recipe"] == "baseline" else dict(lw=1.3)
            ax.plot(*zip(*hist), marker=".", label=r["recipe"], **style)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"validation loss: {experiment}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
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
