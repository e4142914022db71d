import importlib.util
import os
import pathlib
import shutil
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def mnist_dir():
    """MNIST IDX directory: $PITMPI_DATA, else ../shared/data/mnist beside the repo."""
    for cand in (os.environ.get("PITMPI_DATA"), REPO.parent / "shared" / "data" / "mnist"):
        if cand and (pathlib.Path(cand) / "train-images-idx3-ubyte.gz").is_file():
            return str(cand)
    return None


@pytest.fixture
def mnist_path():
    path = mnist_dir()
    if path is None:
        pytest.skip("MNIST files not found: set PITMPI_DATA to the directory of the IDX files")
    return path


def run_script(name):
    """The module ``run/NAME.py`` (the benchmark scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "run" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mpiexec():
    """The MPI launcher for tests that start their own MPI jobs:
    ``$PITMPI_TEST_MPIEXEC``, else the ``mpiexec`` beside this interpreter (the
    MPICH wheel installs it into the same environment, activated or not),
    else the one on ``PATH``."""
    if os.environ.get("PITMPI_TEST_MPIEXEC"):
        return os.environ["PITMPI_TEST_MPIEXEC"]
    beside = pathlib.Path(sys.executable).parent / "mpiexec"
    if beside.is_file():
        return str(beside)
    return shutil.which("mpiexec") or "mpiexec"
