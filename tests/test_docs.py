"""The documentation stays true: the configuration reference holds every key,
and every command of the quick start runs."""
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

from pitmpi import config

from .conftest import REPO, mpiexec

DOCS = REPO / "docs"


def test_configuration_reference_is_generated_from_the_schema(tmp_path, monkeypatch):
    runpy.run_path(str(DOCS / "conf.py"))  # writes docs/_generated/keys.md
    keys = (DOCS / "_generated" / "keys.md").read_text()
    for section, entries in config.SCHEMA.items():
        for key in entries:
            assert f"`{section}.{key}`" in keys, f"{section}.{key}"
    assert "{include} _generated/keys.md" in (DOCS / "configuration.md").read_text()


def quickstart_commands():
    text = (DOCS / "quickstart.md").read_text()
    return [line.strip() for line in text.splitlines()
            if re.match(r"    (python3 -m pitmpi|mpirun) ", line)]


def test_quickstart_has_the_commands_a_newcomer_needs():
    cmds = quickstart_commands()
    assert any(c.startswith("mpirun -n 2") for c in cmds)
    assert any("report" in c for c in cmds) and any("--emulate" in c for c in cmds)


@pytest.mark.parametrize("command", quickstart_commands())
def test_quickstart_command_runs(tmp_path, command):
    (tmp_path / "run").symlink_to(REPO / "run")
    argv = shlex.split(command, comments=True)
    if argv[0] == "mpirun":
        argv = [mpiexec()] + argv[1:3] + [sys.executable] + argv[4:]
    else:
        argv = [sys.executable] + argv[1:]
    if "report" not in argv:  # the report commands read the file the first command wrote
        argv += ["--quiet"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI", "HYDRA", "PMIX"))}
    env["OMP_NUM_THREADS"] = "1"
    if "report" in argv:
        first = [sys.executable, "-m", "pitmpi", "train", "--quiet", "--set", "train.epochs=2"]
        assert subprocess.run(first, cwd=tmp_path, env=env, timeout=300).returncode == 0
    r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
