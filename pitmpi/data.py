"""Datasets: Swiss roll, concentric ellipses, MNIST (IDX files), user ``.npz``.

Every loader returns a :class:`Dataset` whose features are standardised with
the *training* statistics, its arrays read-only.  Nothing is ever downloaded:
MNIST is read from a directory the user names (``data.path`` or the
environment variable ``PITMPI_DATA``).  Within :func:`sharing` (the ranks of
an emulated job, threads of one process), equal loads return one dataset.
"""
import contextlib
import dataclasses
import gzip
import hashlib
import os
import struct
import threading
import zipfile
from dataclasses import dataclass

import numpy as np

from .errors import DataError

DATASETS = ("swissroll", "ellipses", "mnist", "npz")


@dataclass(frozen=True)
class Dataset:
    """Train and validation (or test) splits; the arrays are read-only.

    Attributes
    ----------
    name : str
    x_train : ndarray, shape (n_train, d), or None
        Standardised features in the dtype asked for (float64 by default);
        None where they were not loaded (``features=False``: a rank whose
        blocks never read them).
    y_train : ndarray of int64, shape (n_train,)
    x_val : ndarray, shape (n_val, d), or None
    y_val : ndarray of int64, shape (n_val,)
    n_classes : int
    n_features : int
        ``d``, known also where the features are not held.
    image_shape : tuple of int or None
        ``(C, H, W)`` when the samples are images (flattened, channel by
        channel, into the ``d = C H W`` features), else None.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    n_classes: int
    n_features: int
    image_shape: tuple = None

    def summary(self):
        return (f"{self.name}: {len(self.y_train)} train / {len(self.y_val)} validation samples, "
                f"{self.n_features} features, {self.n_classes} classes")


def as_float64(rows):
    """A float64 copy of ``rows`` (the default ``prepare`` of :func:`standardise`)."""
    return np.array(rows, dtype=np.float64)


def standardise(x_train, x_val, dtype=np.float64, prepare=as_float64, chunk=8192):
    """Both splits centred and scaled with the training mean and std (per
    feature; constant features are only centred), as new C-ordered arrays
    of ``dtype``.

    The statistics and the arithmetic are float64 whatever ``dtype``: the
    result is the float64 standardisation rounded once to ``dtype``.  The
    work goes ``chunk`` rows at a time (the variance sums each chunk's
    squares, so the chunk size is part of the numbers), ``prepare(rows)``
    giving a chunk's float64 values (e.g. raw ``uint8`` pixels divided by
    255), so no full-size float64 array is made besides the output.

    Parameters
    ----------
    x_train : array_like, shape (n_train, d)
    x_val : array_like, shape (n_val, d)
    dtype : numpy dtype
    prepare : callable
        ``prepare(rows)``: a new float64 array of the rows' values.
    chunk : int

    Returns
    -------
    x_train, x_val : ndarray, shapes (n_train, d), (n_val, d), of ``dtype``
    """
    n, d = x_train.shape
    with np.errstate(over="ignore", invalid="ignore"):  # checked below, with a clear message
        return _standardise(x_train, x_val, n, d, dtype, prepare, chunk)


def _standardise(x_train, x_val, n, d, dtype, prepare, chunk):
    # the mean: NumPy's reduction over the leading axis of a C-ordered (n, d)
    # array, d > 1, adds the rows one after the other, so carrying the sum
    # from chunk to chunk gives the same numbers as one reduction (MNIST:
    # the same bits, tested); a set of one chunk is one reduction
    total = None
    for i in range(0, n, chunk):
        rows = prepare(x_train[i:i + chunk])
        total = np.add.reduce(rows if total is None else np.vstack([total[None], rows]), axis=0)
    mean = total / n if n else np.zeros(d)
    var = np.zeros(d)
    for i in range(0, n, chunk):
        rows = prepare(x_train[i:i + chunk])
        rows -= mean
        var += np.einsum("ij,ij->j", rows, rows)
    std = np.sqrt(var / max(n, 1))
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
        raise DataError("x_train: the features' mean or spread overflows float64; rescale "
                        "the features (e.g. to magnitudes around 1)")
    if d and n > 1 and not np.any(std > 0):
        raise DataError("x_train: every feature is constant (zero spread), so the network "
                        "sees the same input for every sample; check the data")
    std[std == 0] = 1.0
    out = []
    small = max(chunk // 8, 1)  # here the chunks do not change the numbers
    for x in (x_train, x_val):
        y = np.empty(x.shape, dtype=dtype)
        for i in range(0, len(x), small):
            rows = prepare(x[i:i + small])
            rows -= mean
            rows /= std
            y[i:i + small] = rows
        if not np.all(np.isfinite(y)):
            split = "x_train" if x is x_train else "x_test"
            raise DataError(f"{split}: standardised with the training mean and spread, the "
                            f"features leave the range of {np.dtype(dtype).name}; rescale them")
        out.append(y)
    return out[0], out[1]


def _finish(name, xt, yt, xv, yv, n_classes=None, dtype=np.float64, features=True,
            prepare=as_float64, n_features=None, source=None, image_shape=None):
    """The :class:`Dataset` of raw splits: features standardised into ``dtype``
    (or dropped, ``features=False``; ``xt`` may then be None if
    ``n_features`` is given), labels as int64."""
    if n_features is None:
        n_features = int(np.prod(np.shape(xt)[1:]))
    if features:
        try:
            xt, xv = standardise(xt, xv, np.dtype(dtype), prepare)
        except DataError as e:
            raise DataError(f"{source or name}: {e}") from None
    else:
        xt = xv = None
    yt = np.asarray(yt, dtype=np.int64)
    yv = np.asarray(yv, dtype=np.int64)
    check_labels(source or name, yt, yv)
    if n_classes is None:
        n_classes = int(max(yt.max(), yv.max())) + 1
    return Dataset(name, xt, yt, xv, yv, n_classes, n_features, image_shape)


def check_labels(source, y_train, y_test):
    """Classification needs two classes in ``y_train``, and no test label the
    training labels never reach.

    Raises
    ------
    DataError
        Naming ``source`` (a file or dataset) and the split.
    """
    train_classes = np.unique(y_train)
    if len(train_classes) < 2:
        raise DataError(f"{source}: y_train holds a single class (label {int(train_classes[0])});"
                        " classification needs at least two")
    top = int(train_classes[-1])
    if len(y_test) and int(y_test.max()) > top:
        raise DataError(f"{source}: y_test holds label {int(y_test.max())}, which y_train never "
                        f"has (its labels go up to {top}); the classifier could never predict it")


def swissroll(n=256, dtype=np.float64, features=True):
    """The Swiss roll of Haber & Ruthotto (Meganet recipe).

    ``θ = 0 : 4π/(2n) : 4π`` (``2n + 1`` angles); class 0 at radii
    ``linspace(0, 1)``, class 1 at ``linspace(0.2, 1.2)``; points
    ``(r cos θ, r sin θ)``.  Of the stacked set (class 0 then class 1) the even
    rows train and the odd rows validate.  ``dtype``, ``features``: see
    :func:`load`.
    """
    theta = np.linspace(0.0, 4 * np.pi, 2 * n + 1)
    r0 = np.linspace(0.0, 1.0, theta.size)
    r1 = np.linspace(0.2, 1.2, theta.size)
    pts = np.vstack([np.column_stack([r0 * np.cos(theta), r0 * np.sin(theta)]),
                     np.column_stack([r1 * np.cos(theta), r1 * np.sin(theta)])])
    labels = np.repeat([0, 1], theta.size)
    return _finish("swissroll", pts[0::2], labels[0::2], pts[1::2], labels[1::2], 2, dtype,
                   features)


def ellipses(n_train=1000, n_val=200, seed=0, dtype=np.float64, features=True):
    """Concentric ellipses: per class ``φ ~ U[0, 2π)``, class 0 ``r ~ U[0, 1)``,
    class 1 ``r ~ U[1, 2)``, point ``(r cos φ, 0.4 r sin φ)``; independent
    train and validation draws of ``n_train`` / ``n_val`` points per class
    (``dtype``, ``features``: see :func:`load`)."""
    rng = np.random.default_rng(seed)

    def draw(m):
        xs, ys = [], []
        for c, (lo, hi) in enumerate(((0.0, 1.0), (1.0, 2.0))):
            phi = rng.uniform(0.0, 2 * np.pi, m)
            r = rng.uniform(lo, hi, m)
            xs.append(np.column_stack([r * np.cos(phi), 0.4 * r * np.sin(phi)]))
            ys.append(np.full(m, c))
        return np.vstack(xs), np.concatenate(ys)

    xt, yt = draw(n_train)
    xv, yv = draw(n_val)
    return _finish("ellipses", xt, yt, xv, yv, 2, dtype, features)


MNIST_FILES = {
    "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", 2051, 60000),
    "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432", 2049, 60000),
    "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3", 2051, 10000),
    "t10k-labels-idx1-ubyte.gz": ("ec29112dd5afa0611ce80d1b7f02629c", 2049, 10000),
}


def resolve_data_dir(path):
    """The directory to read from: ``path``, else ``$PITMPI_DATA``."""
    path = path or os.environ.get("PITMPI_DATA", "")
    if not path:
        raise DataError("data.path is not set (nor PITMPI_DATA): name the directory that "
                        "holds the dataset files")
    if not os.path.isdir(path):
        raise DataError(f"data.path {path!r} is not a directory")
    return path


def read_idx(path, expected_md5=None, expected_magic=None, expected_count=None):
    """Read one gzip-compressed IDX file, checking its MD5, magic and count.

    Returns
    -------
    ndarray of uint8
        Shape (count,) for labels or (count, rows, cols) for images.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if expected_md5 is not None:
        md5 = hashlib.md5(raw).hexdigest()
        if md5 != expected_md5:
            raise DataError(f"{path}: MD5 {md5} does not match the published {expected_md5} "
                            "(corrupt or different file)")
    try:
        body = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a valid gzip file ({e})") from None
    dims, offset = _idx_header(path, body, expected_magic, expected_count)
    size = int(np.prod(dims))
    if len(body) - offset != size:
        raise DataError(f"{path}: holds {len(body) - offset} data bytes, header says {size}")
    return np.frombuffer(body, dtype=np.uint8, offset=offset).reshape(dims)


