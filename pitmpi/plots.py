"""PNG figures for ``python -m pitmpi report FILE.h5 ... --plots DIR``.

Needs matplotlib (``pip install 'pitmpi[plot]'``).  Figures written:

- ``curves.png``: training loss and validation accuracy per epoch, and
  validation accuracy against training time, one line per file;
- ``regression_mse.png``: the co-state regression's MSE per boundary over
  the iterations (the paper's Figure 3), for ``pit`` runs;
- ``monitor_<file>.png``: for ``pit`` runs with ``monitor.every``, the
  predicted co-state's error against the exact one per boundary, and the
  cosine of each block's gradient with the exact one, over the iterations;
- ``time_per_rank.png``: compute / communication wait / regression / coarse
  phase seconds per rank of each file;
- ``speedup_depth.png``: speed-up and efficiency against the number of
  layers, one line per method and rank count, when the files form a depth
  sweep (the paper's Figures 1, 2 and 4);
- ``decision_<file>.png``: for 2-D datasets, the decision regions with the
  validation points, and the paths of a few points through the layers
  (hidden states projected on their two principal directions).
"""
import os

import numpy as np

from . import data as data_mod
from .errors import UserError
from .parallel.trainer import build_network
from .report import TIME_KINDS, baseline_of, load


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plots needs matplotlib: pip install 'pitmpi[plot]' "
                        "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def smooth(values, window):
    """Moving mean over ``window`` samples, ignoring NaN (same length)."""
    if window <= 1:
        return values
    ok = np.isfinite(values)
    kernel = np.ones(window)
    num = np.convolve(np.where(ok, values, 0.0), kernel, mode="same")
    den = np.convolve(ok.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def write_plots(paths, folder):
    """Write every figure that the files support into ``folder``; returns their paths."""
    plt = _pyplot()
    runs = [load(p) for p in paths]
    os.makedirs(folder, exist_ok=True)
    written = []

    def save(fig, name):
        out = os.path.join(folder, name)
        fig.tight_layout()
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    for run in runs:
        h = run.history
        ep = np.arange(1, len(h["val_acc"]) + 1)
        name = f"{stem(run.path)} ({run.label})"
        ax[0].semilogy(ep, h["train_loss"], label=name)
        ax[1].plot(ep, 100 * h["val_acc"], label=name)
        ax[2].plot(h["epoch_wall"], 100 * h["val_acc"], label=name)
    ax[0].set(xlabel="epoch", ylabel="training loss", title="loss")
    ax[1].set(xlabel="epoch", ylabel="validation accuracy (%)", title="accuracy")
    ax[2].set(xlabel="training time (s)", ylabel="validation accuracy (%)",
              title="accuracy against time")
    ax[1].legend(fontsize=7)
    save(fig, "curves.png")

    pit = [r for r in runs if "regression_mse" in r.history and r.history["regression_mse"].size]
    if pit:
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for run in pit:
            mse = run.history["regression_mse"]
            window = max(1, len(mse) // 100)  # moving mean, so that long runs stay readable
            for j in range(mse.shape[1]):
                curve = smooth(mse[:, j], window)
                ax.semilogy(np.arange(len(curve)), curve, lw=0.9,
                            label=f"{stem(run.path)} ({run.label}), boundary {j + 1}")
        ax.set(xlabel="iteration", ylabel="regression MSE of per-sample co-states",
               title="co-state prediction error (paper Fig. 3; moving mean over 1 % of the run)")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        save(fig, "regression_mse.png")

    watched = [r for r in runs if len(r.history.get("monitor_iteration", ()))]
    for run in watched:
        h = run.history
        its = h["monitor_iteration"]
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
        cmap = plt.get_cmap("viridis")
        nb = h["monitor_costate_rel"].shape[1]
        for j in range(nb):
            color = cmap(j / max(nb - 1, 1))
            ax[0].semilogy(its, h["monitor_costate_rel"][:, j], lw=0.9, color=color,
                           label=f"boundary {j + 1}")
            ax[1].plot(its, h["monitor_grad_cos"][:, j], lw=0.9, color=color, label=f"block {j}")
        ax[1].plot(its, h["monitor_grad_cos_all"], "k-", lw=1.5, label="whole net")
        ax[0].set(xlabel="iteration", ylabel="‖Λ̂ − Λ‖ / ‖Λ‖",
                  title=f"predicted against exact co-states ({stem(run.path)}, {run.label})")
        ax[1].set(xlabel="iteration", ylabel="cosine with the exact gradient", ylim=(-1.05, 1.05),
                  title="gradient direction per block")
        for a in ax:
            a.grid(alpha=0.3)
            a.legend(fontsize=6, ncol=2)
        save(fig, f"monitor_{stem(run.path)}.png")

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * sum(r.ranks for r in runs)), 4.5))
    x, ticks = 0, []
    colors = ["tab:blue", "tab:red", "tab:green", "tab:orange"]
    for run in runs:
        for r in range(run.ranks):
            bottom = 0.0
            for (key, name), color in zip(TIME_KINDS, colors):
                v = float(run.timing[key][r]) if key in run.timing else 0.0
                ax.bar(x, v, bottom=bottom, color=color, label=name if x == 0 else None)
                bottom += v
            ticks.append((x, f"{stem(run.path)}\nrank {r}"))
            x += 1
        x += 0.5
    ax.set_xticks([t for t, _ in ticks], [s for _, s in ticks], fontsize=7)
    ax.set(ylabel="seconds", title="time per rank")
    ax.legend()
    save(fig, "time_per_rank.png")

    depths = sorted({r.layers for r in runs})
    sweep = [r for r in runs if r.ranks > 1 and baseline_of(r, runs) is not None]
    if len(depths) >= 2 and sweep:
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        groups = {}
        for run in sweep:
            groups.setdefault(run.kind, []).append(run)
        for name, members in sorted(groups.items()):
            members.sort(key=lambda r: r.layers)
            L = [r.layers for r in members]
            su = [baseline_of(r, runs).wall / r.wall for r in members]
            ax[0].plot(L, su, "o-", label=name)
            ax[1].plot(L, [s / m.ranks for s, m in zip(su, members)], "o-", label=name)
        for a, what in zip(ax, ("speed-up over serial", "parallel efficiency")):
            a.set_xscale("log", base=2)
            a.set(xlabel="layers", ylabel=what, title=f"{what} against depth")
            a.grid(alpha=0.3)
        ax[1].axhline(0.75, color="gray", ls="--", lw=0.8, label="paper: 0.75")
        ax[0].legend(fontsize=8)
        ax[1].legend(fontsize=8)
        save(fig, "speedup_depth.png")

    for run in runs:
        if run.dataset in ("swissroll", "ellipses"):
            written.append(decision_plot(plt, run, os.path.join(folder, f"decision_{stem(run.path)}.png")))
    return written


