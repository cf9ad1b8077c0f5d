"""The loss-curve PNG written next to the checkpoints (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from cpmctl.io import atomic_path


def plot_loss_curve(rows: list[dict], out: Path, title: str = "training loss") -> Path | None:
    """Train loss (and per objective), validation loss, against the step. None when there is nothing to plot."""
    train = [r for r in rows if "loss" in r]
    valid = [r for r in rows if "valid_loss" in r]
    if not train and not valid:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", color="tab:blue")
        for key, color in (("loss/lm", "tab:cyan"), ("loss/mlm", "tab:purple")):
            points = [(r["step"], r[key]) for r in train if key in r]
            if points:
                ax.plot(*zip(*points), label=key.replace("loss/", "train "), color=color, linewidth=0.8, alpha=0.7)
    if valid:
        ax.plot([r["step"] for r in valid], [r["valid_loss"] for r in valid], "o-", label="valid", color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
