"""MPI runs (pytest-mpi): `mpirun -n N python -m pytest --with-mpi tests/mpi`.

Each test works at any size, so CTest runs this file at 1, 2 and 3 ranks.
"""
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from pitmpi import config, data
from pitmpi.parallel.comm import MPIComm, run_emulated
from pitmpi.parallel.methods import make_trainer

from ..conftest import mpiexec

QUICK = ["model.layers=12", "train.epochs=2", "output.progress=false"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def world():
    from mpi4py import MPI
    return MPIComm(MPI.COMM_WORLD)


def train_mpi(overrides):
    cfg = config.load(None, QUICK + overrides)
    return make_trainer(world(), cfg, data.swissroll()).run()


def train_serial_reference(overrides):
    cfg = config.load(None, QUICK + overrides + ["train.method=serial"])
    return run_emulated(1, lambda c: make_trainer(c, cfg, data.swissroll()).run())[0]


def train_emulated(size, overrides):
    cfg = config.load(None, QUICK + overrides)
    return run_emulated(size, lambda c: make_trainer(c, cfg, data.swissroll()).run())[0]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("scheme", ["euler", "verlet"])
@pytest.mark.parametrize("method", ["data-parallel", "model-parallel"])
def test_exact_methods_match_serial(method, scheme):
    res = train_mpi([f"train.method={method}", f"model.scheme={scheme}"])
    if world().rank == 0:
        ref = train_serial_reference([f"model.scheme={scheme}"])
        for k in ref.params:
            tol = 0.0 if world().size == 1 else 1e-12
            assert np.abs(res.params[k] - ref.params[k]).max() <= tol, k


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("overrides", [[], ["coarse.levels=1", "model.scheme=euler"],
                                        ["coarse.warmup=wait"], ["coarse.parallel=data-parallel"],
                                        ["regression.delay=1"],
                                        ["regression.delay=2", "coarse.warmup=wait"],
                                        ["regression.target=relayed", "monitor.every=3",
                                         "monitor.fallback=0.3"], ["coarse.levels=3"],
                                        ["regression.output_errors=true"]])
def test_pit_emulated_equals_mpi_bitwise(overrides):
    res = train_mpi(["train.method=pit"] + overrides)
    comm = world()
    if comm.rank == 0:
        emu = train_emulated(comm.size, ["train.method=pit"] + overrides)
        for k in emu.params:
            np.testing.assert_array_equal(res.params[k], emu.params[k])
        np.testing.assert_array_equal(res.history["loss"], emu.history["loss"])
        np.testing.assert_array_equal(res.history["regression_mse"], emu.history["regression_mse"])
        for k in ("rank_setup_traffic", "rank_iteration_traffic"):  # the same calls
            np.testing.assert_array_equal(res.timing[k], emu.timing[k], err_msg=k)
        if comm.size == 1:
            ref = train_serial_reference([o for o in overrides if not o.startswith("monitor.")])
            for k in ref.params:
                np.testing.assert_array_equal(res.params[k], ref.params[k])


@pytest.mark.mpi(min_size=1)
def test_failing_rank_ends_job(tmp_path_factory):
    """A subprocess job whose last rank raises must end promptly, non-zero."""
    comm = world()
    if comm.rank != 0:
        return
    script = ("import os, sys\n"
              "from pitmpi.cli import main\n"
              "os.environ['PITMPI_FAIL_RANK'] = '1'\n"
              "sys.exit(main(['train', '--quiet', '--set', 'train.method=model-parallel', "
              "'--set', 'model.layers=4', '--set', 'train.epochs=50', "
              "'--out', sys.argv[1]]))\n")
    out = str(tmp_path_factory.mktemp("fail") / "o.h5")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI", "HYDRA", "PMIX"))}
    env["PITMPI_FAIL_RANK"] = "1"
    launcher = mpiexec()
    r = subprocess.run([launcher, "-n", "2", sys.executable, "-c", script, out],
                       capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert r.returncode != 0
    assert "rank 1 of 2 failed" in r.stderr
    assert not os.path.exists(out)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("method", ["data-parallel", "model-parallel", "pit",
                                    "pit --set regression.delay=2",
                                    # pairs held across the checkpoint, refitted later
                                    "pit --set regression.features=state+label "
                                    "--set regression.refit_every=5",
                                    # and a low-rank regression's basis with them
                                    "pit --set regression.features=state "
                                    "--set regression.rank=3 --set regression.refit_every=5"])
def test_resume_is_bitwise_identical_under_mpi(method):
    from pitmpi.cli import main
    from ..test_checkpoint import assert_same_run
    comm = world()
    folder = comm.bcast(tempfile.mkdtemp(prefix="pitmpi-resume-") if comm.rank == 0 else None)
    full, part = os.path.join(folder, "full.h5"), os.path.join(folder, "part.h5")
    args = ["--quiet", "--set", "model.layers=12", "--set", "coarse.iterations=20",
            "--set", f"train.method={method}"]
    args = [a for part in args for a in part.split()]
    assert main(["train", "--out", full, "--set", "train.epochs=3", *args], comm=comm) == 0
    assert main(["train", "--out", part, "--set", "train.epochs=2", *args], comm=comm) == 0
    assert main(["train", "--resume", part, "--set", "train.epochs=3"], comm=comm) == 0
    comm.barrier()
    if comm.rank == 0:
        assert_same_run(full, part)
        shutil.rmtree(folder)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("method, everywhere", [("pit", False), ("model-parallel", False),
                                                ("data-parallel", True)])
def test_only_the_ranks_that_read_the_features_load_them(method, everywhere):
    import logging
    from pitmpi.cli import build_parser, prepare
    comm = world()
    args = build_parser().parse_args(["train", "--quiet", "--set", f"train.method={method}",
                                      "--set", "model.dtype=float32"])
    cfg, ds, trainer, _ = prepare(args, comm, logging.getLogger("test"))
    holds = comm.rank == 0 or everywhere
    assert (ds.x_train is not None) == holds and (trainer.x_train is not None) == holds
    assert ds.n_features == 2 and len(ds.y_train) == 513
    if holds:  # in the network's dtype, held once
        assert trainer.x_train.dtype == np.float32 and trainer.x_train is ds.x_train


@pytest.mark.mpi(min_size=2)
def test_pit_reaches_serial_accuracy_on_the_swiss_roll():
    """The default problem (run/swissroll.toml): pit on N ranks ends within
    0.5 points of serial's final validation accuracy."""
    comm = world()
    toml = os.path.join(REPO, "run", "swissroll.toml")
    cfg = config.load(toml, ["output.progress=false"])
    res = make_trainer(comm, cfg, data.swissroll()).run()
    if comm.rank == 0:
        scfg = config.load(toml, ["output.progress=false", "train.method=serial"])
        ref = run_emulated(1, lambda c: make_trainer(c, scfg, data.swissroll()).run())[0]
        assert res.history["val_acc"][-1] >= ref.history["val_acc"][-1] - 0.005, \
            (res.history["val_acc"][-1], ref.history["val_acc"][-1])


@pytest.mark.mpi(min_size=1)
def test_split_and_dup_match_the_emulated_communicators():
    """MPI's Comm_split gives what the thread communicator's split gives."""
    def body(comm):
        child = comm.split(comm.rank % 2, -comm.rank)
        buf = np.array([float(comm.rank + 1)])
        child.allreduce_sum(buf)
        twin = comm.dup()
        return child.rank, child.size, float(buf[0]), twin.allgather(comm.rank)

    mine = body(world())
    expected = run_emulated(world().size, body)[world().rank]
    assert mine == expected


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("method", ["model-parallel", "pit"])
def test_one_block_replicated_on_every_rank_equals_serial(method):
    """A grid of 1 block x N replicas (N = the MPI size) is the serial
    algorithm with every batch split over the ranks."""
    size = world().size
    res = train_mpi([f"train.method={method}", f"train.data_parallel_size={size}"])
    if world().rank == 0:
        ref = train_serial_reference([])
        for k in ref.params:
            assert np.abs(res.params[k] - ref.params[k]).max() <= 1e-12, k


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", ["float64", "float32", "int64"])
def test_allreduce_gives_the_emulated_bits(dtype):
    """MPIComm.allreduce_sum sums in the emulated communicator's order, not
    in whatever order the MPI library's Allreduce picks: the same bits, so
    that `--emulate N` trains what `mpirun -n N` does.  Sizes below, at and
    above the rank count; values whose sum depends on the order."""
    from pitmpi.parallel.comm import ORDERED_ALLGATHER_BYTES
    assert 100000 * 3 * 4 * 3 > ORDERED_ALLGATHER_BYTES >= 1000 * 3 * 8 * 16  # both paths
    def body(comm):
        rng = np.random.default_rng(comm.rank)
        out = []
        for n in (1, comm.size, 7, 1000, 100000):  # the last beyond ORDERED_ALLGATHER_BYTES
            buf = (rng.standard_normal((n, 3)) * 10.0 ** rng.integers(-8, 8, (n, 3))).astype(dtype) \
                if dtype != "int64" else rng.integers(-1000, 1000, (n, 3))
            out.append(comm.allreduce_sum(buf).copy())
        base = np.arange(40, dtype=dtype).reshape(4, 10) * (comm.rank + 1)
        strided = base[:, ::3]
        comm.allreduce_sum(strided)  # a view with gaps: summed in place too
        out.append(base.copy())
        return out

    comm = world()
    mine = body(comm)
    expected = run_emulated(comm.size, body)[comm.rank]
    for a, b in zip(mine, expected):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


@pytest.mark.mpi(min_size=1)
def test_train_allreduce_mpi_gives_the_library_sum_to_every_split():
    """train.allreduce = "mpi" hands the sums to MPI_Allreduce, on the
    trainer's communicator and on every one split from it; the default sums
    in rank order."""
    comm = world()
    cfg = config.load(None, QUICK + ["train.method=pit", "train.allreduce=mpi"])
    trainer = make_trainer(comm, cfg, data.swissroll())
    child = trainer.comm.split(0, comm.rank)
    assert trainer.comm.allreduce_order == child.allreduce_order == "mpi"
    rng = np.random.default_rng(comm.rank)
    buf = rng.standard_normal(50000)
    ref = np.sum(comm.allgather(buf.copy()), axis=0)
    np.testing.assert_allclose(child.allreduce_sum(buf), ref, rtol=1e-12, atol=1e-12)
    default = make_trainer(world(), config.load(None, QUICK + ["train.method=pit"]),
                           data.swissroll())
    assert default.comm.allreduce_order == default.comm.split(0, 0).allreduce_order == "ordered"
