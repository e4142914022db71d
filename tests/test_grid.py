"""The layers x data grid (train.data_parallel_size): B blocks x D replicas
give the iterates of B blocks alone, to rounding."""
import os
import subprocess
import sys

import numpy as np
import pytest

from pitmpi import config, data
from pitmpi.checkpoint import Checkpoint
from pitmpi.cli import main
from pitmpi.parallel.comm import run_emulated
from pitmpi.parallel.methods import make_trainer
from pitmpi.report import summarise

from .conftest import REPO, mpiexec

SWISS = data.swissroll()
QUICK = ["model.layers=8", "coarse.iterations=20", "train.epochs=3", "output.progress=false"]


def train(size, overrides):
    cfg = config.load(None, QUICK + overrides)
    return run_emulated(size, lambda comm: make_trainer(comm, cfg, SWISS).run())[0]


def max_diff(a, b):
    return max(float(np.abs(a.params[k] - b.params[k]).max()) for k in a.params)


@pytest.mark.parametrize("blocks,replicas,extra", [
    (2, 2, []), (2, 2, ["regression.delay=1"]), (2, 2, ["coarse.parallel=data-parallel"]),
    (3, 2, []), (3, 2, ["regression.target=relayed", "regression.damping=error"]),
    (2, 3, ["coarse.warmup=wait"])])
def test_pit_on_a_grid_gives_the_iterates_of_its_blocks_alone(blocks, replicas, extra):
    alone = train(blocks, ["train.method=pit"] + extra)
    grid = train(blocks * replicas, ["train.method=pit", f"train.data_parallel_size={replicas}"]
                 + extra)
    assert max_diff(alone, grid) <= 1e-8
    np.testing.assert_allclose(grid.history["val_acc"], alone.history["val_acc"], atol=1e-12)
    np.testing.assert_allclose(grid.history["loss"], alone.history["loss"], rtol=1e-8)
    assert grid.attrs["blocks"] == blocks and grid.attrs["data_parallel_size"] == replicas
    assert grid.extra["partition"].shape == (blocks, 2)


@pytest.mark.parametrize("ranks,replicas,cap,want", [
    (16, 1, 4, 4), (8, 1, 4, 2), (4, 1, 4, 1), (2, 1, 4, 1), (12, 1, 4, 3), (6, 1, 4, 2),
    (7, 1, 4, 7), (16, 2, 4, 4), (16, 2, 3, 8), (8, 2, 0, 2), (8, 1, 1, 8), (16, 1, 0, 1)])
def test_max_blocks_picks_the_least_replicas_that_keep_the_blocks_under_it(ranks, replicas, cap,
                                                                           want):
    cfg = config.load(None, [f"train.data_parallel_size={replicas}", f"train.max_blocks={cap}"])
    assert config.replicas_of(cfg, ranks) == want
    resolved = config.load(None, [f"train.data_parallel_size={want}", f"train.max_blocks={cap}"])
    assert config.replicas_of(resolved, ranks) == want  # the same once resolved
    for method in ("serial", "data-parallel"):
        other = config.load(None, [f"train.method={method}", f"train.max_blocks={cap}"])
        assert config.replicas_of(other, ranks) == 1  # no layer blocks to cap


def test_max_blocks_runs_the_grid_it_picks_and_decides_the_many_blocks_values():
    capped = train(8, ["train.method=pit", "train.max_blocks=2"])
    grid = train(8, ["train.method=pit", "train.data_parallel_size=4"])
    for k in grid.params:
        np.testing.assert_array_equal(capped.params[k], grid.params[k], err_msg=k)
    assert capped.attrs["blocks"] == 2 and capped.attrs["data_parallel_size"] == 4
    overlay = "[many_blocks.regression]\nforgetting = 0.95\n"
    take = lambda ranks, cap: config.loads(overlay, [f"train.max_blocks={cap}"],
                                           ranks=ranks)["regression"]["forgetting"]
    assert take(16, 4) == 0.95 and take(8, 4) == 0.95  # 4 blocks x 4 and x 2
    assert take(16, 3) != 0.95 and take(8, 2) != 0.95  # 2 blocks x 8 and x 4


