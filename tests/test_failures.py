"""Divergence stops the run and keeps the last checkpoint; a killed rank ends the job."""
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings

import pytest

from pitmpi.checkpoint import Checkpoint
from pitmpi.cli import main
from pitmpi.parallel.comm import EmulationAborted, run_emulated

from .conftest import REPO, mpiexec

BASE = ["--quiet", "--set", "model.layers=8", "--set", "coarse.iterations=20"]


def run(size, argv):
    return run_emulated(size, lambda comm: main(argv, comm=comm))


@pytest.mark.parametrize("size,method", [(1, "serial"), (2, "pit"), (2, "model-parallel"),
                                         (2, "data-parallel")])
def test_divergence_stops_and_keeps_the_last_checkpoint(tmp_path, capsys, size, method):
    path = tmp_path / "d.h5"
    argv = ["train", *BASE, "--set", f"train.method={method}", "--out", str(path)]
    assert run(size, argv + ["--set", "train.epochs=1"]) == [0] * size
    good = path.read_bytes()
    capsys.readouterr()
    resume = ["train", "--resume", str(path), "--set", "train.epochs=5", "--set", "train.lr=1e6",
              "--set", "output.checkpoint_every=1"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if size == 1:
            assert run(1, resume) == [3]
        else:  # the diverging rank aborts the job; the other ranks are stopped
            with pytest.raises(EmulationAborted):
                run(size, resume)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], caught
    err = capsys.readouterr().err
    assert "pitmpi: training diverged on rank" in err
    assert "(epoch 2)" in err and "try a smaller train.lr (now 1e+06)" in err
    assert f"the checkpoint of epoch 1 in {path} is kept" in err
    assert path.read_bytes() == good  # the last good checkpoint is untouched
    assert Checkpoint(str(path)).epochs_done == 1


def test_exploding_loss_is_divergence(tmp_path, capsys):
    argv = ["train", *BASE, "--set", "train.method=serial", "--set", "train.max_loss=0.01",
            "--out", str(tmp_path / "x.h5")]
    assert run(1, argv) == [3]
    err = capsys.readouterr().err
    assert "exceeds train.max_loss = 0.01" in err and "iteration 0 (epoch 1)" in err
    assert "no checkpoint was written" in err
    assert not (tmp_path / "x.h5").exists()


COARSE_DIVERGES = ["--set", "train.lr=1e308", "--set", "train.epochs=2"]


def test_coarse_phase_divergence_stops_at_its_first_bad_loss(tmp_path, capsys):
    out = tmp_path / "c.h5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(EmulationAborted):  # rank 0 ends the job; rank 1 waited for it
            run(2, ["train", *BASE, *COARSE_DIVERGES, "--out", str(out)])
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], caught
    # (emulated, rank 1 then reports the abort it was stopped by; MPI kills it)
    err = [line for line in capsys.readouterr().err.splitlines() if "diverged" in line]
    assert len(err) == 1, err
    assert err[0].startswith("pitmpi: training diverged in the coarse phase (global prediction) "
                             "at coarse iteration 1 of 20: the batch loss is "), err[0]
    assert "try a smaller coarse.lr (now 1e+308, from coarse.lr = 0, so train.lr)" in err[0]
    assert "or fewer coarse.iterations (now 20)" in err[0]
    assert not out.exists()


def test_coarse_phase_divergence_under_mpiexec_prints_no_numpy_warning(tmp_path):
    out = tmp_path / "c.h5"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI", "HYDRA", "PMIX"))}
    r = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-m", "pitmpi", "train", *BASE,
                        *COARSE_DIVERGES, "--out", str(out)],
                       capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert r.returncode != 0
    assert "pitmpi: training diverged in the coarse phase" in r.stderr, r.stderr
    assert "Warning" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "global prediction done" not in r.stdout + r.stderr
    assert not out.exists()


def test_emulate_under_mpiexec_is_bad_input(tmp_path):
    out = tmp_path / "e.h5"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI", "HYDRA", "PMIX"))}
    r = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-m", "pitmpi", "train", *BASE,
                        "--emulate", "4", "--out", str(out)],
                       capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--emulate 4 runs its ranks as threads of one process, but this " \
        "job has 2 MPI processes" in lines[0], r.stderr
    assert not out.exists()


def rank_pid(tag, rank, timeout=60):
    """PID of the MPI process with PMI_RANK=rank among those started with PITMPI_TEST_TAG=tag."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if f"PITMPI_TEST_TAG={tag}".encode() in env and f"PMI_RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.2)
    raise TimeoutError("rank process not found")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the rank's process")
def test_killed_rank_ends_the_job_and_the_checkpoint_resumes(tmp_path):
    path = tmp_path / "k.h5"
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI", "HYDRA", "PMIX"))}
    env.update(PITMPI_TEST_TAG=tag, OMP_NUM_THREADS="1")
    launcher = mpiexec()
    cmd = [launcher, "-n", "2", sys.executable, "-m", "pitmpi", "train", *BASE,
           "--set", "train.epochs=100000", "--set", "output.checkpoint_every=1", "--out", str(path)]
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.1)
        assert path.exists(), job.communicate(timeout=5)
        time.sleep(0.5)
        os.kill(rank_pid(tag, 1), signal.SIGKILL)
        t = time.monotonic()
        job.wait(timeout=60)
        ended = time.monotonic() - t
    finally:
        if job.poll() is None:
            job.kill()
    print(f"job ended {ended:.2f} s after SIGKILL of rank 1, exit code {job.returncode}")
    assert job.returncode != 0
    assert ended < 30, f"job took {ended:.1f} s to end after the kill"
    done = Checkpoint(str(path)).epochs_done
    assert done >= 1
    r = subprocess.run([launcher, "-n", "2", sys.executable, "-m", "pitmpi", "train", "--resume",
                        str(path), "--set", f"train.epochs={done + 1}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Checkpoint(str(path)).epochs_done == done + 1


@pytest.mark.parametrize("argv,message", [
    (["--set", "train.method=serial"], "runs on one rank, but this job has 2"),
    (["--set", "model.layers=2"], "cannot be split into 2 blocks"),
    (["--set", "train.lr=0"], "train.lr = 0 is not allowed"),
    (["--resume", "/nonexistent/x.h5"], "checkpoint file not found"),
])
def test_bad_input_under_mpiexec_ends_every_rank(tmp_path, argv, message):
    """Real MPI, 2 processes: exit code 2, one error line, no output file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI", "HYDRA", "PMIX"))}
    launcher = mpiexec()
    out = tmp_path / "o.h5"
    r = subprocess.run([launcher, "-n", "2", sys.executable, "-m", "pitmpi", "train", "--quiet",
                        "--out", str(out), *argv], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("pitmpi: error: ") and message in lines[0], lines
    assert not out.exists()
