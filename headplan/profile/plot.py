"""Picture of a profile: the short-window heat map."""

from __future__ import annotations

from pathlib import Path

from ..plan import atomic_write
from .format import Profile, short_window


def plot_profile(prof: Profile, path: str | Path) -> Path:
    """PNG heat map (layers x KV heads) of the loss under the short-window candidate."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ci = short_window(prof)
    x = prof.loss[:, :, ci, :].double().mean(-1).numpy()
    L, H = x.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.45 * H), max(3.0, 0.8 + 0.22 * L)), dpi=110)
    im = ax.imshow(x, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    step = max(1, L // 16)
    ax.set_yticks(range(0, L, step))
    ax.set_title(f"{prof.method} loss under {prof.candidates[ci].name}\n"
                 f"(mean over lengths {', '.join(map(str, prof.lengths))})", fontsize=9)
    fig.colorbar(im, ax=ax, label="loss")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return Path(path)
