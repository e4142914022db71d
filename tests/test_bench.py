"""run/bench.py's summary: medians, median-epoch figures and the machine probe."""
import numpy as np
import pytest

from .conftest import run_script


@pytest.fixture(scope="module")
def bench():
    return run_script("bench")


def fig(iter_ms, epoch_ms, probe, file, ranks=1, slow=0.0):
    return {"wall": iter_ms, "iter": iter_ms, "epoch_iter": epoch_ms, "val": 99.0, "peak": 80.0,
            "ranks": ranks, "probe": probe, "file": file, "slow": slow}


def test_probe_line_names_the_runs_that_started_in_a_slow_spell(bench):
    results = {(8, "serial"): [fig(2.0, 2.0, 10.0, "a.h5"), fig(2.1, 2.0, 10.5, "b.h5")],
               (8, "pit"): [fig(1.5, 1.1, 12.0, "c.h5", 2), fig(1.1, 1.1, 10.2, "d.h5", 2)]}
    line = bench.probe_line(results)
    assert "10.00 / 10.35 / 12.00" in line and "1 started" in line and line.endswith("c.h5")
    calm = {k: [r for r in v if r["file"] != "c.h5"] for k, v in results.items()}
    assert bench.probe_line(calm).endswith("no run started in a slow spell")
    old = {(8, "serial"): [fig(2.0, 2.0, np.nan, "a.h5")]}
    assert "none recorded" in bench.probe_line(old)
    # the median-epoch efficiency ignores the slow spell of the whole-run figure
    table = bench.summarise(results, [8], ["serial", "pit"])
    pit_row = table.splitlines()[-1].split("|")
    assert pit_row[7].strip() == f"{2.05 / (2 * 1.3):.2f}" and pit_row[9].strip() == "0.91"


def test_slow_epochs_line_names_the_runs_half_slow(bench):
    results = {(8, "serial"): [fig(2.0, 2.0, 10.0, "a.h5", slow=0.1)],
               (8, "pit"): [fig(1.5, 1.4, 10.0, "b.h5", 2, slow=0.5),
                            fig(1.1, 1.1, 10.0, "c.h5", 2, slow=0.02)]}
    line = bench.slow_epochs_line(results)
    assert "10 % of a run's epochs in the median run, 50 % at most" in line
    assert line.endswith("(re-run them): b.h5")
    results[(8, "pit")] = results[(8, "pit")][1:]
    assert bench.slow_epochs_line(results).endswith("no run had half of its epochs slow")
    assert "no epoch times" in bench.slow_epochs_line({(8, "serial"): [fig(2, 2, 10, "a", slow=None)]})


def test_a_file_already_there_is_kept_and_said_so(bench, tmp_path, capsys):
    import argparse
    args = argparse.Namespace(out=str(tmp_path), force=False, ranks=2)
    kept = tmp_path / "L0008-pit-n2-r0.h5"
    kept.write_bytes(b"")
    assert bench.run_one(args, "pit", 8, 0) == str(kept)
    assert "L0008-pit-n2-r0.h5: kept from an earlier run (--force" in capsys.readouterr().out


def test_probe_measures_something(bench):
    assert 0.0 < bench.probe(chunks=2, calls=10) < 1e5


def test_accuracy_table_compares_each_seed_with_serials_same_seed(bench):
    def run(val, seed):
        return dict(fig(1.0, 1.0, 10.0, f"s{seed}.h5"), val=val, seed=seed)
    results = {(8, "serial"): [run(96.0, 0), run(96.5, 1), run(96.2, 2)],
               (8, "pit"): [run(95.9, 0), run(96.0, 1), run(96.3, 2), run(96.3, 2)]}
    table = bench.accuracy_table(results, [8], ["serial", "pit"])
    row = table.splitlines()[-1].split("|")
    assert row[3].strip() == "0: 95.90 1: 96.00 2: 96.30"
    # differences −0.1, −0.5, +0.1 against the same seed (not against serial's median)
    assert row[4].strip() == "-0.10 (-0.50–+0.10)"
    assert row[5].strip() == "2 of 3"
    assert len(table.splitlines()) == 3  # no row for serial itself
    # a method without serial runs to compare with
    assert bench.accuracy_table({(8, "pit"): [run(95.9, 0)]}, [8], ["pit"]).endswith(
        "| - | - | - | - |")


