"""The per-stage report: what survived, and a PNG of the surviving layers and heads."""

from __future__ import annotations

from pathlib import Path

from cpmctl.io import atomic_path
from cpmctl.model.config import CPMAntConfig
from cpmctl.prune.gates import Selection


def kept_summary(source: CPMAntConfig, selection: Selection) -> dict:
    kept = selection.kept_layers()
    channels = {
        str(i): int(selection.channel_keep[i].sum()) for i in range(source.num_layers) if selection.ffn_keep[i]
    }
    return {
        "attention_layers": kept["attention"],
        "ffn_layers": kept["ffn"],
        "attention_layers_dropped": [i for i in range(source.num_layers)
                                     if source.has_attention(i) and not selection.attention_keep[i]],
        "ffn_layers_dropped": [i for i in range(source.num_layers) if source.has_ffn(i) and not selection.ffn_keep[i]],
        "heads": [int(h) for h in selection.head_keep.nonzero().flatten()],
        "channels_per_layer": channels,
    }


def plot_survivors(source: CPMAntConfig, selection: Selection, path: str | Path, title: str) -> Path:
    """Two panels over the layers: sub-blocks (attention, FFN) and heads. Green = kept, red = dropped by this stage,
    grey = already absent in the source. The head mask is shared, so a head column is kept in every layer that
    still has attention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    colors = ListedColormap(["#d9d9d9", "#d62728", "#2ca02c"])  # absent, dropped, kept
    n, h = source.num_layers, source.num_heads

    def state(present: bool, kept: bool) -> int:
        return 0 if not present else (2 if kept else 1)

    blocks = [[state(source.has_attention(i), bool(selection.attention_keep[i])),
               state(source.has_ffn(i), bool(selection.ffn_keep[i]))] for i in range(n)]
    heads = [[state(source.has_attention(i), bool(selection.attention_keep[i] and selection.head_keep[j]))
              for j in range(h)] for i in range(n)]
    channels = [int(selection.channel_keep[i].sum()) if selection.ffn_keep[i] else 0 for i in range(n)]

    fig, (ax_blocks, ax_heads) = plt.subplots(
        1, 2, figsize=(3 + 0.25 * h, 1.5 + 0.22 * n), gridspec_kw={"width_ratios": [2, max(h, 2)]})
    ax_blocks.imshow(blocks, cmap=colors, vmin=0, vmax=2, aspect="auto")
    ax_blocks.set_xticks([0, 1], ["attn", "ffn"])
    ax_blocks.set_ylabel("layer")
    ax_blocks.set_yticks(range(n), [f"{i} ({c} ch)" if c else str(i) for i, c in enumerate(channels)], fontsize=6)
    ax_heads.imshow(heads, cmap=colors, vmin=0, vmax=2, aspect="auto")
    ax_heads.set_xlabel("head")
    ax_heads.set_xticks(range(h), [str(j) for j in range(h)], fontsize=6)
    ax_heads.set_yticks([])
    fig.suptitle(title + "\ngreen kept, red dropped, grey absent before", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
