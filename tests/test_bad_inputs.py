"""Every bad input: one-line error naming the key or file, exit code 2 on every
rank, no output file (issue: robustness).  Run on 2 emulated ranks, so each
case also checks that all ranks exit."""
import warnings

import numpy as np
import pytest

from pitmpi.cli import main
from pitmpi.parallel.comm import run_emulated


def npz_file(tmp_path, **change):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.standard_normal((40, 2)), "y_train": np.arange(40) % 2,
              "x_test": rng.standard_normal((10, 2)), "y_test": np.arange(10) % 2}
    arrays.update(change)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return str(path)


def text_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# (argv after "train", expected text in the message); "{tmp}" is the test folder
CASES = {
    "unknown key": (["--set", "model.layerz=3"], "unknown key model.layerz; allowed in [model]"),
    "unknown section": (["--set", "modl.layers=3"], "unknown section [modl]; allowed: data, model"),
    "zero layers": (["--set", "model.layers=0"], "model.layers = 0 is not allowed; expected an integer >= 1"),
    "fractional layers": (["--set", "model.layers=2.5"], "model.layers = 2.5 is not allowed"),
    "negative width": (["--set", "model.width=-4"], "model.width = -4 is not allowed; expected an integer >= 1"),
    "zero T": (["--set", "model.T=0"], "model.T = 0 is not allowed; expected a number > 0.0"),
    "unknown scheme": (["--set", "model.scheme=rk4"], "model.scheme = 'rk4' is not allowed; expected one of 'euler', 'verlet'"),
    "unknown dtype": (["--set", "model.dtype=float16"], "model.dtype = 'float16' is not allowed"),
    "zero lr": (["--set", "train.lr=0"], "train.lr = 0 is not allowed; expected a number > 0.0"),
    "negative lr": (["--set", "train.lr=-0.1"], "train.lr = -0.1 is not allowed"),
    "text lr": (["--set", "train.lr=fast"], "train.lr = 'fast' is not allowed; expected a number"),
    "momentum above 1": (["--set", "train.momentum=1.5"], "train.momentum = 1.5 is not allowed"),
    "negative epochs": (["--set", "train.epochs=-3"], "train.epochs = -3 is not allowed"),
    "zero batch": (["--set", "train.batch_size=0"], "train.batch_size = 0 is not allowed"),
    "batch above samples": (["--set", "train.batch_size=100000"], "larger than the 513 training samples"),
    "unknown method": (["--set", "train.method=sgd"], "train.method = 'sgd' is not allowed; expected one of 'serial'"),
    "coarse factor 1": (["--set", "coarse.factor=1"], "coarse.factor = 1 is not allowed; expected an integer >= 2"),
    "layers off the coarse grid": (["--set", "model.layers=7"], "model.layers = 7 is not a multiple of coarse.factor = 2"),
    "more blocks than layers": (["--set", "model.layers=2", "--set", "coarse.factor=2"],
                                "cannot be split into 2 blocks"),
    "serial on 2 ranks": (["--set", "train.method=serial"], "runs on one rank, but this job has 2"),
    "forgetting zero": (["--set", "regression.forgetting=0"], "regression.forgetting = 0 is not allowed; expected a number > 0.0"),
    "unknown features": (["--set", "regression.features=poly"], "regression.features = 'poly' is not allowed"),
    "negative delay": (["--set", "regression.delay=-1"], "regression.delay = -1 is not allowed; expected an integer >= 0"),
    "rank above the state width": (["--set", "regression.rank=33"],
                                   "regression.rank = 33 is not allowed: at most the boundary "
                                   "state's width, 32 here"),
    "negative monitor interval": (["--set", "monitor.every=-1"],
                                  "monitor.every = -1 is not allowed; expected an integer >= 0"),
    "monitor without predictions": (["--set", "monitor.every=5", "--set", "train.method=model-parallel"],
                                    "monitor.every = 5 measures the error of pit's predicted "
                                    "co-states; train.method = 'model-parallel' uses exact ones"),
    "negative fallback bound": (["--set", "monitor.fallback=-0.5"],
                                "monitor.fallback = -0.5 is not allowed; expected a number >= 0.0"),
    "fallback without the monitor": (["--set", "monitor.fallback=0.8"],
                                     "monitor.fallback = 0.8 is not allowed with monitor.every = 0"),
    "fallback with a delay": (["--set", "monitor.fallback=0.8", "--set", "monitor.every=4",
                               "--set", "regression.delay=1"],
                              "monitor.fallback is not allowed with regression.delay = 1"),
    "unknown regression target": (["--set", "regression.target=exact"],
                                  "regression.target = 'exact' is not allowed; expected one of "
                                  "'neighbour', 'relayed'"),
    "relayed with a delay": (["--set", "regression.target=relayed", "--set", "regression.delay=2"],
                             "regression.target = 'relayed' is not allowed with "
                             "regression.delay = 2"),
    "unknown damping": (["--set", "regression.damping=always"],
                        "regression.damping = 'always' is not allowed; expected one of 'none', 'error'"),
    "relay every 0": (["--set", "regression.relay_every=0"],
                      "regression.relay_every = 0 is not allowed; expected an integer >= 1"),
    "negative clip": (["--set", "regression.clip=-1"],
                      "regression.clip = -1 is not allowed; expected a number >= 0.0"),
    "negative warm-up": (["--set", "train.lr_warmup=-2"],
                         "train.lr_warmup = -2 is not allowed; expected a number >= 0.0"),
    "unknown allreduce": (["--set", "train.allreduce=fast"],
                          "train.allreduce = 'fast' is not allowed; expected one of 'ordered', 'mpi'"),
    "unknown lr_per": (["--set", "train.lr_per=second"],
                       "train.lr_per = 'second' is not allowed; expected one of 'time', 'layer'"),
    "grid not dividing the ranks": (["--set", "train.data_parallel_size=3"],
                                    "train.data_parallel_size = 3 is not allowed with 2 ranks"),
    "grid wider than a batch": (["--set", "train.data_parallel_size=2", "--set", "train.batch_size=1"],
                                "train.data_parallel_size = 2 is larger than train.batch_size = 1"),
    "grid for data-parallel": (["--set", "train.data_parallel_size=2", "--set",
                                "train.method=data-parallel"],
                               "train.method = 'data-parallel' has no layer blocks"),
    "output errors not a boolean": (["--set", "regression.output_errors=maybe"],
                                    "regression.output_errors = 'maybe' is not allowed; expected true or false"),
    "zero levels": (["--set", "coarse.levels=0"], "coarse.levels = 0 is not allowed; expected an integer >= 1"),
    "layers off a 3-level grid": (["--set", "coarse.levels=3", "--set", "model.layers=6"],
                                  "model.layers = 6 is not a multiple of coarse.factor ** "
                                  "(coarse.levels - 1) = 2 ** 2 = 4"),
    "too many levels for the blocks": (["--set", "coarse.levels=5", "--set", "model.layers=16"],
                                       "model.layers = 16 cannot be split into 2 blocks on the "
                                       "coarse grid (multiples of coarse.factor ** (coarse.levels"
                                       " - 1) = 2 ** 4 = 16); use at least 32 layers, fewer "
                                       "blocks (fewer ranks, or train.max_blocks) or fewer "
                                       "coarse.levels"),
    "negative block cap": (["--set", "train.max_blocks=-1"],
                           "train.max_blocks = -1 is not allowed; expected an integer >= 0"),
    "block cap leaving replicas wider than a batch": (
        ["--set", "train.max_blocks=1", "--set", "train.batch_size=1"],
        "train.max_blocks = 1 on 2 ranks makes 2 replicas of each block, more than "
        "train.batch_size = 1"),
    "zero replicas": (["--set", "train.data_parallel_size=0"],
                      "train.data_parallel_size = 0 is not allowed; expected an integer >= 1"),
    "label smoothing above a half": (["--set", "train.label_smoothing=0.6"],
                                     "train.label_smoothing = 0.6 is not allowed; expected a number >= 0.0 <= 0.5"),
    "conv on points": (["--set", "model.kind=conv"],
                       "model.kind = 'conv' needs images, but data.name = 'swissroll' has 2 "
                       "features per sample"),
    "unknown model kind": (["--set", "model.kind=graph"],
                           "model.kind = 'graph' is not allowed; expected one of 'dense', 'conv'"),
    "even kernel": (["--set", "model.kernel=2"],
                    "model.kernel = 2 is not allowed; expected one of 1, 3, 5, 7"),
    "zero stride": (["--set", "model.stride=0"],
                    "model.stride = 0 is not allowed; expected an integer >= 1"),
    "zero channels": (["--set", "model.channels=0"],
                      "model.channels = 0 is not allowed; expected an integer >= 1"),
    "pooled classifier on a dense net": (["--set", "model.classifier=pool"],
                                         "model.classifier = 'pool' is not allowed with "
                                         "model.kind = 'dense'"),
    "pooled regression on a dense net": (["--set", "regression.pool=2"],
                                         "regression.pool = 2 is not allowed with model.kind = "
                                         "'dense'"),
    "negative regression pool": (["--set", "regression.pool=-1"],
                                 "regression.pool = -1 is not allowed; expected an integer >= 0"),
    "conv regression too large": (lambda t: ["--set", "data.name=npz", "--set", "data.path=" + npz_file(
        t, x_train=np.random.default_rng(1).random((40, 1, 48, 48)),
        x_test=np.random.default_rng(2).random((10, 1, 48, 48))),
        "--set", "model.kind=conv", "--set", "model.channels=2", "--set", "model.layers=4"],
        "the co-state regression at a boundary would hold"),
    "many_blocks sets the method": (["--set", "many_blocks.train.method=serial"],
                                    "many_blocks.train.method is not allowed: train.method "
                                    "decides the number of blocks"),
    "many_blocks sets the grid": (["--set", "many_blocks.train.data_parallel_size=2"],
                                  "many_blocks.train.data_parallel_size is not allowed"),
    "many_blocks caps the blocks": (["--set", "many_blocks.train.max_blocks=2"],
                                    "many_blocks.train.max_blocks is not allowed: "
                                    "train.max_blocks decides the number of blocks"),
    "many_blocks sets the model": (["--set", "many_blocks.model.width=8"],
                                   "unknown section [many_blocks.model]; allowed: "
                                   "[many_blocks.train], [many_blocks.coarse]"),
    "many_blocks key typo": (["--set", "many_blocks.regression.targt=relayed"],
                             "unknown key many_blocks.regression.targt; allowed in "
                             "[many_blocks.regression]: features"),
    "many_blocks bad value": (["--set", "many_blocks.regression.target=exact"],
                              "many_blocks.regression.target = 'exact' is not allowed; "
                              "expected one of 'neighbour', 'relayed'"),
    "many_blocks without a section": (["--set", "many_blocks.relay_every=2"],
                                      "the name must be many_blocks.section.key"),
    "many_blocks value as section": (lambda t: [text_file(t, "c.toml", "[many_blocks]\nx = 1\n")],
                                     "many_blocks.x must be a section [many_blocks.<section>]"),
    "bool as int": (["--set", "output.progress=1"], "output.progress = 1 is not allowed; expected true or false"),
    "override without =": (["--set", "justtext"], "expected section.key=value"),
    "unknown dataset": (["--set", "data.name=cifar"], "data.name = 'cifar' is not allowed"),
    "mnist dir missing": (["--set", "data.name=mnist", "--set", "data.path=/nonexistent/dir"],
                          "data.path '/nonexistent/dir' is not a directory"),
    "npz missing": (["--set", "data.name=npz", "--set", "data.path=/nonexistent.npz"], "/nonexistent.npz: file not found"),
    "npz NaN features": (lambda t: ["--set", "data.name=npz", "--set",
                                    "data.path=" + npz_file(t, x_train=np.full((40, 2), np.nan))],
                         "x_train holds NaN or Inf"),
    "npz features overflow": (lambda t: ["--set", "data.name=npz", "--set", "data.path=" + npz_file(
        t, x_train=np.random.default_rng(1).standard_normal((40, 2)) * 1e300)],
        "d.npz: x_train: the features' mean or spread overflows float64"),
    "npz test features overflow": (lambda t: ["--set", "data.name=npz", "--set", "data.path=" + npz_file(
        t, x_test=np.full((10, 2), 1e300)), "--set", "model.dtype=float32"],
        "d.npz: x_test: standardised with the training mean and spread, the features leave "
        "the range of float32"),
    "npz constant features": (lambda t: ["--set", "data.name=npz", "--set",
                                         "data.path=" + npz_file(t, x_train=np.ones((40, 2)))],
                              "d.npz: x_train: every feature is constant (zero spread)"),
    "npz single class": (lambda t: ["--set", "data.name=npz", "--set",
                                    "data.path=" + npz_file(t, y_train=np.full(40, 3))],
                         "d.npz: y_train holds a single class (label 3); classification needs "
                         "at least two"),
    "npz test label unseen": (lambda t: ["--set", "data.name=npz", "--set",
                                         "data.path=" + npz_file(t, y_test=np.arange(10) % 3)],
                              "d.npz: y_test holds label 2, which y_train never has (its labels "
                              "go up to 1)"),
    "npz negative labels": (lambda t: ["--set", "data.name=npz", "--set",
                                       "data.path=" + npz_file(t, y_test=-np.ones(10, int))],
                            "y_test holds negative labels"),
    "npz label count": (lambda t: ["--set", "data.name=npz", "--set",
                                   "data.path=" + npz_file(t, y_train=np.zeros(39, int))],
                        "y_train has shape (39,); expected (40,)"),
    "npz empty split": (lambda t: ["--set", "data.name=npz", "--set",
                                   "data.path=" + npz_file(t, x_test=np.zeros((0, 2)), y_test=np.zeros(0, int))],
                        "x_test has shape (0, 2)"),
    "npz missing key": (lambda t: ["--set", "data.name=npz", "--set",
                                   "data.path=" + npz_file(t, y_test=None)], "missing key(s) y_test"),
    "npz not a zip": (lambda t: ["--set", "data.name=npz", "--set",
                                 "data.path=" + text_file(t, "x.npz", "hello")], "not a readable .npz file"),
    "config not TOML": (lambda t: [text_file(t, "c.toml", "[model\nlayers = 3\n")], "not valid TOML"),
    "config missing": (lambda t: [str(t / "none.toml")], "config file not found"),
    "config key typo": (lambda t: [text_file(t, "c.toml", "[model]\nsheme = 'euler'\n")], "unknown key model.sheme"),
    "config value as section": (lambda t: [text_file(t, "c.toml", "model = 3\n")], "model must be a section"),
    "output is a directory": (lambda t: ["--out", str(t)], "is a directory; name an .h5 file"),
    "output under a file": (lambda t: ["--out", text_file(t, "f", "") + "/x.h5"], "is not a directory"),
    "resume missing": (lambda t: ["--resume", str(t / "none.h5")], "checkpoint file not found"),
    "resume not HDF5": (lambda t: ["--resume", text_file(t, "r.h5", "text")], "not a readable HDF5 file"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(tmp_path, capsys, case):
    argv, message = CASES[case]
    argv = argv(tmp_path) if callable(argv) else argv
    out = tmp_path / "out.h5"
    if "--out" not in argv and "--resume" not in argv:
        argv = argv + ["--out", str(out)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        codes = run_emulated(2, lambda comm: main(["train", "--quiet", *argv], comm=comm))
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], caught
    assert codes == [2, 2]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("pitmpi: error: ") and message in err[0], err[0]
    assert not out.exists()
    assert not [p for p in tmp_path.rglob("*.h5") if p.name not in ("r.h5",)]


def test_at_least_25_cases():
    assert len(CASES) >= 25
