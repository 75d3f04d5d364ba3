"""Draws `axes.png`: which values each normalization averages over.

    python docs/study/axes.py

A batch of convolutional features has the axes N (samples), C (channels)
and H, W (positions). Each panel draws a batch of 4 samples and 8
channels as a grid, one cell for the H×W values of one channel of one
sample, and colours the cells by the set whose values share one mean and
one variance.
"""

import pathlib

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

SAMPLES, CHANNELS = 4, 8
GROUPS = 4
GHOST = 2
PANELS = (
    (
        "batch norm",
        "per channel, over N, H, W",
        lambda n, c: c,
    ),
    (
        f"ghost batch norm ({GHOST} samples)",
        "per channel and ghost batch,\nover its samples' H, W",
        lambda n, c: (n // GHOST) * CHANNELS + c,
    ),
    (
        "layer norm",
        "per sample, over C, H, W",
        lambda n, c: n,
    ),
    (
        f"group norm ({GROUPS} groups)",
        "per sample and group of channels,\nover the group's C, H, W",
        lambda n, c: n * GROUPS + c // (CHANNELS // GROUPS),
    ),
    (
        "instance norm",
        "per sample and channel, over H, W",
        lambda n, c: n * CHANNELS + c,
    ),
)


def draw(path):
    figure = Figure(figsize=(13, 3.2), layout="constrained")
    axes = figure.subplots(1, len(PANELS))
    colours = [
        "#4c72b0",
        "#dd8452",
        "#55a868",
        "#c44e52",
        "#8172b3",
        "#937860",
        "#da8bc3",
        "#8c8c8c",
        "#ccb974",
        "#64b5cd",
    ]
    for ax, (name, rule, group) in zip(axes, PANELS, strict=True):
        sets = {}
        for n in range(SAMPLES):
            for c in range(CHANNELS):
                key = group(n, c)
                index = sets.setdefault(key, len(sets))
                # Sample 0 at the top.
                y = SAMPLES - 1 - n
                ax.add_patch(
                    Rectangle(
                        (c, y),
                        1,
                        1,
                        facecolor=colours[index % len(colours)],
                        alpha=0.85 if index == 0 else 0.35,
                        edgecolor="white",
                        linewidth=1.5,
                    )
                )
                # The H×W values of the cell, as a small grid of dots.
                dots = np.linspace(0.25, 0.75, 3)
                xs, ys = np.meshgrid(c + dots, y + dots)
                ax.scatter(xs, ys, s=1.5, color="black", alpha=0.5)
        ax.set_xlim(0, CHANNELS)
        ax.set_ylim(0, SAMPLES)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("C (channels) →")
        ax.set_ylabel("← N (samples)")
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(
            f"{name}\n{rule}\n({len(sets)} means and variances)",
            fontsize="small",
        )
    figure.suptitle(
        "One colour: the values that share one mean and one variance "
        "(dots: the H×W positions of one channel of one sample; the "
        "strong colour is one such set)",
        fontsize="small",
    )
    figure.savefig(path, dpi=90)
    print(f"wrote {path}")


if __name__ == "__main__":
    draw(pathlib.Path(__file__).with_name("axes.png"))