@pytest.mark.parametrize("blocks,replicas", [(2, 2), (3, 2), (1, 3)])
def test_model_parallel_on_a_grid_equals_serial(blocks, replicas):
    serial = train(1, ["train.method=serial"])
    grid = train(blocks * replicas, ["train.method=model-parallel",
                                     f"train.data_parallel_size={replicas}"])
    assert max_diff(serial, grid) <= 1e-12


def test_a_grid_resumes_exactly_and_onto_another_grid(tmp_path, capsys):
    base = ["--quiet", "--set", "model.layers=8", "--set", "coarse.iterations=20"]
    run = lambda size, argv: run_emulated(size, lambda comm: main(argv, comm=comm))
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    grid = ["--set", "train.data_parallel_size=2"]
    assert run(4, ["train", *base, *grid, "--set", "train.epochs=4", "--out", str(full)]) == [0] * 4
    assert run(4, ["train", *base, *grid, "--set", "train.epochs=2", "--out", str(part)]) == [0] * 4
    assert run(4, ["train", "--resume", str(part), "--set", "train.epochs=4"]) == [0] * 4
    a, b = Checkpoint(str(full)), Checkpoint(str(part))
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    assert "2 layer blocks x 2 replicas" in summarise(str(full))
    # onto 4 blocks of one replica: parameters carried over, the pipeline refills
    assert run(4, ["train", "--resume", str(full), "--set", "train.epochs=5",
                   "--set", "train.data_parallel_size=1", "--out", str(tmp_path / "g.h5")]) == [0] * 4
    assert Checkpoint(str(tmp_path / "g.h5")).epochs_done == 5


