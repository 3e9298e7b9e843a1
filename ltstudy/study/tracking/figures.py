"""The figures every finished trial run carries: accuracy per class, head to tail, and the reliability
diagram of its last evaluation (matplotlib, Agg; no display needed); and the small figure that says why a
plot could not be drawn.

:func:`per_class_png` sorts classes by training count, draws the count on a log-scale twin axis and shades
the many/medium/few bands: the picture long-tail papers look at first. :func:`reliability_png` draws
accuracy against confidence in ``ltstudy.metrics``' 15 equal-width bins, the share of samples per bin below,
one panel per split (also best vs published in the report). The study's own figures (Optuna's
plots, best vs published) are :mod:`ltstudy.study.results.plots`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

_BANDS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain_style():
    """Matplotlib's default style: ``optuna.visualization.matplotlib`` switches the global style to ggplot."""
    return pyplot().style.context("default")


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def message_png(title: str, text: str) -> bytes:
    """A small figure that says why a plot could not be drawn (kept so every plot name has a file)."""
    plt = pyplot()
    with plain_style():
        fig, ax = plt.subplots(figsize=(6, 2.5))
        ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
        ax.set_axis_off()
        ax.set_title(title)
        return png_bytes(fig)


def buckets_of(counts: Sequence[int], many: int = 100, few: int = 20) -> list[str]:
    """many (n > ``many``) / medium / few (n < ``few``) for each class, as :mod:`ltstudy.metrics`."""
    return ["many" if n > many else "few" if n < few else "medium" for n in counts]


def per_class_png(class_counts: Sequence[int], series: dict[str, Sequence[float]], title: str,
                  many: int = 100, few: int = 20, class_names: Sequence[str] | None = None) -> bytes:
    """Accuracy (%) per class, classes sorted head to tail by training count; one line per series."""
    plt = pyplot()
    with plain_style():
        counts = [int(n) for n in class_counts]
        order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
        x = list(range(len(order)))
        fig, ax = plt.subplots(figsize=(min(16.0, max(7.0, 0.09 * len(order) + 5)), 4.2))
        ax2 = ax.twinx()
        ax2.bar(x, [counts[c] for c in order], color="0.75", width=0.8, label="training images")
        ax2.set_yscale("log")
        ax2.set_ylabel("training images (log scale)")
        ax.set_zorder(ax2.get_zorder() + 1)
        ax.patch.set_visible(False)
        groups = buckets_of([counts[c] for c in order], many, few)
        for bucket, colour in _BANDS.items():
            idx = [i for i, g in enumerate(groups) if g == bucket]
            if idx:
                ax.axvspan(min(idx) - 0.5, max(idx) + 0.5, color=colour, alpha=0.07, lw=0)
                ax.text((min(idx) + max(idx)) / 2, 101, f"{bucket} ({len(idx)})", ha="center", va="bottom",
                        color=colour, fontsize=9, clip_on=False)
        marker = "o" if len(order) <= 40 else None
        for label, values in series.items():
            ys = [100 * v if v is not None and not math.isnan(v) else math.nan for v in values]
            ax.plot(x, [ys[c] for c in order], marker=marker, ms=4, lw=1.4, label=label)
        ax.set_ylim(0, 108)
        ax.set_xlim(-0.5, len(order) - 0.5)
        ax.set_ylabel("accuracy (%)")
        ax.set_xlabel("class, head → tail (sorted by training images)")
        if class_names is not None and len(order) <= 20:
            ax.set_xticks(x, [str(class_names[c]) for c in order], rotation=45, ha="right", fontsize=8)
        elif len(order) <= 20:
            ax.set_xticks(x, [str(c) for c in order])
        below = -0.3 if len(order) <= 20 else -0.15  # under the (rotated) class names
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, below), ncol=min(len(series), 3), fontsize=8,
                  frameon=False)
        ax.set_title(title, fontsize=10, pad=16)
        return png_bytes(fig)


def reliability_png(series: dict[str, dict[str, list]], title: str) -> bytes:
    """Reliability diagrams side by side: ``series`` maps a label (``val``, ``test``, ``best, test``) to the
    bins of ``ltstudy.metrics.reliability_bins`` (``count``, ``confidence``, ``accuracy``; None when empty)."""
    plt = pyplot()
    with plain_style():
        n = max(len(series), 1)
        fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 4.6), squeeze=False,
                                 gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08})
        for col, (label, bins) in enumerate(series.items()):
            top, bottom = axes[0][col], axes[1][col]
            k = len(bins["count"])
            width = 1.0 / k
            mids = [(i + 0.5) * width for i in range(k)]
            total = sum(bins["count"]) or 1
            acc = [a if a is not None else 0.0 for a in bins["accuracy"]]
            conf = [c if c is not None else 0.0 for c in bins["confidence"]]
            ece = sum(c / total * abs(a - p) for c, a, p in zip(bins["count"], acc, conf, strict=True) if c)
            top.bar(mids, acc, width=width * 0.95, color="tab:blue", alpha=0.8, label="accuracy")
            gaps = [p - a if c else 0.0 for c, a, p in zip(bins["count"], acc, conf, strict=True)]
            top.bar(mids, gaps, bottom=acc, width=width * 0.95, color="tab:red", alpha=0.25,
                    label="gap to confidence")
            top.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1)
            top.set_xlim(0, 1)
            top.set_ylim(0, 1)
            top.set_xticklabels([])
            top.set_ylabel("accuracy" if col == 0 else "")
            top.set_title(f"{label}: ECE {100 * ece:.2f}%", fontsize=10)
            if col == 0:
                top.legend(loc="upper left", fontsize=8, frameon=False)
            bottom.bar(mids, [c / total for c in bins["count"]], width=width * 0.95, color="0.5")
            bottom.set_xlim(0, 1)
            bottom.set_xlabel("confidence (top softmax probability)")
            bottom.set_ylabel("share" if col == 0 else "")
        fig.suptitle(title, fontsize=10)
        return png_bytes(fig)
