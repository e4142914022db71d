"""Dataset recipes and loaders, including the errors for bad files."""
import gzip
import os
import shutil

import numpy as np
import pytest

from pitmpi import data
from pitmpi.errors import DataError


def test_swissroll_recipe():
    ds = data.swissroll()
    assert ds.x_train.shape == (513, 2) and ds.x_val.shape == (513, 2)
    # rebuild the raw points and check the even/odd split before standardising
    theta = np.arange(0, 4 * np.pi + 1e-12, 4 * np.pi / 512)
    assert theta.size == 513
    r0, r1 = np.linspace(0, 1, 513), np.linspace(0.2, 1.2, 513)
    raw = np.vstack([np.c_[r0 * np.cos(theta), r0 * np.sin(theta)],
                     np.c_[r1 * np.cos(theta), r1 * np.sin(theta)]])
    train = raw[0::2]
    np.testing.assert_allclose(ds.x_train, (train - train.mean(0)) / train.std(0), atol=1e-12)
    assert ds.y_train.sum() == 256 and ds.y_val.sum() == 257
    np.testing.assert_allclose(ds.x_train.mean(0), 0, atol=1e-12)


def test_ellipses_recipe_and_seed():
    a, b = data.ellipses(seed=3), data.ellipses(seed=3)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.x_train.shape == (2000, 2) and a.x_val.shape == (400, 2)
    assert not np.array_equal(a.x_train, data.ellipses(seed=4).x_train)
    np.testing.assert_array_equal(np.bincount(a.y_train), [1000, 1000])


def test_mnist_loads_with_checks(mnist_path):
    ds = data.mnist(mnist_path)
    assert ds.x_train.shape == (60000, 784) and ds.x_val.shape == (10000, 784)
    np.testing.assert_array_equal(np.bincount(ds.y_train),
                                  [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])


@pytest.mark.parametrize("name", ["swissroll", "ellipses", "mnist"])
def test_features_come_in_the_dtype_asked_for_as_the_float64_ones_rounded(name, request):
    # standardised chunk by chunk straight into float32: the float64 numbers
    # rounded once (MNIST: 60,000 rows carried over 8 chunks for the mean)
    path = request.getfixturevalue("mnist_path") if name == "mnist" else None
    wide = data.load(name, path)
    narrow = data.load(name, path, dtype="float32")
    assert wide.x_train.dtype == np.float64 and narrow.x_train.dtype == np.float32
    assert narrow.x_train.flags.c_contiguous and narrow.x_val.flags.c_contiguous
    np.testing.assert_array_equal(narrow.x_train, wide.x_train.astype(np.float32))
    np.testing.assert_array_equal(narrow.x_val, wide.x_val.astype(np.float32))
    np.testing.assert_allclose(wide.x_train.mean(axis=0), 0.0, atol=1e-9)


def test_standardise_in_chunks_matches_one_pass():
    rng = np.random.default_rng(0)
    xt, xv = rng.standard_normal((1000, 5)) * 3.0 + 2.0, rng.standard_normal((30, 5))
    xt[:, 2] = 7.0  # a constant feature is only centred
    one = data.standardise(xt, xv, chunk=5000)
    many = data.standardise(xt, xv, chunk=64)
    for a, b in zip(one, many):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(one[0][:, 2], 0.0)
    np.testing.assert_allclose(one[0].std(axis=0)[[0, 1, 3, 4]], 1.0, rtol=1e-12)
    assert xt[0, 2] == 7.0  # the inputs are left alone


@pytest.mark.parametrize("name", ["swissroll", "mnist"])
def test_labels_only_loads_no_features(name, request):
    path = request.getfixturevalue("mnist_path") if name == "mnist" else None
    full = data.load(name, path, n_train=300)
    labels = data.load(name, path, n_train=300, features=False)
    assert labels.x_train is None and labels.x_val is None
    assert labels.n_features == full.n_features and labels.n_classes == full.n_classes
    np.testing.assert_array_equal(labels.y_train, full.y_train)
    np.testing.assert_array_equal(labels.y_val, full.y_val)
    assert labels.summary() == full.summary()


def test_loaded_data_are_read_only():
    ds = data.load("ellipses", n_train=50)
    for a in (ds.x_train, ds.y_train, ds.x_val, ds.y_val):
        with pytest.raises(ValueError, match="read-only"):
            a[0] = 0
    with pytest.raises(AttributeError):
        ds.x_train = None


