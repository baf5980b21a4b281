"""curve.png: mean test AUC and AUPRC against training-set size (with the fitted power law, dashed),
and the paired AUC difference. Probes are told apart by marker (linear o, GBM s); dashed is a fit."""

from __future__ import annotations

from pathlib import Path

STYLES = {"linear": "-", "gbm": "-"}  # line style per probe kind (dashed is the fit); other kinds (fine-tuning): dash-dot
BAND = "band: 95% CI of the mean over draws\n(test patients and draws resampled)"
MARKERS = {"linear": "o", "gbm": "s"}


def _ticks(values: list[int], min_ratio: float = 1.12) -> list[int]:
    """Tick positions that do not collide on a log axis: of two close sizes the larger is kept."""
    kept: list[int] = []
    for v in sorted(set(values)):
        if kept and v / kept[-1] < min_ratio:
            kept[-1] = v
        else:
            kept.append(v)
    return kept


def _axis(ax, xs: list[int], full: int | None, ylabel: str) -> None:
    ticks = _ticks(xs)
    ax.set_xscale("log")
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t}\n(full)" if t == full else str(t) for t in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("labelled training images (log scale)", fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(True, alpha=0.3)


def _metric_panel(ax, summary: list[dict], metric: str, colours: dict, baseline: str | None) -> None:
    for (model, kind) in dict.fromkeys((r["model"], r["probe"]) for r in summary):
        rows = sorted((r for r in summary if r["model"] == model and r["probe"] == kind), key=lambda r: r["n_train"])
        x = [r["n_train"] for r in rows]
        style = ":" if model == baseline else STYLES.get(kind, "-.")
        label = model if model == baseline else f"{model} / {kind}"
        ax.plot(x, [r[f"{metric}_mean"] for r in rows], style, marker=MARKERS.get(kind, "o"), ms=3,
                lw=1.0 if kind == "linear" else 0.7, color=colours[model], label=label)
        ax.fill_between(x, [r[f"{metric}_ci_low"] for r in rows], [r[f"{metric}_ci_high"] for r in rows],
                        color=colours[model], alpha=0.12 if kind == "linear" else 0.07, linewidth=0)


def _fit_lines(ax, fitted: dict, colours: dict) -> None:
    """The fitted power laws over the measured sizes, dashed, with one legend entry for all."""
    for (model, _kind), (x, y) in fitted.items():
        ax.plot(x, y, "--", lw=0.9, alpha=0.8, color=colours[model])
    if fitted:
        ax.plot([], [], "--", lw=0.9, color="0.3", label="dashed: fit a - b n^(-c) (fit.csv)")


def _difference_panel(ax, comparisons: list[dict]) -> None:
    for (kind, other, kind_b) in dict.fromkeys((c["probe"], c["model_b"], c["probe_b"]) for c in comparisons):
        rows = sorted((c for c in comparisons if (c["probe"], c["model_b"], c["probe_b"]) == (kind, other, kind_b)),
                      key=lambda c: c["n_train"])
        x = [c["n_train"] for c in rows]
        b = other if kind_b == kind else f"{other} ({kind_b})"
        line, = ax.plot(x, [c["difference"] for c in rows], "-" if kind_b == kind else "-.",
                        marker=MARKERS.get(kind, "o"), ms=3, label=f"{kind}: {rows[0]['model_a']} - {b}")
        ax.fill_between(x, [c["diff_ci_low"] for c in rows], [c["diff_ci_high"] for c in rows],
                        color=line.get_color(), alpha=0.12, linewidth=0)
        for c in rows:
            if c["p_holm"] < 0.05 and c["diff_ci_low"] > 0:  # the tables' rule: the interval excludes 0 too
                ax.annotate("*", (c["n_train"], c["diff_ci_high"]), ha="center", fontsize=10, color=line.get_color())
    ax.axhline(0, color="black", lw=0.8)


def plot_curve(summary: list[dict], comparisons: list[dict], path: Path, title: str, baseline: str | None = None,
               prevalence: float | None = None, fitted: dict | None = None) -> None:
    """Three panels: AUC and AUPRC (mean over draws, with their band; on AUC the fitted curves
    `fitted`: (model, probe) -> (sizes, AUCs), dashed), and the paired AUC difference."""
    from cxr_embed.optional import require

    matplotlib = require("matplotlib", "the curve's plot")  # not in a slim install
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if comparisons else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.8), dpi=110)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    models = list(dict.fromkeys(r["model"] for r in summary))
    colours = {m: ("0.45" if m == baseline else cycle[i % len(cycle)]) for i, m in enumerate(models)}
    xs = [r["n_train"] for r in summary]
    full = max((r["n_train"] for r in summary if r["size"] == "full"), default=None)
    for ax, metric, name in ((axes[0], "auc", "test AUC"), (axes[1], "auprc", "test AUPRC (average precision)")):
        _metric_panel(ax, summary, metric, colours, baseline)
        _axis(ax, xs, full, f"{name}, mean over draws\n{BAND}")
    _fit_lines(axes[0], fitted or {}, colours)
    axes[0].axhline(0.5, color="0.6", lw=0.6)
    if prevalence is not None:
        axes[1].axhline(prevalence, color="0.6", lw=0.6)
    axes[0].legend(fontsize=7, loc="lower right")
    if comparisons:
        _difference_panel(axes[2], comparisons)
        _axis(axes[2], xs, full, "paired difference in mean test AUC\n" + BAND)
        axes[2].set_title("* Holm-adjusted one-sided p < 0.05", fontsize=8)
        axes[2].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
