"""``report``: summary, comparison with speed-ups, time to target, PNG figures."""
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from pitmpi.cli import main
from pitmpi.parallel.comm import run_emulated

from .conftest import run_script
from .test_checkpoint import train


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A tiny depth sweep: serial and pit at 4 and 8 layers."""
    d = tmp_path_factory.mktemp("sweep")
    files = []
    for layers in (4, 8):
        for size, method in ((1, "serial"), (2, "pit")):
            path = d / f"{method}-L{layers}.h5"
            assert train(size, path, 3, "--set", f"train.method={method}",
                         "--set", f"model.layers={layers}") == [0] * size
            with h5py.File(path, "r+") as f:  # as if from mpirun: these tests check the arithmetic
                f.attrs["emulated"] = False
            files.append(str(path))
    return files


def report(argv):
    return run_emulated(1, lambda comm: main(["report", *argv], comm=comm))[0]


def test_summary_of_one_file(sweep, capsys):
    assert report([sweep[1]]) == 0
    out = capsys.readouterr().out
    for text in ("swissroll, verlet ResNet, width 16, 4 layers", "pit on 2 rank(s), 3 epochs",
                 "partition [0,2), [2,4)", "validation", "rank 1", "comm wait", "regression",
                 "in the median epoch"):
        assert text in out, text
    assert "process peak MiB" not in out


def test_emulated_ranks_peak_memory_is_the_processes(tmp_path, capsys):
    path = tmp_path / "emulated.h5"
    assert train(2, path, 1) == [0, 0]
    assert report([str(path)]) == 0
    out = capsys.readouterr().out
    assert "emulated rank(s)" in out and "process peak MiB" in out


def test_comparison_has_speedups_against_serial_of_same_depth(sweep, capsys):
    assert report(sweep + ["--target", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {ln.split()[0]: ln.split() for ln in lines[2:] if ln.endswith(("-", ".h5")) or ".h5" in ln}
    assert rows["serial-L4.h5"][8] == "1.00"  # the baseline against itself
    pit = rows["pit-L8.h5"]
    from pitmpi.report import load
    want = load(sweep[2]).wall / load(sweep[3]).wall
    assert float(pit[8]) == pytest.approx(want, abs=0.006)
    assert float(pit[9]) == pytest.approx(want / 2, abs=0.006)
    assert pit[11] == f"{100 * load(sweep[3]).slow_epoch_share:.0f}"


def critical_path_of(out):
    line = next(ln for ln in out.splitlines() if "critical path" in ln)
    return line, float(line.split("critical path ")[1].split(" s")[0])


def test_bandwidth_adds_the_counted_messages_to_the_estimate(sweep, capsys):
    pit = sweep[3]
    assert report([pit]) == 0
    out = capsys.readouterr().out
    line, plain = critical_path_of(out)
    assert "no messages: see report --bandwidth" in line
    assert "traffic   (counted" in out
    with h5py.File(pit) as f:
        setup, per_run = f["timing/rank_setup_traffic"][()], f["timing/rank_iteration_traffic"][()]
    assert per_run.shape == (2, 4) and per_run[:, 1].min() > 0  # each rank sent messages
    # 0.01 GB/s and 100 µs: bytes / 1e7 + (messages + all-reduce steps) * 1e-4, busiest rank
    total = setup + per_run
    want = ((total[:, 0] + total[:, 2]) / 1e7 + (total[:, 1] + total[:, 3]) * 1e-4).max()
    assert report([pit, "--bandwidth", "0.01", "--latency", "100"]) == 0
    line, slow = critical_path_of(capsys.readouterr().out)
    assert f"+ {want:.2f} s of messages on the busiest rank at 0.01 GB/s, 100 µs" in line
    assert slow == pytest.approx(plain + want, abs=0.011)
    assert report(sweep + ["--target", "0.5", "--bandwidth", "0.01", "--latency", "100"]) == 0
    slow_rows = capsys.readouterr().out
    assert report(sweep + ["--target", "0.5"]) == 0
    rows = capsys.readouterr().out
    est = lambda text: float(next(ln for ln in text.splitlines()
                                  if ln.startswith("pit-L8.h5")).split()[-1])
    assert est(slow_rows) < est(rows)



def test_bandwidth_says_when_a_file_counted_no_traffic(sweep, tmp_path, capsys):
    old = tmp_path / "old.h5"
    shutil.copy(sweep[3], old)
    with h5py.File(old, "r+") as f:  # as written before traffic was counted
        del f["timing/rank_setup_traffic"], f["timing/rank_iteration_traffic"]
    assert report([str(old), "--bandwidth", "10"]) == 0
    line, _ = critical_path_of(capsys.readouterr().out)
    assert "no messages: the file was written before pitmpi counted its traffic" in line
    assert report([sweep[2], str(old), "--target", "0.5", "--bandwidth", "10"]) == 0
    assert "no messages in the est. speed-up of old.h5" in capsys.readouterr().out


def test_report_into_a_closed_pipe_ends_quietly(sweep):
    # as `report FILE.h5 | head -1`, with the reader gone before the first line
    p = subprocess.Popen([sys.executable, "-m", "pitmpi", "report", sweep[3]],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait() == 0 and err == b"", err.decode()


def test_median_epoch_time_ignores_a_slow_epoch():
    from pitmpi.report import Run
    # 4 epochs of 2 iterations after a 0.5 s coarse phase: 1, 1, 1 and 6.5 s
    run = Run("x.h5", {}, {}, {}, {"epoch_wall": np.array([1.5, 2.5, 3.5, 10.0]),
                                   "loss": np.zeros(8)}, {"coarse_wall": np.array([0.5, 0.0])}, {})
    assert run.median_epoch_ms == pytest.approx(500.0)
    assert Run("x.h5", {}, {}, {}, {"loss": np.zeros(8)}, {}, {}).median_epoch_ms is None


def test_slow_epoch_share_counts_the_epochs_over_the_runs_fast_pace():
    from pitmpi.report import Run
    # fast pace = the 10th percentile, 1.018 s: 4 of 10 are over 1.25× it
    per_epoch = np.array([1.0, 1.02, 1.04, 1.06, 1.1, 1.2, 1.3, 1.4, 2.0, 2.1])
    run = Run("x.h5", {}, {}, {}, {"epoch_wall": np.cumsum(per_epoch), "loss": np.zeros(20)},
              {"coarse_wall": np.array([0.0])}, {})
    assert run.slow_epoch_share == pytest.approx(0.4)
    assert np.allclose(run.epoch_seconds(), per_epoch)
    calm = Run("x.h5", {}, {}, {}, {"epoch_wall": np.arange(1.0, 11.0), "loss": np.zeros(20)},
               {}, {})
    assert calm.slow_epoch_share == 0.0
    assert Run("x.h5", {}, {}, {}, {"loss": np.zeros(8)}, {}, {}).slow_epoch_share is None


def test_plots_are_valid_pngs(sweep, tmp_path, capsys):
    import matplotlib.image
    assert report(sweep + ["--plots", str(tmp_path / "fig")]) == 0
    names = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert names == sorted(["curves.png", "regression_mse.png", "time_per_rank.png",
                            "speedup_depth.png"] + [f"decision_{m}-L{L}.png" for m in ("serial", "pit")
                                                    for L in (4, 8)])
    for name in names:
        img = matplotlib.image.imread(tmp_path / "fig" / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
        assert np.ptp(img) > 0  # not blank


def test_report_errors(tmp_path, capsys):
    bad = tmp_path / "x.h5"
    bad.write_text("nope")
    assert report([str(bad)]) == 2
    assert "not a readable pitmpi output file" in capsys.readouterr().err
    assert report([str(tmp_path / "none.h5")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert report([str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert report([str(bad), "--target", "1.5"]) == 2
    assert "--target 1.5: expected a validation accuracy" in capsys.readouterr().err
    good = str(tmp_path / "none.h5")  # checked before any file is read
    for argv, message in ((["--bandwidth", "0"], "--bandwidth 0.0: expected a network bandwidth"),
                          (["--bandwidth", "nan"], "--bandwidth nan: expected"),
                          (["--latency", "2"], "--latency 2.0: it needs --bandwidth"),
                          (["--bandwidth", "10", "--latency", "-1"], "--latency -1.0: expected")):
        assert report([good, *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_scaling_check_splits_pit_iteration_against_serial(sweep, capsys):
    import h5py

    check = run_script("scaling_check")
    serial, pit = sweep[2], sweep[3]  # 8 layers
    check.main([serial, pit])
    row = capsys.readouterr().out.strip().splitlines()[-1].strip("| ").split(" | ")
    with h5py.File(serial) as f:
        t1 = f["timing/train_wall"][()] / len(f["history/loss"])
    with h5py.File(pit) as f:
        n = len(f["history/loss"])
        tn = (f["timing/train_wall"][()] - max(f["timing/coarse_wall"][()])) / n
        reg = f["timing/rank_regression"][0] / n
    assert row[:2] == ["2", "4"]
    assert float(row[2]) == pytest.approx(1e3 * tn, abs=1e-3)
    assert float(row[3]) == pytest.approx(t1 / (2 * tn), abs=0.006)
    assert float(row[4]) == pytest.approx(1e3 * reg, abs=1e-3)
    with pytest.raises(SystemExit, match="expected 'serial'"):
        check.main([pit, pit])
