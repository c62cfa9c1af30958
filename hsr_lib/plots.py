"""Figures the notebooks show."""

from __future__ import annotations

import textwrap
from typing import Sequence

from .data import Sample, open_image


def image_grid(samples: Sequence[Sample], cols: int = 4, width: int = 38):
    """A grid of sample images, each titled with its (wrapped) instruction."""
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(samples) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, samples):
        ax.imshow(open_image(s.image, s.id))
        title = textwrap.shorten(s.question, 90, placeholder="…")
        ax.set_title("\n".join(textwrap.wrap(title, width)), fontsize=8)
    fig.tight_layout()
    return fig
