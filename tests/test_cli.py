"""The command line: errors (exit 2, one line, no output file) and a real run."""
import subprocess
import sys

import h5py
import numpy as np
import pytest

from pitmpi import PARAM_NAMES, config
from pitmpi.cli import main
from pitmpi.parallel.comm import run_emulated

from .conftest import REPO

QUICK = ["--set", "train.epochs=2", "--set", "model.layers=4", "--quiet"]


def run_main(argv, size=1):
    return run_emulated(size, lambda comm: main(argv, comm=comm))


def test_bad_config_files(tmp_path, capsys):
    out = tmp_path / "o.h5"
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nlayers = 3\n")
    assert run_main(["train", str(bad), "--out", str(out)]) == [2]
    assert "not valid TOML" in capsys.readouterr().err
    assert run_main(["train", str(tmp_path / "none.toml"), "--out", str(out)]) == [2]
    assert "config file not found" in capsys.readouterr().err
    bad.write_text("[model]\nlayers = 3\nsheme = 'euler'\n")
    assert run_main(["train", str(bad), "--out", str(out)]) == [2]
    assert "unknown key model.sheme" in capsys.readouterr().err
    assert not out.exists()


def test_unwritable_output(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert run_main(["train", "--out", str(tmp_path / "f" / "x.h5")] + QUICK) == [2]
    assert "is not a directory" in capsys.readouterr().err


def test_serial_on_several_ranks_is_an_error(tmp_path, capsys):
    out = tmp_path / "o.h5"
    assert run_main(["train", "--set", "train.method=serial", "--out", str(out)], size=2) == [2, 2]
    err = capsys.readouterr().err
    assert err.count("pitmpi: error:") == 1 and "runs on one rank" in err
    assert not out.exists()


def test_train_writes_documented_file(tmp_path):
    out = tmp_path / "sub" / "r.h5"
    assert run_main(["train", str(REPO / "run" / "swissroll.toml"), "--out", str(out),
                     "--set", "train.method=serial"] + QUICK) == [0]
    with h5py.File(out, "r") as f:
        assert f.attrs["method"] == "serial" and f.attrs["ranks"] == 1
        cfg = config.load(None)
        assert "[model]" in f.attrs["config"] and f.attrs["pitmpi_version"]
        assert sorted(f["params"]) == sorted(PARAM_NAMES)
        assert f["params/K"].shape == (4, cfg["model"]["width"], cfg["model"]["width"])
        for name in ("train_acc", "val_acc", "epoch_wall", "train_loss", "val_loss"):
            assert f["history"][name].shape == (2,)
        assert f["history/loss"].shape == (2 * (513 // 32),)
        assert np.all(np.diff(f["history/epoch_wall"][()]) > 0)
        assert f["timing/train_wall"][()] > 0


def test_module_entry_point_help_and_keys():
    r = subprocess.run([sys.executable, "-m", "pitmpi", "train", "--help"], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 0 and "--set" in r.stdout
    r = subprocess.run([sys.executable, "-m", "pitmpi", "keys"], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 0 and "`model.scheme`" in r.stdout


def test_train_is_the_default_command(tmp_path):
    out = tmp_path / "d.h5"
    assert run_main(["--set", "train.method=serial", "--out", str(out)] + QUICK) == [0]
    assert out.exists()


def test_subprocess_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pitmpi", "train", "--set", "model.width=-1",
                        "--out", str(tmp_path / "x.h5")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip() == ("pitmpi: error: model.width = -1 is not allowed; "
                                "expected an integer >= 1")
    assert not (tmp_path / "x.h5").exists()


def test_several_ranks_share_the_cores_among_their_blas_threads(monkeypatch):
    import logging
    import os
    from threadpoolctl import threadpool_info
    from pitmpi.cli import THREAD_VARIABLES, share_cores

    class FourRanksHere:
        size = 4

        def local_size(self):
            return 4

    log = logging.getLogger("test")
    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    limiter = share_cores(FourRanksHere(), log)
    try:
        blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        cores = os.cpu_count()
        mine = len(os.sched_getaffinity(0))
        assert blas and max(blas) == (mine if mine < cores else max(1, cores // 4))
    finally:
        limiter.restore_original_limits()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    assert share_cores(FourRanksHere(), log) is None



def test_many_blocks_values_apply_from_4_pit_blocks_under_the_command_line(tmp_path):
    """Defaults < file < [many_blocks] (package's, then the file's) < --set,
    the overlay only for pit on 4 blocks or more; a saved config keeps the
    resolved values and the overlay, and is not resolved again."""
    toml = tmp_path / "c.toml"
    toml.write_text("[regression]\ndelay = 1\nforgetting = 0.9\n"
                    "[many_blocks.regression]\nforgetting = 0.95\ndelay = 0\n"
                    "target = 'relayed'\nrelay_every = 4\n"
                    "[many_blocks.coarse]\niterations = 1200\n")
    few = config.load(toml, [], ranks=3)
    assert few["regression"]["delay"] == 1 and few["regression"]["target"] == "neighbour"
    assert few["regression"]["forgetting"] == 0.9 and few["coarse"]["iterations"] == 600
    many = config.load(toml, ["regression.relay_every=2"], ranks=8)
    assert many["regression"]["target"] == "relayed" and many["regression"]["delay"] == 0
    assert many["regression"]["forgetting"] == 0.95 and many["coarse"]["iterations"] == 1200
    assert many["regression"]["relay_every"] == 2  # --set wins over the overlay
    for other in (["train.method=model-parallel"], ["train.data_parallel_size=4"]):
        assert config.load(toml, other, ranks=8)["regression"]["target"] == "neighbour"
    assert config.load(toml, ["train.data_parallel_size=2"], ranks=8)["regression"]["target"] == "relayed"
    assert config.load(toml, ["many_blocks.regression.target=neighbour"],
                       ranks=8)["regression"]["target"] == "neighbour"
    saved = config.loads(config.to_toml(many))
    assert saved == many and config.loads(config.to_toml(few)) == few
    assert saved["many_blocks"]["coarse"]["iterations"] == 1200


def test_the_package_many_blocks_values_are_relayed_damped_and_shared():
    few, many = config.load(None, [], ranks=3), config.load(None, [], ranks=4)
    assert (few["regression"]["target"], few["regression"]["damping"],
            few["coarse"]["parallel"]) == ("neighbour", "none", "rank0")
    assert (many["regression"]["target"], many["regression"]["relay_every"],
            many["regression"]["delay"], many["regression"]["damping"],
            many["coarse"]["parallel"]) == ("relayed", 4, 0, "error", "data-parallel")
    assert {k: many[s][k] for s in ("model", "data", "train") for k in many[s]} == \
        {k: few[s][k] for s in ("model", "data", "train") for k in few[s]}


@pytest.mark.parametrize("ranks,replicas,levels", [(2, 1, 2), (4, 1, 4), (8, 2, 4), (16, 4, 4),
                                                   (12, 3, 4), (6, 2, 2)])
def test_the_shipped_swiss_roll_runs_at_most_four_blocks(ranks, replicas, levels):
    """run/swissroll.toml: 4 blocks at most, replicated on the other ranks, and
    from 4 blocks on four coarse levels (3 blocks take no [many_blocks] values)."""
    cfg = config.load(REPO / "run" / "swissroll.toml", [], ranks=ranks)
    assert config.replicas_of(cfg, ranks) == replicas
    assert cfg["coarse"]["levels"] == levels
    lifted = config.load(REPO / "run" / "swissroll.toml", ["train.max_blocks=0"], ranks=ranks)
    assert config.replicas_of(lifted, ranks) == 1
