"""A sweep's results, collected from each member's workdir: results.json, results.csv,
results.md (deltas against the baseline member, as the paper reports its ablations), and two
plots: held-out loss vs. step per member, and final held-out loss vs. parameter count.

Per member: status, parameter count (of its ModelConfig), final and best held-out loss per
denoiser and overall (`eval/<denoiser>/loss`, `eval/loss` in metrics.jsonl), final train loss,
median tokens/s and MFU over the logged steps, wall time (summed over attempts).
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from typing import Any, Mapping, Sequence

from t5g2.sweep.runner import FINISHED, PENDING, member_status, read_status
from t5g2.sweep.spec import Sweep, member_workdir

EVAL_LOSS = "eval/loss"
STARTED = "started"  # metrics but no status file: a cluster job still running or stopped
FILES = ("results.json", "results.csv", "results.md", "heldout_loss.png", "loss_vs_params.png")


def read_metrics(workdir: str) -> dict[int, dict[str, float]]:
    """step -> the metrics logged at that step (lines of one step merged; unreadable lines,
    such as one cut short by a kill, skipped)."""
    path = os.path.join(workdir, "metrics.jsonl")
    steps: dict[int, dict[str, float]] = {}
    if not os.path.exists(path):
        return steps
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                step = int(record.pop("step"))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            steps.setdefault(step, {}).update(record)
    return dict(sorted(steps.items()))


def eval_keys(metrics: Mapping[int, Mapping[str, float]]) -> list[str]:
    """`eval/<denoiser>/loss` keys in the order first logged, then `eval/loss`."""
    keys = dict.fromkeys(k for values in metrics.values() for k in values
                         if k.startswith("eval/") and k.endswith("/loss") and k != EVAL_LOSS)
    return list(keys) + ([EVAL_LOSS] if any(EVAL_LOSS in v for v in metrics.values()) else [])


def curve(metrics: Mapping[int, Mapping[str, float]], key: str) -> list[tuple[int, float]]:
    return [(step, float(v[key])) for step, v in metrics.items() if key in v]


def _median(values: Sequence[float]) -> float | None:
    values = [v for v in values if math.isfinite(v)]
    return statistics.median(values) if values else None


def member_result(sweep: Sweep, sweep_workdir: str, member, params: int,
                  final_step: int | None = None) -> dict[str, Any]:
    """One member's record. A member run outside the local runner (a cluster job) has no
    sweep_status.json: it counts as finished once it logged `final_step`, else as started."""
    workdir = member_workdir(sweep_workdir, member)
    metrics = read_metrics(workdir)
    status = read_status(workdir) or {}
    state = member_status(sweep, sweep_workdir, member)
    if state == PENDING and metrics:
        state = FINISHED if max(metrics) == final_step else STARTED
    result: dict[str, Any] = dict(
        name=member.name, status=state,
        overrides=" ".join(f"{k}={v!r}" for k, v in member.overrides),
        params=params, last_step=max(metrics, default=None),
        wall_time_s=status.get("wall_time_s"))
    train = curve(metrics, "loss")
    result["train_loss"] = train[-1][1] if train else None
    for key in eval_keys(metrics):
        points = [v for _, v in curve(metrics, key)]
        result[f"final {key}"] = points[-1]
        finite = [v for v in points if math.isfinite(v)]
        result[f"best {key}"] = min(finite) if finite else None
    for key in ("tokens_per_s", "mfu"):
        result[f"median {key}"] = _median([v for _, v in curve(metrics, key)])
    return result


def collect(sweep: Sweep, sweep_workdir: str, params: Mapping[str, int],
            steps: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """One record per member, in the sweep's order; `params`: member name -> parameter count,
    `steps`: member name -> final step."""
    return [member_result(sweep, sweep_workdir, m, params[m.name], (steps or {}).get(m.name))
            for m in sweep.members]


def _columns(records: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in records for k in r))


def _format(key: str) -> tuple[str, int]:
    """(format spec, scale) of a column's numbers: counts with separators, MFU in percent
    (its deltas in points), rates and seconds whole, losses to 4 places."""
    if key == "params":
        return ",", 1
    if "mfu" in key:
        return ".2f", 100
    if "tokens_per_s" in key or key == "wall_time_s":
        return ",.0f", 1
    return ".4f", 1


def _number(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if key == "last_step":
        return str(value)
    spec, scale = _format(key)
    return f"{scale * value:{spec}}" + ("%" if "mfu" in key else "")


def _delta(value: Any, base: Any, key: str) -> str:
    if value is None or base is None or isinstance(value, str):
        return ""
    spec, scale = _format(key)
    return f" ({scale * (value - base):+{spec}})"


_LABELS = {"params": "params", "train_loss": "train loss", "median tokens_per_s": "tokens/s",
           "median mfu": "MFU", "wall_time_s": "wall s", "last_step": "step"}


def markdown(sweep: Sweep, records: Sequence[Mapping[str, Any]]) -> str:
    """A table with each number's delta against the baseline member: `4.5210 (+0.0310)`."""
    base = next(r for r in records if r["name"] == sweep.baseline)
    columns = _columns(records)
    # per denoiser only the final loss (the best ones are in results.json/.csv)
    losses = [f"final {EVAL_LOSS}", f"best {EVAL_LOSS}"] + [
        k for k in columns if k.startswith("final eval/") and k != f"final {EVAL_LOSS}"]
    numeric = [k for k in ["params", "train_loss", *losses, "median tokens_per_s", "median mfu",
                           "wall_time_s"] if k in columns]
    header = ["member", "status", "step"] + [_LABELS.get(k, k.removeprefix("final "))
                                             for k in numeric]
    rows = []
    for r in records:
        cells = [f"**{r['name']}** (baseline)" if r is base else r["name"], r["status"],
                 _number(r.get("last_step"), "last_step")]
        for k in numeric:
            delta = "" if r is base else _delta(r.get(k), base.get(k), k)
            cells.append(_number(r.get(k), k) + delta)
        rows.append(cells)
    lines = [f"# Sweep {sweep.name}",
             "",
             f"Base config `{sweep.config}`; common overrides: "
             f"{', '.join(f'`{k}={v!r}`' for k, v in sweep.common) or 'none'}. Deltas in "
             f"parentheses are against the baseline member `{sweep.baseline}` (MFU in points). "
             "Held-out losses at the last logged step (`best`: the lowest logged); "
             "tokens/s and MFU: medians over the logged steps; wall time over all attempts.",
             "",
             "| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * len(numeric)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    lines += ["", "Overrides:", ""]
    lines += [f"- `{r['name']}`: {r['overrides'] or '(base config)'}" for r in records]
    return "\n".join(lines) + "\n"


def plot(sweep: Sweep, sweep_workdir: str, records: Sequence[Mapping[str, Any]]) -> list[str]:
    """heldout_loss.png and loss_vs_params.png in the sweep workdir; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for r in records:
        points = curve(read_metrics(member_workdir(sweep_workdir, sweep.member(r["name"]))),
                       EVAL_LOSS)
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", label=r["name"],
                    linewidth=2.5 if r["name"] == sweep.baseline else 1.5)
    ax.set_title(f"Sweep {sweep.name}: held-out loss (all denoisers) per member")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out loss (eval/loss)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(title="member", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no held-out loss logged yet (eval.every)", ha="center",
                transform=ax.transAxes)
    paths.append(_save(fig, os.path.join(sweep_workdir, "heldout_loss.png")))

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    points = [(r["params"], r[f"final {EVAL_LOSS}"], r["name"]) for r in records
              if r.get(f"final {EVAL_LOSS}") is not None]
    for n, loss, name in points:
        ax.scatter([n], [loss], s=40, zorder=3,
                   marker="*" if name == sweep.baseline else "o")
        ax.annotate(name, (n, loss), textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.set_title(f"Sweep {sweep.name}: final held-out loss vs. parameter count")
    ax.set_xlabel("parameters")
    ax.set_ylabel("final held-out loss (eval/loss)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(6))
    ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))  # 925k, 1.05M
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.25)
    if not points:
        ax.text(0.5, 0.5, "no finished held-out loss yet", ha="center", transform=ax.transAxes)
    paths.append(_save(fig, os.path.join(sweep_workdir, "loss_vs_params.png")))
    return paths


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write(sweep: Sweep, sweep_workdir: str, params: Mapping[str, int],
          steps: Mapping[str, int] | None = None) -> list[str]:
    """Collects and writes every results file (see the module docstring); their paths."""
    os.makedirs(sweep_workdir, exist_ok=True)
    records = collect(sweep, sweep_workdir, params, steps)
    paths = [os.path.join(sweep_workdir, name) for name in FILES[:3]]
    _atomic(paths[0], json.dumps(dict(sweep=sweep.name, config=sweep.config,
                                      baseline=sweep.baseline,
                                      common={k: v for k, v in sweep.common},
                                      members=records), indent=1) + "\n")
    with open(paths[1] + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(records))
        writer.writeheader()
        writer.writerows(records)
    os.replace(paths[1] + ".tmp", paths[1])
    _atomic(paths[2], markdown(sweep, records))
    return paths + plot(sweep, sweep_workdir, records)


def _atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
