"""Plots written next to the JSON: speedup bars per model row, and the Figure-2-like map (predicted vs measured)."""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def model_speedups(model: dict, path: Path) -> Path | None:
    """Grouped bars: per model row, the speedup of optimize and runlora over peft eager and peft inductor."""
    rows = model.get("rows", [])
    if not rows:
        return None
    plt = _plt()
    series = [("peft_eager/runlora", "runlora vs peft eager"), ("peft_inductor/runlora", "runlora vs peft inductor"),
              ("peft_eager/optimize", "optimize vs peft eager"), ("peft_inductor/optimize", "optimize vs peft inductor"),
              ("peft_eager/optimize_fast", "optimize (fast masks) vs peft eager"),
              ("peft_eager/peft_inductor", "peft inductor vs peft eager")]
    series = [(k, lbl) for k, lbl in series if any(k in r["speedups"] for r in rows)]
    short = {"float32": "fp32", "bfloat16": "bf16"}
    labels = [f"{r['row']['model']} r{r['row']['rank']}\np={r['row']['dropout']:g} {short.get(r['row']['dtype'], r['row']['dtype'])}"
              for r in rows]
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 2), 4.5))
    for j, (key, lbl) in enumerate(series):
        xs = [k + (j - (len(series) - 1) / 2) * width for k in range(len(rows))]
        vals = [r["speedups"].get(key, {}).get("median", 0) for r in rows]
        ax.bar(xs, vals, width, label=lbl)
    lowest = min(r["speedups"].get(k, {}).get("median", 1.0) for r in rows for k, _ in series)
    ax.set_ylim(min(0.8, 0.95 * lowest), 1.25)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.15, color="tab:red", lw=0.8, ls="--", label="target 1.15x vs eager")
    ax.axhline(1.05, color="tab:purple", lw=0.8, ls=":", label="target 1.05x vs inductor")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("training-step speedup (median of per-round ratios)")
    ax.set_title("LoRA LLaMA training step, speedup over peft")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def planner_map(sweep: dict, path: Path) -> Path | None:
    """Two panels over (N, r): the family the cost model predicts fastest, and the one measured fastest."""
    cells = sweep.get("cells", [])
    if not cells:
        return None
    plt = _plt()
    ns = sorted({c["n"] for c in cells})
    ranks = sorted({c["rank"] for c in cells})
    fams = sorted({c[k] for c in cells for k in ("predicted_winner", "measured_winner")})
    color = {f: k for k, f in enumerate(fams)}
    cfg = sweep["config"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    cmap = plt.get_cmap("tab10")
    for ax, key, title in ((axes[0], "predicted_winner", "predicted (cost model)"),
                           (axes[1], "measured_winner", "measured (fastest family)")):
        for c in cells:
            x, y = ns.index(c["n"]), ranks.index(c["rank"])
            ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, color=cmap(color[c[key]] % 10), alpha=0.75))
            txt = c[key].replace("/", "\n", 1)
            if key == "predicted_winner":
                txt += f"\n{c['predicted_winner_measured_over_best']:.2f}x"
            ax.text(x, y, txt, ha="center", va="center", fontsize=6.5)
        ax.set_xlim(-0.5, len(ns) - 0.5)
        ax.set_ylim(-0.5, len(ranks) - 0.5)
        ax.set_xticks(range(len(ns)), [str(n) for n in ns])
        ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
        ax.set_xlabel("N (tokens)")
        ax.set_title(title)
    axes[0].set_ylabel("rank r")
    fig.suptitle(f"Fastest program family over (N, r) for i x o = {cfg['i']} x {cfg['o']}, {cfg['dtype']}, "
                 f"dropout {cfg['dropout']:g} (left: predicted, with its measured time / best measured)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def layer_ratios(layer: dict, path: Path) -> Path | None:
    """runlora_fx / peft and runlora_fx / oracle per layer row (a quick visual of the layer table)."""
    rows = layer.get("rows", [])
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(rows) + 2), 4))
    xs = range(len(rows))
    ax.plot(xs, [r["ratios"]["runlora_fx/peft"]["median"] for r in rows], "o", ms=3, label="runlora_fx / peft")
    ax.plot(xs, [r["ratios"]["runlora_fx/oracle"]["median"] for r in rows], "x", ms=3, label="runlora_fx / oracle")
    ax.plot(xs, [r["ratios"]["paper/peft"]["median"] for r in rows], ".", ms=3, label="paper rule / peft")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs), [r["name"] for r in rows], rotation=90, fontsize=4)
    ax.set_ylabel("time ratio (median of per-round ratios)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
