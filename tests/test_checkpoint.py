"""Checkpoints: every output file resumes, bitwise, for every method; bad files fail cleanly."""
import os

import h5py
import numpy as np
import pytest

from pitmpi.checkpoint import Checkpoint
from pitmpi.cli import main
from pitmpi.errors import UserError
from pitmpi.io import read_result
from pitmpi.parallel.comm import run_emulated

BASE = ["--quiet", "--set", "model.layers=8", "--set", "coarse.iterations=20"]
# 513 Swiss-roll training samples / batch 32: 16 iterations per epoch


def run(size, argv):
    return run_emulated(size, lambda comm: main(argv, comm=comm))


def train(size, path, epochs, *extra):
    return run(size, ["train", "--out", str(path), "--set", f"train.epochs={epochs}", *BASE, *extra])


def assert_same_run(a, b):
    """Parameters, history and counted traffic identical bit for bit (wall times aside)."""
    _, pa, ha, ta, _ = read_result(a)
    _, pb, hb, tb, _ = read_result(b)
    assert pa.keys() == pb.keys() and ha.keys() == hb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    for k in ha:
        if k != "epoch_wall":
            np.testing.assert_array_equal(ha[k], hb[k], err_msg=k)
    for k in ("rank_setup_traffic", "rank_iteration_traffic"):
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


CASES = [(1, "serial", []), (2, "data-parallel", []), (2, "model-parallel", []),
         # all-reduces over 3 ranks: traffic in chunks of a third, summed across the resume
         (3, "data-parallel", []),
         (2, "pit", []), (3, "pit", ["--set", "regression.refit_every=3"]),
         (3, "pit", ["--set", "coarse.warmup=wait", "--set", "model.scheme=euler"]),
         (2, "pit", ["--set", "coarse.levels=1"]),
         (2, "pit", ["--set", "regression.delay=1"]),
         (3, "pit", ["--set", "regression.delay=2", "--set", "regression.refit_every=4",
                     "--set", "regression.features=per-class"]),
         # relayed co-states (kept batches across the checkpoint) and the monitor's records
         (4, "pit", ["--set", "regression.target=relayed", "--set", "monitor.every=5"]),
         (3, "pit", ["--set", "regression.target=relayed", "--set", "coarse.warmup=wait",
                     "--set", "regression.features=state"]),
         # checkpoints taken while on exact co-states (monitor.fallback) and after a refill
         (3, "pit", ["--set", "monitor.every=3", "--set", "monitor.fallback=1e-12"]),
         (3, "pit", ["--set", "monitor.every=3", "--set", "monitor.fallback=0.3",
                     "--set", "regression.target=relayed"]),
         # the output errors every block but the last keeps across epochs
         (3, "pit", ["--set", "regression.output_errors=true"]),
         # three levels on a 2 x 2 grid: the coarse levels run once, before the first epoch
         (4, "pit", ["--set", "coarse.levels=3", "--set", "model.layers=16",
                     "--set", "train.data_parallel_size=2", "--set", "regression.target=relayed"])]


@pytest.mark.parametrize("size,method,extra", CASES)
def test_resume_is_bitwise_identical(tmp_path, size, method, extra, monkeypatch):
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    extra = ["--set", f"train.method={method}", *extra]
    assert train(size, full, 4, *extra) == [0] * size
    assert train(size, part, 2, *extra) == [0] * size
    assert Checkpoint(str(part)).epochs_done == 2
    assert run(size, ["train", "--resume", str(part), "--set", "train.epochs=4"]) == [0] * size
    assert_same_run(full, part)


def test_periodic_checkpoint_survives_a_failure_and_resumes(tmp_path, monkeypatch):
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    extra = ["--set", "train.method=pit", "--set", "output.checkpoint_every=1"]
    assert train(2, full, 4, *extra) == [0, 0]
    monkeypatch.setenv("PITMPI_FAIL_RANK", "1")
    monkeypatch.setenv("PITMPI_FAIL_AT", "40")  # in epoch 3: the file holds 2 epochs
    with pytest.raises(Exception):
        train(2, part, 4, *extra)
    assert Checkpoint(str(part)).epochs_done == 2
    monkeypatch.delenv("PITMPI_FAIL_RANK")
    assert run(2, ["train", "--resume", str(part)]) == [0, 0]
    assert_same_run(full, part)


