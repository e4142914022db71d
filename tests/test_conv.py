"""Convolutional ResNets (DESIGN §10): the operator, the kernels against
central finite differences and against the dense kernels where they
coincide, the Verlet rebuild, blocks."""
import numpy as np
import pytest

from pitmpi import ResNet
from pitmpi.kernels.operators import Conv, Dense, im2col

from .test_kernels import fd_relative_error, perturbed_params


def reference_conv(x, K, stride=1):
    """The "same" cross-correlation by loops: x (n, ci, H, W), K (co, ci, k, k)."""
    n, ci, H, W = x.shape
    co, _, k, _ = K.shape
    p = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    Ho, Wo = -(-H // stride), -(-W // stride)
    out = np.zeros((n, co, Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            patch = xp[:, :, i * stride:i * stride + k, j * stride:j * stride + k]
            out[:, :, i, j] = np.einsum("ncab,ocab->no", patch, K)
    return out


@pytest.mark.parametrize("shape, stride", [((2, 3, 5, 4), 1), ((3, 2, 7, 6), 2), ((1, 1, 4, 4), 3)])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_conv_is_the_same_padded_correlation(shape, stride, k):
    rng = np.random.default_rng(0)
    n, ci, H, W = shape
    op = Conv(4, H, W, k, in_channels=ci, stride=stride)
    x = rng.standard_normal(shape)
    K = rng.standard_normal(op.kernel_shape)
    out = np.empty((n,) + op.sample_shape)
    op.apply(x, K, out)
    np.testing.assert_allclose(out, reference_conv(x, K, stride), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3])
def test_conv_transpose_and_weight_gradient_are_adjoints(k):
    rng = np.random.default_rng(1)
    op = Conv(3, 5, 6, k)
    x, v = rng.standard_normal((2, 2, 3, 5, 6))
    K = rng.standard_normal(op.kernel_shape)
    conv, convT = np.empty_like(x), np.empty_like(x)
    op.apply(x, K, conv)
    op.apply_t(v, K, convT)
    assert np.vdot(conv, v) == pytest.approx(np.vdot(x, convT), rel=1e-12)
    # ⟨v, conv(x, K)⟩ is linear in K: its gradient is exact by differences
    g = np.empty((1,) + op.kernel_shape)
    op.weight_grads(v[None], x[None], g)
    for idx in [(0, 0, 0, 0), (2, 1, k - 1, 0), (1, 2, k // 2, k - 1)]:
        dK = np.zeros_like(K)
        dK[idx] = 1.0
        moved = np.empty_like(x)
        op.apply(x, K + dK, moved)
        assert g[(0,) + idx] == pytest.approx(np.vdot(v, moved - conv), rel=1e-10)
    np.testing.assert_allclose(op.bias_grads(v[None])[0], v.sum(axis=(0, 2, 3)))


@pytest.mark.parametrize("make", [lambda: Dense(5), lambda: Conv(3, 5, 6, 3),
                                  lambda: Conv(3, 7, 6, 3, in_channels=2, stride=2)],
                         ids=["dense", "conv", "conv-stride2"])
@pytest.mark.parametrize("passes", [None, 1])
def test_weight_gradient_beside_a_product_is_weight_grads(make, passes, monkeypatch):
    """``apply(x, grad=(D, g))`` and ``apply_t(v, grad=(X, g))`` (the conv
    kernels' form, from the product's own columns) give ``weight_grads``'s
    gradients, and the product unchanged, in one pass or several."""
    from pitmpi.kernels import operators
    if passes:
        monkeypatch.setattr(operators, "PASS_SCRATCH_BYTES", passes)
    op = make()
    rng = np.random.default_rng(6)
    n = 11
    x = rng.standard_normal((n,) + op.in_shape)
    D = rng.standard_normal((n,) + op.sample_shape)
    K = rng.standard_normal(op.kernel_shape)
    expected = np.empty((1,) + op.kernel_shape)
    op.weight_grads(D[None], x[None], expected)
    plain, out, g = np.empty_like(D), np.empty_like(D), np.empty(op.kernel_shape)
    op.apply(x, K, plain)
    op.apply(x, K, out, grad=(D, g))
    np.testing.assert_array_equal(out, plain)
    np.testing.assert_allclose(g, expected[0], rtol=1e-12, atol=1e-12)
    if op.in_shape != op.sample_shape:
        return  # apply_t is an ODE layer's (square, stride 1)
    plain_t, out_t, g_t = np.empty_like(x), np.empty_like(x), np.empty(op.kernel_shape)
    op.apply_t(D, K, plain_t)
    op.apply_t(D, K, out_t, grad=(x, g_t))  # the gradient of ⟨D, apply(x, K)⟩ again
    np.testing.assert_array_equal(out_t, plain_t)
    np.testing.assert_allclose(g_t, expected[0], rtol=1e-12, atol=1e-12)


def test_im2col_stride_keeps_every_other_position():
    x = np.arange(2 * 1 * 5 * 5, dtype=float).reshape(2, 1, 5, 5)
    cols = im2col(x, 3, stride=2)
    assert cols.shape == (2, 9, 9)
    np.testing.assert_array_equal(cols[:, 4].reshape(2, 3, 3), x[:, 0, ::2, ::2])  # centre tap


def conv_net(scheme, activation="tanh", decay=0.0, classifier="flatten", layers=3, stride=1,
             image=(2, 5, 4), channels=3, kernel=3, store=True, dtype="float64"):
    return ResNet(scheme, int(np.prod(image)), channels, layers, 4, T=1.5, activation=activation,
                  weight_decay=decay, kind="conv", image_shape=image, kernel=kernel, stride=stride,
                  classifier=classifier, store_trajectory=store, dtype=dtype)


@pytest.mark.parametrize("scheme", ["euler", "verlet"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("decay, classifier, stride", [(0.0, "flatten", 1), (0.05, "pool", 2),
                                                       (0.05, "flatten", 2)])
def test_conv_gradient_matches_finite_differences(scheme, activation, decay, classifier, stride):
    net = conv_net(scheme, activation, decay, classifier, stride=stride)
    params = perturbed_params(net, 1)
    rng = np.random.default_rng(7)
    X = rng.standard_normal((5, net.n_features))
    y = rng.integers(0, 4, 5)
    assert fd_relative_error(net, params, X, y, rng) <= 1e-6


@pytest.mark.parametrize("scheme", ["euler", "verlet"])
def test_one_pixel_conv_is_the_dense_net(scheme):
    """1 × 1 images and 1 × 1 kernels: the conv net is the dense net."""
    d, w = 3, 4
    dense = ResNet(scheme, d, w, 5, 3, T=2.0, weight_decay=0.01)
    conv = ResNet(scheme, d, w, 5, 3, T=2.0, weight_decay=0.01, kind="conv",
                  image_shape=(d, 1, 1), kernel=1)
    p = perturbed_params(dense, 2)
    pc = {"open.K": p["open.K"].reshape(w, d, 1, 1), "open.b": p["open.b"],
          "K": p["K"].reshape(5, w, w, 1, 1), "b": p["b"], "cls.W": p["cls.W"], "cls.b": p["cls.b"]}
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((6, d)), rng.integers(0, 3, 6)
    loss_d, g_d = dense.loss_and_grad(p, X, y)
    loss_c, g_c = conv.loss_and_grad(pc, X, y)
    assert loss_c == pytest.approx(loss_d, rel=1e-13)
    for k in g_d:
        np.testing.assert_allclose(g_c[k].reshape(g_d[k].shape), g_d[k], rtol=1e-11, atol=1e-14)
    assert conv.state_width == dense.state_width
    assert {k: v.shape for k, v in conv.init_params(0).items()} == {k: v.shape for k, v in pc.items()}


def test_conv_verlet_rebuild_equals_stored():
    stored, rebuilt = conv_net("verlet", layers=12), conv_net("verlet", layers=12, store=False)
    params = perturbed_params(stored, 3)
    rng = np.random.default_rng(4)
    X, y = rng.standard_normal((4, stored.n_features)), rng.integers(0, 4, 4)
    loss_s, g_s = stored.loss_and_grad(params, X, y)
    loss_r, g_r = rebuilt.loss_and_grad(params, X, y)
    assert loss_r == pytest.approx(loss_s, rel=1e-13)
    for k in g_s:
        np.testing.assert_allclose(g_r[k], g_s[k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scheme", ["euler", "verlet"])
def test_conv_blocks_compose_to_the_whole_net(scheme):
    net = conv_net(scheme, layers=6, stride=2, image=(1, 7, 7))
    params = perturbed_params(net, 5)
    rng = np.random.default_rng(6)
    X, y = rng.standard_normal((3, net.n_features)), rng.integers(0, 4, 3)
    _, whole = net.loss_and_grad(params, X, y)
    blocks = [net.block(0, 2), net.block(2, 5), net.block(5, 6)]
    local = [b.local_params(params) for b in blocks]
    ctxs, inp = [], X
    for b, p in zip(blocks, local):
        ctxs.append(b.forward(p, inp))
        inp = ctxs[-1].output
        assert inp.shape == (3, net.state_width)
    lam = None
    grads = {}
    for b, p, ctx in reversed(list(zip(blocks, local, ctxs))):
        lam, g, _ = b.backward(p, ctx, lam_out=lam, y=y)
        for k, v in g.items():
            grads.setdefault(k, []).insert(0, np.array(v))
    for k in ("K", "b"):
        np.testing.assert_allclose(np.concatenate(grads[k]), whole[k] - 0.0, rtol=1e-12, atol=1e-14)
    for k in ("open.K", "open.b", "cls.W", "cls.b"):
        np.testing.assert_allclose(grads[k][0], whole[k], rtol=1e-12, atol=1e-14)


def test_conv_float32_close_to_float64():
    n64, n32 = conv_net("verlet"), conv_net("verlet", dtype="float32")
    params = perturbed_params(n64, 2)
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((4, n64.n_features)), rng.integers(0, 4, 4)
    l64, g64 = n64.loss_and_grad(params, X, y)
    l32, g32 = n32.loss_and_grad({k: v.astype(np.float32) for k, v in params.items()},
                                 X.astype(np.float32), y)
    assert l32 == pytest.approx(l64, rel=1e-5)
    for k in g64:
        assert g32[k].dtype == np.float32
        np.testing.assert_allclose(g32[k], g64[k], rtol=1e-3, atol=1e-5)


def test_conv_model_arguments():
    with pytest.raises(ValueError, match="a conv net needs images"):
        ResNet("euler", 10, 3, 2, 2, T=1.0, kind="conv", image_shape=(1, 3, 3))
    with pytest.raises(ValueError, match="kernel must be odd"):
        ResNet("euler", 9, 3, 2, 2, T=1.0, kind="conv", image_shape=(1, 3, 3), kernel=2)
    with pytest.raises(ValueError, match="unknown kind"):
        ResNet("euler", 9, 3, 2, 2, T=1.0, kind="graph")
    with pytest.raises(ValueError, match="reads the whole state"):
        ResNet("euler", 9, 3, 2, 2, T=1.0, classifier="pool")
    assert Dense(3, 5).kernel_shape == (3, 5)


# above the kernels: data, training, pit's regression, checkpoints ---------------------------

def image_npz(tmp_path, n=160, shape=(6, 6), seed=0):
    """Images whose class is which half is brighter (top or bottom), with noise."""
    rng = np.random.default_rng(seed)
    split = {}
    for name, m in (("train", n), ("test", n // 4)):
        y = rng.integers(0, 2, m)
        x = 0.3 * rng.standard_normal((m,) + shape)
        half = shape[-2] // 2
        x[y == 0, ..., :half, :] += 1.0
        x[y == 1, ..., half:, :] += 1.0
        split[f"x_{name}"], split[f"y_{name}"] = x, y
    path = tmp_path / "images.npz"
    np.savez(path, **split)
    return str(path)


CONV = ["--quiet", "--set", "data.name=npz", "--set", "model.kind=conv", "--set", "model.channels=3",
        "--set", "model.layers=4", "--set", "train.batch_size=16", "--set", "coarse.iterations=20",
        "--set", "train.lr=0.1"]


def test_npz_images_keep_their_shape(tmp_path):
    from pitmpi import data
    ds = data.npz(image_npz(tmp_path, shape=(5, 7)))
    assert ds.image_shape == (1, 5, 7) and ds.n_features == 35
    ds = data.npz(image_npz(tmp_path, shape=(2, 4, 4)))
    assert ds.image_shape == (2, 4, 4)
    flat = tmp_path / "flat.npz"
    rng = np.random.default_rng(0)
    np.savez(flat, x_train=rng.random((8, 3)), y_train=np.arange(8) % 2,
             x_test=rng.random((4, 3)), y_test=np.arange(4) % 2)
    assert data.npz(str(flat)).image_shape is None


def test_mnist_images_are_one_channel(mnist_path):
    from pitmpi import data
    assert data.mnist(mnist_path, features=False).image_shape == (1, 28, 28)


def test_pooled_states_are_patch_means():
    from pitmpi.parallel.regression import PooledStates
    rng = np.random.default_rng(0)
    pool = PooledStates(3, 5, 4, 2)  # patches of rows [0,2) [2,4) [4,5), columns [0,2) [2,4)
    x = rng.standard_normal((2, 3 * 5 * 4))
    z = pool(x)
    assert pool.width == 3 * 3 * 2 and z.shape == (2, 18)
    X = x.reshape(2, 3, 5, 4)
    expect = np.stack([X[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
                       for r0, r1 in ((0, 2), (2, 4), (4, 5)) for c0, c1 in ((0, 2), (2, 4))], axis=2)
    np.testing.assert_allclose(z, expect.reshape(2, -1), rtol=1e-13)


@pytest.mark.parametrize("method, ranks, extra", [
    ("serial", 1, []), ("data-parallel", 2, []), ("model-parallel", 2, []),
    ("pit", 2, ["--set", "regression.pool=3"]),
    ("pit", 3, ["--set", "regression.pool=2", "--set", "model.classifier=pool", "--set", "model.layers=6",
                "--set", "model.scheme=euler"])])
def test_conv_nets_learn_images(tmp_path, method, ranks, extra):
    from pitmpi.cli import main
    from pitmpi.io import read_result
    from pitmpi.parallel.comm import run_emulated
    out = tmp_path / "c.h5"
    argv = ["train", *CONV, "--set", f"data.path={image_npz(tmp_path)}", "--set",
            f"train.method={method}", "--set", "train.epochs=6", *extra, "--out", str(out)]
    assert run_emulated(ranks, lambda comm: main(argv, comm=comm)) == [0] * ranks
    attrs, params, h, _, _ = read_result(str(out))
    assert params["K"].shape[1:] == (3, 3, 3, 3) and params["open.K"].shape == (3, 1, 3, 3)
    assert h["val_acc"][-1] >= 0.9  # chance is 0.5
    from pitmpi.report import summarise
    assert "conv verlet ResNet, 3 channels, 3 x 3 kernels" in summarise(str(out)) or \
        "conv euler ResNet, 3 channels" in summarise(str(out))


def test_conv_pit_resumes_bit_for_bit(tmp_path):
    from pitmpi.parallel.comm import run_emulated
    from pitmpi.cli import main
    from .test_checkpoint import assert_same_run
    path = image_npz(tmp_path)
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    argv = ["train", *CONV, "--set", f"data.path={path}", "--set", "regression.pool=3", "--set", "model.layers=6",
            "--set", "model.stride=2"]
    run = lambda *a: run_emulated(3, lambda comm: main(argv + list(a), comm=comm))
    assert run("--set", "train.epochs=3", "--out", str(full)) == [0] * 3
    assert run("--set", "train.epochs=2", "--out", str(part)) == [0] * 3
    assert run_emulated(3, lambda comm: main(["train", "--resume", str(part), "--set",
                                              "train.epochs=3"], comm=comm)) == [0] * 3
    assert_same_run(full, part)


def test_shipped_conv_config_trains_on_two_ranks(mnist_path, tmp_path):
    import pathlib
    from pitmpi.cli import main
    from pitmpi.io import read_result
    out = tmp_path / "m.h5"
    config = pathlib.Path(__file__).resolve().parent.parent / "run" / "mnist_conv.toml"
    assert main(["train", str(config), "--quiet", "--emulate", "2", "--set", f"data.path={mnist_path}",
                 "--set", "data.n_train=1024", "--set", "data.n_val=512", "--set", "train.epochs=1",
                 "--set", "coarse.iterations=8", "--out", str(out)]) == 0
    attrs, params, h, _, _ = read_result(str(out))
    assert params["K"].shape == (4, 16, 16, 3, 3) and h["val_acc"][-1] > 0.5


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_in_passes_over_slices_of_samples_equals_one_pass(stride, monkeypatch):
    from pitmpi.kernels import operators
    rng = np.random.default_rng(5)
    op = Conv(3, 6, 5, 3, in_channels=2, stride=stride)
    x = rng.standard_normal((21,) + op.in_shape)
    K = rng.standard_normal(op.kernel_shape)
    D = rng.standard_normal((2, 21) + op.sample_shape)
    X = np.stack([x, 2 * x])
    one, g_one = np.empty((21,) + op.sample_shape), np.empty((2,) + op.kernel_shape)
    op.apply(x, K, one)
    op.weight_grads(D, X, g_one)
    monkeypatch.setattr(operators, "PASS_SCRATCH_BYTES", 1)
    assert len(op.passes(21, 8)) == 3  # slices of 8, 8 and 5 samples
    many, g_many = np.empty_like(one), np.empty_like(g_one)
    op.apply(x, K, many)
    op.weight_grads(D, X, g_many)
    np.testing.assert_array_equal(many, one)
    np.testing.assert_allclose(g_many, g_one, rtol=1e-12, atol=1e-12)