def test_an_emulated_study_gives_accuracies_and_the_cost_models_speed_ups(bench, tmp_path):
    """--emulate: the parallel runs are threads (no timings in the summary,
    the cost model's predicted speed-up instead), each seed's best accuracy,
    and the est. speed-up to serial's final accuracy that `report --target`
    gives for the same files."""
    from pitmpi.report import Network, estimated_speedup, load
    out = tmp_path / "study"
    bench.main(["--layers", "8", "--methods", "serial", "pit", "--ranks", "2", "--emulate",
                "--seeds", "0", "1", "--repeats", "1", "--set", "train.epochs=4",
                "--set", "coarse.iterations=20", "--bandwidth", "1", "--out", str(out)])
    text = (out / "summary.md").read_text()
    assert "2 emulated ranks" in text and "messages at 1 GB/s" in text
    pit_row = next(l for l in text.splitlines() if l.startswith("| 8 | pit | 2 |")).split("|")
    assert [c.strip() for c in pit_row[4:10]] == ["-"] * 6  # wall .. median-epoch iter-eff
    files = {s: (load(str(out / f"L0008-serial-n1-s{s}-r0.h5")),
                 load(str(out / f"L0008-pit-n2e-s{s}-r0.h5"))) for s in (0, 1)}
    assert all(p.emulated for _, p in files.values())
    predicted = [p.estimate()[1] / p.estimate()[0] for _, p in files.values()]
    assert pit_row[12].strip() == bench.med(predicted)[0]
    acc = next(l for l in text.splitlines() if l.startswith("| 8 | pit | 0:")).split("|")
    assert acc[6].strip() == " ".join(
        f"{s}: {100 * p.history['val_acc'].max():.2f}" for s, (_, p) in files.items())
    want = []
    for s, (ser, p) in files.items():
        target = ser.history["val_acc"][-1] - 1e-9
        hit = p.iterations_to(target)
        want.append(f"{s}: " + ("never" if hit is None else
                                estimated_speedup(p, ser, target, Network(1e9, 2e-6)) + "×"))
    assert acc[7].strip() == " ".join(want)
    assert "machine probe: none recorded" not in text  # the serial runs' probes count


def test_seeded_runs_get_their_own_files_and_seed(bench, tmp_path, capsys):
    import argparse
    args = argparse.Namespace(out=str(tmp_path), force=False, ranks=2)
    kept = tmp_path / "L0008-pit-n2-s3-r0.h5"
    kept.write_bytes(b"")
    assert bench.run_one(args, "pit", 8, 0, seed=3) == str(kept)


def test_bench_allreduce_times_both_orders_under_mpiexec(tmp_path):
    """run/bench_allreduce.py under mpiexec: a row per size with both modes'
    times and their ratio (3 ranks: the ordered mode sums itself)."""
    import os
    import subprocess
    import sys

    from .conftest import REPO, mpiexec
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI", "HYDRA", "PMIX"))}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([mpiexec(), "-n", "3", sys.executable, str(REPO / "run" / "bench_allreduce.py"),
                        "--sizes", "10", "30000", "--rounds", "1"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("3 ranks, float32")
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| 10")
            or line.startswith("| 30000")]
    assert [row[0].strip() for row in rows] == ["10", "30000"]
    for row in rows:
        ordered, mpi, ratio = (float(c) for c in row[2:])
        assert ordered > 0 and mpi > 0 and ratio == pytest.approx(ordered / mpi, rel=0.02, abs=0.01)
