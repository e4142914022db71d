"""Offline summaries of output files (``python -m pitmpi report``)."""
import os

from .errors import UserError
from .io import read_result


def summarise(path):
    """A short text summary of one output file."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    try:
        attrs, params, hist, timing, extra = read_result(path)
    except (OSError, KeyError) as e:
        raise UserError(f"{path}: not a readable pitmpi output file ({e})") from None
    lines = [f"{path}: method {attrs.get('method')} on {attrs.get('ranks')} rank(s), "
             f"dataset {attrs.get('dataset')}"]
    if "val_acc" in hist and len(hist["val_acc"]):
        lines.append(f"  epochs {len(hist['val_acc'])}, final val accuracy "
                     f"{100 * hist['val_acc'][-1]:.2f}%, train loss {hist['train_loss'][-1]:.4f}")
    if "train_wall" in timing:
        lines.append(f"  training wall time {float(timing['train_wall']):.2f} s")
    if "partition" in extra:
        lines.append("  partition: " + ", ".join(f"[{a},{b})" for a, b in extra["partition"]))
    for key in ("rank_compute", "rank_comm_wait", "rank_regression", "coarse_wall"):
        if key in timing:
            lines.append(f"  {key}: " + " ".join(f"{v:.2f}" for v in timing[key]))
    return "\n".join(lines)