def test_resume_on_another_number_of_ranks(tmp_path):
    path = tmp_path / "r.h5"
    assert train(2, path, 2, "--set", "train.method=pit", "--set", "model.layers=16") == [0, 0]
    before = Checkpoint(str(path))
    np.testing.assert_array_equal(before.partition, [[0, 6], [6, 16]])
    out = tmp_path / "r4.h5"
    assert run(4, ["train", "--resume", str(path), "--out", str(out),
                   "--set", "train.epochs=3"]) == [0] * 4
    after = Checkpoint(str(out))
    assert after.ranks == 4 and after.epochs_done == 3
    np.testing.assert_array_equal(after.partition, [[0, 2], [2, 6], [6, 10], [10, 16]])
    np.testing.assert_array_equal(after.history["val_acc"][:2], before.history["val_acc"])
    np.testing.assert_array_equal(after.history["loss"][:32], before.history["loss"])
    mse = after.history["regression_mse"]
    assert mse.shape == (48, 3) and np.isnan(mse[:32]).all()  # old columns do not map
    assert np.isfinite(mse[-1]).all()
    # the boundary at layer 6 existed before: its regression continued; 2 and 10 are new
    assert after.regression[6]["pairs"] > before.regression[6]["pairs"]
    assert after.regression[2]["pairs"] < before.regression[6]["pairs"]
    assert after.regression[10]["pairs"] < before.regression[6]["pairs"]
    # and on to one rank with another method: parameters carry over
    one = tmp_path / "r1.h5"
    assert run(1, ["train", "--resume", str(out), "--out", str(one), "--set", "train.epochs=4",
                   "--set", "train.method=serial"]) == [0]
    assert Checkpoint(str(one)).epochs_done == 4


def test_resume_rejects_changed_network(tmp_path, capsys):
    path = tmp_path / "c.h5"
    assert train(1, path, 1, "--set", "train.method=serial") == [0]
    stamp = os.stat(path).st_mtime_ns
    for setting, message in [("model.width=8", "model.width = 8 differs from 16"),
                             ("data.name=ellipses", "data.name = 'ellipses' differs"),
                             ("train.epochs=1", "has already trained 1 of train.epochs = 1")]:
        assert run(1, ["train", "--resume", str(path), "--set", setting]) == [2]
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert run(1, ["train", "run/none.toml", "--resume", str(path)]) == [2]
    assert "not both" in capsys.readouterr().err
    assert os.stat(path).st_mtime_ns == stamp  # nothing overwritten


def good_file(tmp_path):
    path = tmp_path / "good.h5"
    assert train(1, path, 1, "--set", "train.method=serial") == [0]
    return path


def damage(kind, path, tmp_path):
    bad = tmp_path / f"{kind}.h5"
    data = path.read_bytes()
    if kind == "truncated":
        bad.write_bytes(data[:len(data) // 2])
    elif kind == "corrupt":
        raw = bytearray(data)
        raw[:512] = os.urandom(512)
        bad.write_bytes(bytes(raw))
    elif kind == "text":
        bad.write_text("not an HDF5 file\n")
    elif kind == "foreign":
        with h5py.File(bad, "w") as f:
            f["x"] = np.arange(3)
    elif kind in ("newer", "no-checkpoint", "nan"):
        bad.write_bytes(data)
        with h5py.File(bad, "r+") as f:
            if kind == "newer":
                f.attrs["format_version"] = 99
            elif kind == "no-checkpoint":
                del f["checkpoint"]
            else:
                f["params/K"][0, 0, 0] = np.nan
    return bad


@pytest.mark.parametrize("kind,message", [
    ("missing", "checkpoint file not found"),
    ("truncated", "not a readable HDF5 file"),
    ("corrupt", "not a readable HDF5 file"),
    ("text", "not a readable HDF5 file"),
    ("foreign", "not a pitmpi output file"),
    ("newer", "format version 99 is newer than this pitmpi reads"),
    ("no-checkpoint", "holds no checkpoint data"),
    ("nan", "parameter K holds NaN or Inf"),
])
def test_bad_checkpoint_files(tmp_path, capsys, kind, message):
    path = tmp_path / "missing.h5" if kind == "missing" else damage(kind, good_file(tmp_path), tmp_path)
    before = path.read_bytes() if path.exists() else None
    assert run(2, ["train", "--resume", str(path)]) == [2, 2]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and message in err[0], err
    assert (path.read_bytes() if path.exists() else None) == before
    with pytest.raises(UserError):
        Checkpoint(str(path))


def test_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch):
    from pitmpi import io
    path = good_file(tmp_path)
    before = path.read_bytes()
    real = io.write_tree

    def dies(group, tree):
        real(group, tree)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(io, "write_tree", dies)
    with pytest.raises(KeyboardInterrupt):
        train(1, path, 2, "--set", "train.method=serial")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