def idx_dims(path, expected_magic=None, expected_count=None):
    """The dimensions an IDX file's header gives, e.g. (60000, 28, 28),
    reading only the header (with the checks of :func:`read_idx` on it)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(4 + 4 * 255)  # the longest header (255 dimensions), or less
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a valid gzip file ({e})") from None
    return _idx_header(path, head, expected_magic, expected_count)[0]


def _idx_header(path, body, expected_magic, expected_count):
    """``(dims, data offset)`` from the start of an IDX file's bytes."""
    if len(body) < 8:
        raise DataError(f"{path}: too short for an IDX header")
    magic, count = struct.unpack(">ii", body[:8])
    if expected_magic is not None and magic != expected_magic:
        raise DataError(f"{path}: IDX magic number {magic}, expected {expected_magic}")
    if expected_count is not None and count != expected_count:
        raise DataError(f"{path}: {count} items, expected {expected_count}")
    ndim = magic & 0xFF
    if len(body) < 4 + 4 * ndim:
        raise DataError(f"{path}: too short for an IDX header of {ndim} dimensions")
    dims = struct.unpack(">" + "i" * ndim, body[4:4 + 4 * ndim])
    return dims, 4 + 4 * ndim


def mnist(path=None, check_md5=True, dtype=np.float64, features=True):
    """MNIST from the four standard IDX gzip files in ``path`` (or ``$PITMPI_DATA``).

    Pixels are scaled to [0, 1], images flattened to 784 features, then
    standardised.  The validation split is the 10,000-image test set.  With
    ``features=False`` only the label files are read (and the images'
    headers).  ``dtype``: see :func:`load`.
    """
    root = resolve_data_dir(path)
    arrays = {}
    for fname, (md5, magic, count) in MNIST_FILES.items():
        where = os.path.join(root, fname)
        if features or "labels" in fname:
            arrays[fname] = read_idx(where, md5 if check_md5 else None, magic, count)
        else:  # the images' dimensions alone
            arrays[fname] = idx_dims(where, magic, count)
    yt = arrays["train-labels-idx1-ubyte.gz"]
    yv = arrays["t10k-labels-idx1-ubyte.gz"]
    for name, y in (("train-labels-idx1-ubyte.gz", yt), ("t10k-labels-idx1-ubyte.gz", yv)):
        if y.max() > 9:
            raise DataError(f"{os.path.join(root, name)}: label {int(y.max())} outside 0..9")
    if not features:
        dims = tuple(int(v) for v in arrays["train-images-idx3-ubyte.gz"][1:])
        return _finish("mnist", None, yt, None, yv, 10, features=False,
                       n_features=int(np.prod(dims)), image_shape=(1,) + dims)
    dims = arrays["train-images-idx3-ubyte.gz"].shape[1:]
    xt = arrays["train-images-idx3-ubyte.gz"].reshape(60000, -1)
    xv = arrays["t10k-images-idx3-ubyte.gz"].reshape(10000, -1)
    return _finish("mnist", xt, yt, xv, yv, 10, dtype, prepare=lambda pixels: pixels / 255.0,
                   image_shape=(1,) + tuple(int(v) for v in dims))


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def npz(path, dtype=np.float64, features=True):
    """A user ``.npz`` file with keys ``x_train, y_train, x_test, y_test``.

    Images of any shape are flattened (``(n, H, W)`` and ``(n, C, H, W)``
    arrays are images that a conv net can read: ``image_shape``); integer
    features are taken as pixel data and scaled to [0, 1]; labels must be
    integers ``0..c-1``.  ``dtype``, ``features``: see :func:`load`.
    """
    if not path:
        raise DataError("data.path must name the .npz file for data.name = 'npz'")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a readable .npz file (not a zip archive; write it with "
                        "numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise DataError(f"{path}: missing key(s) {', '.join(missing)}; "
                                f"required: {', '.join(NPZ_KEYS)}")
            arrs = {k: f[k] for k in NPZ_KEYS}
    except DataError:
        raise
    except Exception as e:  # zipfile/ValueError/OSError: not a readable npz
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    xs = {}
    for split in ("train", "test"):
        x, y = arrs[f"x_{split}"], arrs[f"y_{split}"]
        if x.ndim < 2 or x.shape[0] == 0:
            raise DataError(f"{path}: x_{split} has shape {x.shape}; expected (n, ...) with n >= 1")
        y = np.squeeze(y) if y.ndim == 2 and 1 in y.shape else y
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"{path}: y_{split} has shape {arrs[f'y_{split}'].shape}; "
                            f"expected ({x.shape[0]},) to match x_{split}")
        if not np.issubdtype(y.dtype, np.integer):
            if not np.all(np.equal(np.mod(y, 1), 0)):
                raise DataError(f"{path}: y_{split} holds non-integer labels")
        if np.issubdtype(x.dtype, np.integer):
            x = x / float(np.iinfo(x.dtype).max) if x.dtype == np.uint8 else x.astype(np.float64)
        x = x.reshape(x.shape[0], -1).astype(np.float64)
        if not np.all(np.isfinite(x)):
            raise DataError(f"{path}: x_{split} holds NaN or Inf")
        if y.min() < 0:
            raise DataError(f"{path}: y_{split} holds negative labels; expected 0..c-1")
        xs[split] = (x, y.astype(np.int64))
    if xs["train"][0].shape[1] != xs["test"][0].shape[1]:
        raise DataError(f"{path}: x_train has {xs['train'][0].shape[1]} features per sample, "
                        f"x_test {xs['test'][0].shape[1]}")
    sample = arrs["x_train"].shape[1:]
    image_shape = None
    if len(sample) in (2, 3) and arrs["x_test"].shape[1:] == sample:
        image_shape = tuple(int(v) for v in ((1,) + sample if len(sample) == 2 else sample))
    return _finish("npz", xs["train"][0], xs["train"][1], xs["test"][0], xs["test"][1],
                   dtype=dtype, features=features, source=path, image_shape=image_shape)


