"""The figure every finished trial run carries: accuracy per class, head to tail (matplotlib, Agg; no
display needed), and the small figure that says why a plot could not be drawn.

:func:`per_class_png` sorts classes by training count, draws the count on a log-scale twin axis and shades
the many/medium/few bands: the picture long-tail papers look at first. The study's own figures (Optuna's
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
