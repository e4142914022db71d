"""run/slurm.sh and run/pbs.sh with stand-in scheduler commands: a fresh start,
a resume, and the resubmission when the time limit is reached."""
import os
import stat
import subprocess
import sys

from pitmpi.checkpoint import Checkpoint

from .conftest import REPO

SHIMS = {
    "squeue": "#!/bin/bash\ndate -d '+2 hours' +%Y-%m-%dT%H:%M:%S\n",
    # srun/mpiexec stand-ins: drop launcher options, run one process
    "srun": '#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n',
    "mpiexec": '#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift 2; done\nexec "$@"\n',
    "sbatch": '#!/bin/bash\necho "sbatch $*" >> "$SHIM_LOG"\n',
    "qsub": '#!/bin/bash\necho "qsub $*" >> "$SHIM_LOG"\n',
}
# a time limit that strikes after the run: the run completes, then 124 as if killed
EXPIRED = '#!/bin/bash\nshift 2\n"$@"\nexit 124\n'


def shim_env(tmp_path, expired=False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in dict(SHIMS, **({"timeout": EXPIRED} if expired else {})).items():
        p = bin_dir / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("[model]\nlayers = 4\n[train]\nepochs = 2\nmethod = 'serial'\n"
                   "[output]\nprogress = false\n")
    nodes = tmp_path / "nodes"
    nodes.write_text("node1\n")
    # the scripts run "$PYTHON -m pitmpi": this interpreter, however it was
    # started (a symlink to a venv's python would lose the venv's packages)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable,
               SLURM_JOB_ID="1",
               CONFIG=str(cfg), OUT=str(tmp_path / "o.h5"), SHIM_LOG=str(tmp_path / "log"),
               PBS_NODEFILE=str(nodes), PBS_O_WORKDIR=str(REPO))
    return env


def script(name, env, **extra):
    return subprocess.run(["bash", str(REPO / "run" / name)], env=dict(env, **extra), cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_slurm_script_starts_resumes_and_resubmits(tmp_path):
    env = shim_env(tmp_path)
    r = script("slurm.sh", env)
    assert r.returncode == 0, r.stderr
    assert Checkpoint(env["OUT"]).epochs_done == 2
    r = script("slurm.sh", env, EXTRA="--set train.epochs=3")
    assert r.returncode == 0, r.stderr
    assert Checkpoint(env["OUT"]).epochs_done == 3
    env = shim_env(tmp_path, expired=True)
    r = script("slurm.sh", env, EXTRA="--set train.epochs=4")
    assert r.returncode == 0, r.stderr
    assert "resubmitting with --resume" in r.stderr
    assert Checkpoint(env["OUT"]).epochs_done == 4
    log = (tmp_path / "log").read_text()
    assert "RESUBMIT_COUNT=1" in log and "EXTRA=--set train.epochs=4" in log


def test_pbs_script_starts_and_resubmits(tmp_path):
    env = shim_env(tmp_path)
    r = script("pbs.sh", env)
    assert r.returncode == 0, r.stderr
    assert Checkpoint(env["OUT"]).epochs_done == 2
    r = script("pbs.sh", shim_env(tmp_path, expired=True), EXTRA="--set train.epochs=3")
    assert r.returncode == 0 and "resubmitting" in r.stderr, r.stderr
    assert "qsub -v" in (tmp_path / "log").read_text()
    assert Checkpoint(env["OUT"]).epochs_done == 3


def test_scripts_have_no_personal_paths():
    for name in ("slurm.sh", "pbs.sh"):
        text = (REPO / "run" / name).read_text()
        assert "/home/" not in text and "/work/" not in text and "/Users/" not in text