def test_equal_loads_share_one_dataset_within_sharing_only(monkeypatch):
    reads = []
    real = data._load
    monkeypatch.setattr(data, "_load", lambda *a: reads.append(a) or real(*a))
    with data.sharing():
        a = data.load("ellipses", n_train=50)
        assert data.load("ellipses", n_train=50) is a
        other = data.load("ellipses", n_train=50, seed=1)
        assert other is not a and not np.array_equal(other.x_train, a.x_train)
        labels = data.load("ellipses", n_train=50, features=False)
        assert labels.x_train is None and a.x_train is not None
        with pytest.raises(RuntimeError, match="do not nest"):
            with data.sharing():
                pass
    assert len(reads) == 3
    assert data.load("ellipses", n_train=50) is not a  # the scope is closed
    assert len(reads) == 4


def test_an_emulated_job_reads_its_data_once(monkeypatch, tmp_path):
    from pitmpi import cli
    reads = []
    real = data._load
    monkeypatch.setattr(data, "_load", lambda *a: reads.append(a[-1]) or real(*a))
    # data-parallel on 4 ranks: every rank reads the features
    rc = cli.main(["train", "--set", "data.name=ellipses", "--set", "train.epochs=1",
                   "--set", "train.method=data-parallel", "--emulate", "4", "--quiet",
                   "--out", str(tmp_path / "dp.h5")])
    assert rc == 0 and reads == [True]


def test_labels_only_mnist_still_needs_the_image_files(mnist_path, tmp_path):
    copy_mnist(mnist_path, tmp_path)
    os.unlink(tmp_path / "train-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: file not found"):
        data.mnist(str(tmp_path), features=False)


def copy_mnist(src, dst):
    for name in data.MNIST_FILES:
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def test_mnist_missing_file(mnist_path, tmp_path):
    copy_mnist(mnist_path, tmp_path)
    os.unlink(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: file not found"):
        data.mnist(str(tmp_path))


def test_mnist_corrupt_file(mnist_path, tmp_path):
    copy_mnist(mnist_path, tmp_path)
    with open(tmp_path / "t10k-labels-idx1-ubyte.gz", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(DataError, match="MD5 .* does not match the published"):
        data.mnist(str(tmp_path))


def test_idx_bad_magic_and_truncation(tmp_path):
    good = np.arange(10, dtype=np.uint8)
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + good.tobytes()))
    np.testing.assert_array_equal(data.read_idx(str(path), None, 2049, 10), good)
    with pytest.raises(DataError, match="magic number 2049, expected 2051"):
        data.read_idx(str(path), None, 2051, 10)
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + good.tobytes()[:7]))
    with pytest.raises(DataError, match="holds 7 data bytes"):
        data.read_idx(str(path), None, 2049, 10)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a valid gzip"):
        data.read_idx(str(path))


def test_data_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("PITMPI_DATA", raising=False)
    with pytest.raises(DataError, match="data.path is not set"):
        data.mnist(None)
    monkeypatch.setenv("PITMPI_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="is not a directory"):
        data.mnist(None)


def test_npz_keras_layout(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.integers(0, 256, (30, 4, 4), dtype=np.uint8),
             y_train=rng.integers(0, 3, 30), x_test=rng.integers(0, 256, (10, 4, 4), dtype=np.uint8),
             y_test=rng.integers(0, 3, (10, 1)))
    ds = data.npz(str(path))
    assert ds.x_train.shape == (30, 16) and ds.x_val.shape == (10, 16) and ds.y_val.shape == (10,)
    assert ds.n_classes == 3


@pytest.mark.parametrize("arrays,message", [
    ({"x_train": np.zeros((3, 2)), "y_train": np.zeros(3, int), "x_test": np.zeros((2, 2))},
     "missing key.*y_test"),
    ({"x_train": np.zeros((3, 2)), "y_train": np.zeros(4, int), "x_test": np.zeros((2, 2)),
      "y_test": np.zeros(2, int)}, "y_train has shape"),
    ({"x_train": np.full((3, 2), np.nan), "y_train": np.zeros(3, int), "x_test": np.zeros((2, 2)),
      "y_test": np.zeros(2, int)}, "NaN or Inf"),
    ({"x_train": np.zeros((3, 2)), "y_train": -np.ones(3, int), "x_test": np.zeros((2, 2)),
      "y_test": np.zeros(2, int)}, "negative labels"),
    ({"x_train": np.zeros((3, 2)), "y_train": np.zeros(3, int), "x_test": np.zeros((2, 5)),
      "y_test": np.zeros(2, int)}, "features per sample"),
    ({"x_train": np.zeros((0, 2)), "y_train": np.zeros(0, int), "x_test": np.zeros((2, 2)),
      "y_test": np.zeros(2, int)}, "x_train has shape"),
])
def test_npz_errors(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        data.npz(str(path))


def test_npz_not_a_file(tmp_path):
    path = tmp_path / "x.npz"
    path.write_text("hello")
    with pytest.raises(DataError, match="not a readable .npz"):
        data.npz(str(path))
