"""Draw the ISSTAD architecture diagram: ``python docs/make_architecture_figure.py``.

Writes ``docs/images/isstad_architecture.png``. The layer counts are read from the model's variant table so the
picture follows the code.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from isstad_plugin.models.isstad.torch_model import VIT_VARIANTS  # noqa: E402

OUT = Path(__file__).resolve().parent / "images" / "isstad_architecture.png"


def box(ax, x, y, w, h, text, colour):  # noqa: ANN001, ANN201
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=colour, ec="black", lw=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=7.8)


def arrow(ax, start, end, style="-|>", colour="black"):  # noqa: ANN001, ANN201
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=colour, lw=1.2))


def main() -> None:
    large = VIT_VARIANTS["vit_large"]
    fig, ax = plt.subplots(figsize=(12, 5.2))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 5.2)
    ax.axis("off")
    enc, dec, head, data = "#cfe2f3", "#d9ead3", "#fce5cd", "#eeeeee"

    box(ax, 0.1, 3.6, 1.6, 0.9, "normal image\n[B,3,H,W] in [0,1]", data)
    box(ax, 0.1, 1.6, 1.6, 1.2, "stage 2 only:\nsynthetic corruption\n(shapes x transforms)\n-> image + label", data)
    box(ax, 2.1, 2.7, 1.4, 1.0, "normalise\n(ImageNet)", data)
    box(ax, 3.8, 2.5, 2.0, 1.4,
        f"ViT encoder\npatch 16, cls token,\nsin-cos pos. emb.\n{large.depth} blocks x {large.embed_dim} (ViT-L)\n"
        "stage 1: 25 % of tokens\nstage 2: frozen, all tokens", enc)
    box(ax, 6.1, 2.5, 1.9, 1.4, "decoder\nlinear -> 512, mask tokens,\nsin-cos pos. emb.,\nD blocks (16 heads)", dec)
    box(ax, 8.4, 3.7, 1.7, 0.9, "decoder_norm ->\ndecoder_pred\n(p*p*3 per token)", head)
    box(ax, 8.4, 1.5, 1.7, 1.2, "mask_pred after\nEVERY block\n(p*p*2 per token)\n-> D logit maps", head)
    box(ax, 10.4, 3.7, 1.5, 0.9, "reconstruction\n[B,3,H,W]", data)
    box(ax, 10.4, 1.5, 1.5, 1.2, "p = mean_D\nsoftmax[anomalous]\n[B,H,W]", data)
    box(ax, 6.3, 0.1, 5.6, 0.9,
        "score: r = mean_c (recon - input)^2;  map = G4(p * minmax(r));  image score = mean G4(G4(p) * G4(r))", head)

    arrow(ax, (1.7, 4.05), (2.1, 3.4))
    arrow(ax, (1.7, 2.2), (2.1, 2.95))
    arrow(ax, (3.5, 3.2), (3.8, 3.2))
    arrow(ax, (5.8, 3.2), (6.1, 3.2))
    arrow(ax, (8.0, 3.5), (8.4, 4.1))
    arrow(ax, (8.0, 2.9), (8.4, 2.2))
    arrow(ax, (10.1, 4.15), (10.4, 4.15))
    arrow(ax, (10.1, 2.1), (10.4, 2.1))
    arrow(ax, (11.15, 3.7), (11.15, 2.7), colour="grey")
    arrow(ax, (11.15, 1.5), (11.15, 1.0), colour="grey")
    ax.text(0.1, 5.0, "ISSTAD: stage 1 = MAE on normal images (masked-patch MSE); stage 2 = frozen encoder, "
            "decoder + heads trained with weighted CE (every block) + 0.5 MSE + 0.1 (1 - SSIM)",
            fontsize=9.5, weight="bold")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110, bbox_inches="tight")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
