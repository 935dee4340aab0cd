"""A heatmap PNG of a patching sweep: layers down, token positions across (matplotlib, Agg).

Rendered with matplotlib's object API (``Figure`` + ``FigureCanvasAgg``), never ``pyplot``:
no global figure state, so it can run on any thread (it is numpy work, no torch).
"""

from __future__ import annotations

import io

import numpy as np


def heatmap_png(
    scores: list[list[float | None]], layers: list[int], tokens: list[str], title: str, label: str
) -> bytes:
    """``scores``: ``[layers][positions]`` (None: not measured); ``layers`` and ``tokens``: the
    row and column labels.
    A diverging colour map centred on 0, one cell per layer x position."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = np.array([[np.nan if v is None else v for v in row] for row in scores], dtype=float)
    extent = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0
    rows, positions = data.shape
    figure = Figure(figsize=(min(2 + 0.45 * positions, 30), min(1.5 + 0.3 * rows, 30)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(data, cmap="RdBu", vmin=-extent or -1, vmax=extent or 1, aspect="auto")
    axes.set_xticks(range(positions), [repr(t)[1:-1][:12] for t in tokens], rotation=90, fontsize=7)
    axes.set_yticks(range(rows), [str(layer) for layer in layers], fontsize=7)
    axes.set_ylabel("layer")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label=label)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()