def test_killing_one_rank_of_a_grid_job_ends_it(tmp_path):
    out = tmp_path / "k.h5"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI", "HYDRA", "PMIX"))}
    env.update(PITMPI_FAIL_RANK="3", OMP_NUM_THREADS="1")
    r = subprocess.run([mpiexec(), "-n", "4", sys.executable, "-m", "pitmpi", "train", "--quiet",
                        "--set", "model.layers=8", "--set", "coarse.iterations=20",
                        "--set", "train.data_parallel_size=2", "--set", "train.epochs=50",
                        "--out", str(out)],
                       capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert r.returncode != 0
    assert "rank 3 of 4 failed" in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("extra", [[], ["model.layers=16", "coarse.levels=3"]])
def test_a_grid_under_mpiexec_gives_the_emulated_iterates(tmp_path, extra):
    out = tmp_path / "m.h5"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI", "HYDRA", "PMIX"))}
    env["OMP_NUM_THREADS"] = "1"
    argv = ["train", "--quiet", "--set", "model.layers=8", "--set", "coarse.iterations=20",
            "--set", "train.epochs=3", "--set", "train.data_parallel_size=2"]
    argv += [a for kv in extra for a in ("--set", kv)]
    r = subprocess.run([mpiexec(), "-n", "4", sys.executable, "-m", "pitmpi", *argv,
                        "--out", str(out)], capture_output=True, text=True, timeout=300, env=env,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr
    alone = train(2, ["train.method=pit"] + extra)
    got = Checkpoint(str(out))
    for k in alone.params:
        assert np.abs(got.params[k] - alone.params[k]).max() <= 1e-8, k


def test_grid_estimate_lists_every_grid():
    from .conftest import run_script
    est = run_script("grid_estimate")
    load = lambda d: config.load(None, ["model.layers=64", f"train.data_parallel_size={d}"],
                                 ranks=4)
    rows = {name: (b, r, sec, su) for name, b, r, sec, su in est.estimate(load, SWISS, 4)}
    assert {"serial", "data-parallel", "pit 4x1", "pit 2x2", "pit 1x4", "model-parallel 2x2"} <= set(rows)
    assert rows["serial"][3] == 1.0
    # one block replicated on every rank is data-parallel's work
    assert rows["model-parallel 1x4"][2] == pytest.approx(rows["data-parallel"][2])
    assert rows["pit 2x2"][3] > 1.0 and rows["model-parallel 4x1"][3] == pytest.approx(1.0)


def test_grid_estimate_lists_every_grid_of_a_capped_config_and_names_its_own(capsys, tmp_path):
    """Each row is its grid as named: the same as from the file without the
    cap (6 ranks: the cap of 4 would make 6 x 1 a 3 x 2 without [many_blocks])."""
    from .conftest import run_script
    script = run_script("grid_estimate")
    shipped = REPO / "run" / "swissroll.toml"
    uncapped = tmp_path / "uncapped.toml"
    uncapped.write_text(shipped.read_text().replace("max_blocks = 4", ""))
    rows = {}
    for path in (shipped, uncapped):
        script.main(["--config", str(path), "--layers", "256", "--ranks", "6"])
        rows[path] = capsys.readouterr().out
    table = lambda out: [line for line in out.splitlines() if line.startswith("| pit")]
    assert "| pit 6x1 | 6 | 1 |" in rows[shipped]
    assert table(rows[shipped]) == table(rows[uncapped])
    assert "the config's own pit grid on 6 ranks: 3x2 (train.max_blocks = 4)" in rows[shipped]
    assert "own pit grid" not in rows[uncapped]


@pytest.mark.parametrize("setting, names", [("model.layerz=64", "model.layerz"),
                                             ("data.path=/nonexistent/mnist", "/nonexistent")])
def test_grid_estimate_says_what_is_wrong_in_one_line(capsys, monkeypatch, setting, names):
    from .conftest import run_script
    monkeypatch.delenv("PITMPI_DATA", raising=False)
    script = run_script("grid_estimate")
    with pytest.raises(SystemExit) as exit:
        script.main(["--config", str(REPO / "run" / "mnist.toml"), "--set", setting])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("grid_estimate: error: ") and names in err
    assert len(err.strip().splitlines()) == 1


def test_grid_estimate_puts_boundaries_where_the_levels_do():
    from .conftest import run_script
    est = run_script("grid_estimate")
    names = lambda levels: {row[0] for row in est.estimate(
        lambda d: config.load(None, ["model.layers=16", f"coarse.levels={levels}"]), SWISS, 8)}
    assert "pit 8x1" in names(2)  # boundaries on even layers: 8 blocks of 2
    assert "pit 8x1" not in names(3) and "pit 4x2" in names(3)  # on multiples of 4


def test_the_monitor_on_a_grid_measures_what_its_blocks_alone_do():
    alone = train(2, ["train.method=pit", "monitor.every=8"])
    grid = train(4, ["train.method=pit", "monitor.every=8", "train.data_parallel_size=2"])
    for name in ("monitor_costate_rel", "monitor_grad_cos", "monitor_grad_cos_all"):
        np.testing.assert_allclose(grid.history[name], alone.history[name], rtol=1e-8, err_msg=name)


@pytest.mark.parametrize("blocks,replicas,extra", [
    (2, 2, []), (3, 2, ["regression.target=relayed", "regression.damping=error",
                        "coarse.parallel=data-parallel"])])
def test_three_levels_on_a_grid_give_the_iterates_of_its_blocks_alone(blocks, replicas, extra):
    """The coarse model's pit run takes the fine run's grid: its blocks'
    replicas split each batch, and each block hands on one regression."""
    levels = ["model.layers=16", "coarse.levels=3", "train.method=pit"] + extra
    alone = train(blocks, levels)
    grid = train(blocks * replicas, levels + [f"train.data_parallel_size={replicas}"])
    assert max_diff(alone, grid) <= 1e-8
    np.testing.assert_allclose(grid.history["loss"], alone.history["loss"], rtol=1e-8)
    two = train(blocks * replicas, ["model.layers=16", "coarse.levels=2", "train.method=pit",
                                    f"train.data_parallel_size={replicas}"] + extra)
    assert max_diff(two, grid) > 1e-3  # the third level changed the start
