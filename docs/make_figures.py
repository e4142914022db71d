"""Draw the documentation's figures into docs/_static (run by hand; the PNGs are committed).

    python docs/make_figures.py
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def schedule(path, ranks=4, iterations=7):
    """Which rank works on which batch at which iteration of ``pit``, and what
    travels where: states forward, co-states back, one exchange per iteration."""
    fig, ax = plt.subplots(figsize=(10, 3.6))
    colors = plt.get_cmap("tab10")
    for k in range(iterations):
        for r in range(ranks):
            g = k - r
            y = ranks - 1 - r
            warm = g < 0
            ax.add_patch(plt.Rectangle((k + 0.08, y + 0.12), 0.84, 0.76,
                                       color="0.88" if warm else colors(g % 10),
                                       alpha=1.0 if warm else 0.35))
            ax.text(k + 0.5, y + 0.5, f"batch {g}" if not warm else f"warm-up\n({g})",
                    ha="center", va="center", fontsize=8)
            if r < ranks - 1 and k < iterations - 1:  # state of batch g to r+1, used next iteration
                ax.annotate("", xy=(k + 1.12, y - 0.35), xytext=(k + 0.88, y + 0.15),
                            arrowprops=dict(arrowstyle="->", color="tab:blue", lw=1.2))
            if r > 0 and k < iterations - 1 and not warm:  # co-state of batch g back to r-1
                ax.annotate("", xy=(k + 1.12, y + 1.35), xytext=(k + 0.88, y + 0.85),
                            arrowprops=dict(arrowstyle="->", color="tab:red", lw=1.2))
    ax.set_xlim(0, iterations)
    ax.set_ylim(-0.1, ranks)
    ax.set_xticks([k + 0.5 for k in range(iterations)], [f"k = {k}" for k in range(iterations)])
    ax.set_yticks([ranks - 1 - r + 0.5 for r in range(ranks)],
                  [f"rank {r}" + (" (opening)" if r == 0 else " (loss)" if r == ranks - 1 else "")
                   for r in range(ranks)])
    ax.set_title("pit: rank r works on batch k − r at iteration k; blue: the state it sends to "
                 "r + 1, red: the co-state it sends to r − 1", fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    os.makedirs(os.path.join(HERE, "_static"), exist_ok=True)
    schedule(os.path.join(HERE, "_static", "schedule.png"))
