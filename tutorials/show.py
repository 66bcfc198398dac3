"""Pictures for the tutorial notebooks: images, trajectories and saved figures, shown in the notebook.

Only drawing lives here; what is computed (samples, log-probs, losses, rewards) comes from the scripts and
common.py, which the notebooks call. Figures are rendered to PNG here and handed to IPython's display, so they
appear whatever matplotlib backend is active (bookkeeping's plots switch it to Agg, which turns off the
notebook's own figure display).
"""
import io
import math
import textwrap

import matplotlib.pyplot as plt


def _display(figure):
    from IPython.display import Image, display
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    display(Image(data=buffer.getvalue()))


def images(batch, titles=None, columns=8, size=1.3, title=None):
    """Show images (B, 3, H, W) in [0, 1] in a grid of `columns`, each with its title above, wrapped to the
    image's width (so that neighbouring titles never run together)."""
    n = len(batch)
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(size * columns, (1.0 * size + 0.35) * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, batch, titles or [""] * n):
        ax.imshow(image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(caption, max(8, int(13 * size)))), fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    _display(figure)


def figure(fig):
    """Show a matplotlib figure made elsewhere (bookkeeping.plot_curves, a plot of the notebook's own)."""
    _display(fig)


def png(path, width=None):
    """Show a PNG the scripts or benchmarks wrote (image grids, curves)."""
    from IPython.display import Image, display
    display(Image(filename=path, width=width))