def load(name, path=None, seed=0, n_train=None, n_val=None, dtype="float64", features=True):
    """Load a dataset by name (``swissroll``, ``ellipses``, ``mnist``, ``npz``).

    ``n_train`` / ``n_val`` optionally keep only the first samples of each
    split (after loading; for quick runs and tests).  The features come
    standardised in ``dtype`` (the float64 values rounded once), or not at
    all with ``features=False`` (labels and sizes only: what a rank whose
    blocks never read the features needs; MNIST then reads only its label
    files).  Within :func:`sharing`, a load with the arguments of an earlier
    one returns its dataset.
    """
    loads = _Shared.loads
    if loads is None:
        return _load(name, path, seed, n_train, n_val, dtype, features)
    key = (name, path, seed, n_train, n_val, np.dtype(dtype).str, features,
           os.environ.get("PITMPI_DATA"))
    with _Shared.lock:
        if key not in loads:
            loads[key] = _load(name, path, seed, n_train, n_val, dtype, features)
        return loads[key]


def _load(name, path, seed, n_train, n_val, dtype, features):
    dtype = np.dtype(dtype)
    if name == "swissroll":
        ds = swissroll(dtype=dtype, features=features)
    elif name == "ellipses":
        ds = ellipses(seed=seed, dtype=dtype, features=features)
    elif name == "mnist":
        ds = mnist(path, dtype=dtype, features=features)
    elif name == "npz":
        ds = npz(path, dtype=dtype, features=features)
    else:
        raise DataError(f"data.name = {name!r} is not a dataset; allowed: {', '.join(DATASETS)}")
    cut = {}
    if n_train:
        cut.update(y_train=ds.y_train[:n_train],
                   x_train=None if ds.x_train is None else ds.x_train[:n_train])
    if n_val:
        cut.update(y_val=ds.y_val[:n_val], x_val=None if ds.x_val is None else ds.x_val[:n_val])
    ds = dataclasses.replace(ds, **cut)
    for a in (ds.x_train, ds.y_train, ds.x_val, ds.y_val):
        if a is not None:
            a.flags.writeable = False
    return ds


class _Shared:
    """The loads of the :func:`sharing` scope now open, if any, and the lock
    held to open or close it and for each load within it."""
    lock = threading.Lock()
    loads = None


@contextlib.contextmanager
def sharing():
    """Within this scope :func:`load` keeps what it loads, and a load with the
    same arguments (and ``$PITMPI_DATA``) returns the same read-only
    :class:`Dataset` instead of reading it again: the ranks of an emulated job,
    threads of one process, then hold one copy of the data, not one each.
    Loads that run at once wait for one another."""
    with _Shared.lock:
        if _Shared.loads is not None:
            raise RuntimeError("data.sharing() scopes do not nest")
        _Shared.loads = {}
    try:
        yield
    finally:
        with _Shared.lock:
            _Shared.loads = None