def decision_plot(plt, run, out, n_paths=12):
    """Decision regions of a 2-D classifier and the paths of a few points."""
    d = run.cfg["data"]
    ds = data_mod.load(d["name"], d["path"], seed=d["seed"], n_train=d["n_train"], n_val=d["n_val"])
    net = build_network(run.cfg, ds)
    params = {k: np.asarray(v, dtype=net.dtype) for k, v in run.params.items()}
    X = np.vstack([ds.x_train, ds.x_val])
    lo, hi = X.min(axis=0) - 0.2, X.max(axis=0) + 0.2
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
    grid = np.column_stack([gx.ravel(), gy.ravel()]).astype(net.dtype)
    pred = net.predict(params, grid).argmax(axis=1).reshape(gx.shape)
    block = net.full()
    pick = np.random.default_rng(0).choice(len(ds.y_val), size=min(n_paths, len(ds.y_val)),
                                           replace=False)
    traj = block.forward(params, ds.x_val[pick].astype(net.dtype), store=True).traj
    Y = np.asarray(traj.Y)[:, :, :net.width]  # (layers + 1, points, w)
    flat = Y.reshape(-1, net.width)
    centred = flat - flat.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    proj = (centred @ vt[:2].T).reshape(Y.shape[0], Y.shape[1], 2)
    fig, ax = plt.subplots(1, 2, figsize=(11, 5))
    ax[0].contourf(gx, gy, pred, levels=np.arange(ds.n_classes + 1) - 0.5, cmap="coolwarm", alpha=0.35)
    ax[0].scatter(ds.x_val[:, 0], ds.x_val[:, 1], c=ds.y_val, cmap="coolwarm", s=6)
    ax[0].set(title=f"decision regions, validation points ({stem(run.path)})", xlabel="x1", ylabel="x2")
    cmap = plt.get_cmap("coolwarm")
    for i in range(Y.shape[1]):
        color = cmap(ds.y_val[pick[i]] / max(ds.n_classes - 1, 1))
        ax[1].plot(proj[:, i, 0], proj[:, i, 1], "-", color=color, lw=0.8)
        ax[1].plot(proj[0, i, 0], proj[0, i, 1], "o", color=color, ms=3)
        ax[1].plot(proj[-1, i, 0], proj[-1, i, 1], "s", color=color, ms=4)
    ax[1].set(title="12 points through the layers (PCA of states)",
              xlabel="principal direction 1", ylabel="principal direction 2")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
