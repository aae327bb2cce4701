"""Pictures: the robust-accuracy-vs-eps curve (``advcl eval --plot``), the adversarial grid
(``advcl attack --grid``) and the benchmark's bar chart. matplotlib is an optional extra, imported only here and only when a
picture is asked for; without it the commands say how to install it."""

from __future__ import annotations

import io
from pathlib import Path

from .benchmark.leaderboard import COLUMNS, group_cells
from .benchmark.reported import load_reported
from .checkpoint import atomic_write
from .errors import UsageError

INSTALL_HINT = "install the plot extra: pip install 'advcl[plot]'"


def require_matplotlib():
    """The pyplot module on the non-interactive Agg backend, or a UsageError."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("drawing a picture needs matplotlib", INSTALL_HINT) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """The figure as a PNG at ``path``: drawn in memory, then written atomically (a failed write
    is an OSError that ``atomic_write`` turns into an error naming ``path``)."""
    plt = require_matplotlib()
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return atomic_write(path, buf.getvalue())


def robustness_curve(results: dict, path: str | Path, title: str = "") -> Path:
    """Robust accuracy (%) against eps (in /255 under L-inf, as is under L2), one line per model and
    attack, starting at the clean accuracy (eps 0).

    ``results`` maps a label (a model's name) to what ``engine.evaluate.evaluate`` returns."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    l2 = any(row.get("norm") == "l2" for result in results.values() for row in result["robust"])
    for label, result in results.items():
        by_attack: dict[str, list[tuple[float, float]]] = {}
        for row in result["robust"]:
            by_attack.setdefault(row["attack"], []).append((row["eps"] * (1 if l2 else 255), 100 * row["robust_acc"]))
        for attack, points in by_attack.items():
            points = [(0.0, 100 * result["clean_acc"])] + sorted(points)
            name = attack if len(results) == 1 else f"{label} {attack}"
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xlabel(("eps (L2)" if l2 else "eps (x/255, L-inf)") + "; 0 = clean accuracy")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "robust accuracy", fontsize=9)
    return save_figure(fig, path)


def adversarial_grid(clean, adv, labels, clean_pred, adv_pred, classes: list[str], eps: float,
                     path: str | Path, title: str = "", columns: int = 8) -> Path:
    """Rows: clean images, adversarial images, perturbation amplified to fill [0, 1]; each
    column is titled with the true label and the clean / adversarial prediction."""
    plt = require_matplotlib()
    k = min(columns, clean.shape[0])
    fig, axes = plt.subplots(3, k, figsize=(1.3 * k + 0.8, 4.4), squeeze=False)
    delta = (adv - clean) / (2 * eps) + 0.5  # -eps..eps -> 0..1
    rows = [("clean", clean), ("adversarial", adv), ("perturbation\n(amplified)", delta)]

    def name(i: int) -> str:
        return classes[i] if 0 <= i < len(classes) else str(i)

    for r, (row_name, images) in enumerate(rows):
        for c in range(k):
            ax = axes[r][c]
            ax.imshow(images[c].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"true {name(int(labels[c]))}\npred {name(int(clean_pred[c]))}", fontsize=7)
            elif r == 1:
                wrong = int(adv_pred[c]) != int(labels[c])
                ax.set_title(f"pred {name(int(adv_pred[c]))}", fontsize=7, color="red" if wrong else "black")
            if c == 0:
                ax.set_ylabel(row_name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def benchmark_chart(records: list[dict], path: str | Path, reported=None, title: str = "") -> Path:
    """RA, CA and SA (%) per finetuning scheme, one bar per encoder, from the benchmark's result
    records (``benchmark.leaderboard``); a black line over a bar marks the number published for
    the encoder's method and dataset, when there is one."""
    plt = require_matplotlib()
    reported = reported if reported is not None else load_reported()
    schemes, encoders = group_cells(records)
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4.2 * len(COLUMNS), 3.8), squeeze=False)
    width = 0.8 / max(len(encoders), 1)
    for ax, (name, key) in zip(axes[0], COLUMNS):
        for i, by_scheme in enumerate(encoders):
            first = next(iter(by_scheme.values()))
            published = reported.row_for(first.method, first.dataset)
            label = f"{first.encoder} ({first.dataset})"
            for j, s in enumerate(schemes):
                x = j - 0.4 + width * (i + 0.5)
                value = getattr(by_scheme[s], key) if s in by_scheme else None
                if value is not None:
                    ax.bar(x, 100 * value, width, color=f"C{i}", label=label)
                    label = None  # once per encoder
                ref = getattr(getattr(published, s, None), key, None) if published is not None else None
                if ref is not None:
                    ax.hlines(ref, x - width / 2, x + width / 2, colors="black", linewidth=2)
        ax.set_xticks(range(len(schemes)), [s.upper() for s in schemes])
        ax.set_ylim(0, 100)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%); black line = reported")
    handles, labels = axes[0][0].get_legend_handles_labels()  # below the panels: it covers no bar or label
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 3) or 1,
               fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
