"""Adjoint kernels against central finite differences, block splitting, rebuild."""
import numpy as np
import pytest

from pitmpi import ResNet


def perturbed_params(net, seed):
    p = net.init_params(seed)
    rng = np.random.default_rng(seed + 100)
    for k in p:  # non-zero biases so their gradients are exercised too
        p[k] = p[k] + 0.3 * rng.standard_normal(p[k].shape)
    return p


def fd_relative_error(net, params, X, y, rng, probes=4, eps=1e-6):
    """Worst relative error, over parameters, of directional derivatives."""
    _, grads = net.loss_and_grad(params, X, y)
    worst = 0.0
    for name in params:
        for _ in range(probes):
            d = rng.standard_normal(params[name].shape)
            plus = {k: v.copy() for k, v in params.items()}
            minus = {k: v.copy() for k, v in params.items()}
            plus[name] += eps * d
            minus[name] -= eps * d
            fd = (net.loss_and_grad(plus, X, y)[0] - net.loss_and_grad(minus, X, y)[0]) / (2 * eps)
            an = float(np.vdot(grads[name], d))
            worst = max(worst, abs(fd - an) / max(abs(fd), abs(an), 1e-10))
    return worst


@pytest.mark.parametrize("scheme", ["euler", "verlet"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("decay", [0.0, 0.05])
@pytest.mark.parametrize("shape", [(5, 3, 4, 3, 3), (9, 2, 6, 7, 2), (40, 2, 10, 3, 2)])
def test_gradient_matches_finite_differences(scheme, activation, decay, shape):
    n, d, w, L, c = shape
    net = ResNet(scheme, d, w, L, c, T=2.0, activation=activation, weight_decay=decay)
    params = perturbed_params(net, 1)
    rng = np.random.default_rng(7)
    X = rng.standard_normal((n, d))
    y = rng.integers(0, c, n)
    assert fd_relative_error(net, params, X, y, rng) <= 1e-6


def test_the_largest_shape_checked_takes_the_prescaled_tanh():
    from pitmpi.kernels import Activation
    assert Activation("tanh").prescale(np.dtype(np.float64), 40 * 10) == -2.0
    assert Activation("tanh").prescale(np.dtype(np.float64), 9 * 6) == 1.0
    assert Activation("tanh").prescale(np.dtype(np.float32), 40 * 10) == 1.0
    assert Activation("tanh").prescale(np.dtype(np.float32), 64 * 64) == -2.0  # MNIST: 128 * 64



@pytest.mark.parametrize("scheme, store", [("euler", True), ("verlet", True), ("verlet", False)])
@pytest.mark.parametrize("dtype, width, tol", [("float64", 16, 1e-11), ("float32", 64, 2e-4)])
def test_prescaled_tanh_sweeps_match_numpy_tanh(scheme, store, dtype, width, tol, monkeypatch):
    from pitmpi.kernels import activations
    net = ResNet(scheme, 2, width, 6, 2, T=2.0, store_trajectory=store, dtype=dtype)
    params = {k: v.astype(dtype) for k, v in perturbed_params(net, 2).items()}
    rng = np.random.default_rng(4)
    X, y = (rng.standard_normal((64, 2)) * 3).astype(dtype), rng.integers(0, 2, 64)
    assert activations.Activation("tanh").prescale(np.dtype(dtype), 64 * width) == -2.0
    loss, grads = net.loss_and_grad(params, X, y)
    monkeypatch.setattr(activations, "EXP_TANH_PRESCALED_MIN", {})
    monkeypatch.setattr(activations, "EXP_TANH_MIN", {})
    want_loss, want = net.loss_and_grad(params, X, y)
    assert abs(loss - want_loss) <= tol * 1e-3
    for k in grads:
        np.testing.assert_allclose(grads[k], want[k], rtol=tol, atol=tol * 1e-2, err_msg=k)


def test_finite_difference_check_can_fail():
    """The check above detects a wrong gradient (a sign error in K)."""
    net = ResNet("verlet", 3, 4, 3, 3, T=2.0)
    params = perturbed_params(net, 1)
    rng = np.random.default_rng(7)
    X, y = rng.standard_normal((5, 3)), rng.integers(0, 3, 5)
    real = net.loss_and_grad

    def broken(p, X, y):
        loss, g = real(p, X, y)
        g["K"] = -g["K"]
        return loss, g

    net.loss_and_grad = broken
    assert fd_relative_error(net, params, X, y, rng) > 1e-3


@pytest.mark.parametrize("scheme", ["euler", "verlet"])
def test_blocks_compose_to_full_sweep(scheme):
    net = ResNet(scheme, 3, 5, 8, 3, T=3.0, weight_decay=0.01)
    params = perturbed_params(net, 2)
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((6, 3)), rng.integers(0, 3, 6)
    full = net.full()
    ctx = full.forward(params, X)
    _, g_full, (loss_full, _) = full.backward(params, ctx, y=y)
    a = 3
    left, right = net.block(0, a), net.block(a, net.layers)
    pl, pr = left.local_params(params), right.local_params(params)
    cl = left.forward(pl, X)
    cr = right.forward(pr, cl.output)
    np.testing.assert_allclose(cr.output, ctx.output, rtol=0, atol=1e-14)
    lam_a, g_r, (loss_r, _) = right.backward(pr, cr, y=y)
    _, g_l, _ = left.backward(pl, cl, lam_out=lam_a)
    assert loss_r == pytest.approx(loss_full, abs=1e-14)
    np.testing.assert_allclose(np.concatenate([g_l["K"], g_r["K"]]), g_full["K"], atol=1e-14)
    np.testing.assert_allclose(g_l["open.K"], g_full["open.K"], atol=1e-14)
    np.testing.assert_allclose(g_r["cls.W"], g_full["cls.W"], atol=1e-14)
    # the co-state at a equals the full sweep's co-state at a
    mid = net.block(a, net.layers)
    lam_mid, _, _ = mid.backward(pr, mid.forward(pr, cl.output), y=y)
    np.testing.assert_array_equal(lam_mid, lam_a)
    assert lam_a.shape == (6, net.state_width)


@pytest.mark.parametrize("scheme", ["euler", "verlet"])
@pytest.mark.parametrize("store", [True, False])
def test_reused_buffers_give_the_same_results(scheme, store):
    net = ResNet(scheme, 3, 5, 6, 3, T=2.0, weight_decay=0.01, store_trajectory=store)
    params = perturbed_params(net, 5)
    rng = np.random.default_rng(6)
    fresh, reused = net.full(), net.full(reuse=True)
    for n in (7, 7, 4):  # same shape twice (buffers reused), then a new one
        X, y = rng.standard_normal((n, 3)), rng.integers(0, 3, n)
        _, g_f, (l_f, _) = fresh.backward(params, fresh.forward(params, X), y=y)
        _, g_r, (l_r, _) = reused.backward(params, reused.forward(params, X), y=y)
        assert l_f == l_r
        for k in g_f:
            np.testing.assert_array_equal(g_r[k], g_f[k])
        # evaluation keeps only the output, the same as the training sweep's
        np.testing.assert_array_equal(reused.forward(params, X, store=False).output,
                                      fresh.forward(params, X).output)
    assert reused.ws.nbytes() > 0 and fresh.ws is None
    # each forward's output is its own array, which later sweeps leave alone
    # (pit keeps it to pair with the co-state that comes back an iteration later)
    first = reused.forward(params, X)
    kept = first.output.copy()
    for store_now in (True, False):
        again = reused.forward(params, 3 * X, store=store_now)
        assert not np.shares_memory(again.output, first.output)
    np.testing.assert_array_equal(first.output, kept)
    # loss_and_grad hands out gradients that later calls leave alone
    _, g1 = net.loss_and_grad(params, X, y)
    keep = {k: v.copy() for k, v in g1.items()}
    net.loss_and_grad(params, 2 * X, y)
    for k in g1:
        np.testing.assert_array_equal(g1[k], keep[k])


def test_verlet_rebuild_equals_stored():
    net = ResNet("verlet", 4, 6, 40, 3, T=4.0, weight_decay=0.01)
    params = perturbed_params(net, 3)
    rng = np.random.default_rng(4)
    X, y = rng.standard_normal((8, 4)), rng.integers(0, 3, 8)
    loss_s, g_s = net.loss_and_grad(params, X, y)
    rebuild = ResNet("verlet", 4, 6, 40, 3, T=4.0, weight_decay=0.01, store_trajectory=False)
    loss_r, g_r = rebuild.loss_and_grad(params, X, y)
    assert loss_r == loss_s
    for k in g_s:
        np.testing.assert_allclose(g_r[k], g_s[k], rtol=1e-9, atol=1e-12)


def test_float32_close_to_float64():
    n64 = ResNet("verlet", 3, 8, 6, 3, T=2.0)
    n32 = ResNet("verlet", 3, 8, 6, 3, T=2.0, dtype="float32")
    p = n64.init_params(0)
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((16, 3)), rng.integers(0, 3, 16)
    l64, g64 = n64.loss_and_grad(p, X, y)
    l32, g32 = n32.loss_and_grad({k: v.astype(np.float32) for k, v in p.items()}, X, y)
    assert g32["K"].dtype == np.float32
    assert l32 == pytest.approx(l64, rel=1e-5)
    np.testing.assert_allclose(g32["K"], g64["K"], rtol=1e-3, atol=1e-6)


def test_predict_shapes_and_init_independent_of_chunks():
    net = ResNet("euler", 3, 4, 5, 7, T=1.0)
    p = net.init_params(5)
    assert {k: v.shape for k, v in p.items()} == net.param_shapes()
    X = np.random.default_rng(1).standard_normal((20, 3))
    np.testing.assert_array_equal(net.predict(p, X, chunk=3), net.predict(p, X))
    assert net.predict(p, X).shape == (20, 7)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="scheme"):
        ResNet("rk4", 2, 2, 2, 2, T=1.0)
    with pytest.raises(ValueError, match="layers"):
        ResNet("euler", 2, 2, 0, 2, T=1.0)
    with pytest.raises(ValueError, match="activation"):
        ResNet("euler", 2, 2, 2, 2, T=1.0, activation="gelu")


def test_tanh_matches_numpy_to_rounding():
    from pitmpi.kernels import Activation
    x = np.concatenate([np.linspace(-40, 40, 100001), np.geomspace(1e-300, 1e3, 2000),
                        -np.geomspace(1e-300, 1e3, 2000), [0.0, -0.0, np.inf, -np.inf]])
    got = Activation("tanh").apply(x.copy())
    assert np.abs(got - np.tanh(x)).max() <= 4.5e-16
    assert np.abs(got - np.tanh(x)).max() > 0  # this size takes the exp form
    assert np.isnan(Activation("tanh").apply(np.array([np.nan, 1.0])))[0]
    x32 = x.astype(np.float32)
    got32 = Activation("tanh").apply(x32.copy())
    assert got32.dtype == np.float32
    assert 0 < np.abs(got32 - np.tanh(x32)).max() <= 2.4e-7  # the exp form, to 2 ulp of 1
    np.testing.assert_array_equal(Activation("tanh").apply(x32[:100].copy()), np.tanh(x32[:100]))



@pytest.mark.parametrize("scheme, store", [("euler", True), ("verlet", True), ("verlet", False)])
def test_adjoint_in_chunks_of_layers_equals_one_chunk(scheme, store, monkeypatch):
    """The adjoint's batched parts (σ', weight gradients; with ``store=False``
    also the rebuilt states) taken a few layers at a time give what they
    give over all layers at once."""
    from pitmpi.kernels import workspace
    n, w, L = 6, 5, 8

    def build():
        return ResNet(scheme, 3, w, L, 3, T=2.0, weight_decay=0.01, store_trajectory=store)

    params = perturbed_params(build(), 8)
    rng = np.random.default_rng(9)
    X, y = rng.standard_normal((n, 3)), rng.integers(0, 3, n)
    _, whole = build().loss_and_grad(params, X, y)
    layer_bytes = n * w * 8
    monkeypatch.setattr(workspace, "CHUNK_BYTES", 3 * layer_bytes)
    assert workspace.layers_per_chunk(L, layer_bytes) == 3  # chunks of 3, 3 and 2 layers
    _, chunked = build().loss_and_grad(params, X, y)
    for k in whole:
        np.testing.assert_allclose(chunked[k], whole[k], rtol=1e-13, atol=1e-15)
    assert workspace.layers_per_chunk(L, 10 * workspace.CHUNK_BYTES) == 1


@pytest.mark.parametrize("scheme", ["euler", "verlet"])
def test_label_smoothing_gradient_matches_finite_differences(scheme):
    net = ResNet(scheme, 3, 4, 3, 4, T=2.0, weight_decay=0.01, label_smoothing=0.1)
    params = perturbed_params(net, 3)
    rng = np.random.default_rng(8)
    X, y = rng.standard_normal((7, 3)), rng.integers(0, 4, 7)
    assert fd_relative_error(net, params, X, y, rng) <= 1e-6


def test_label_smoothing_is_the_cross_entropy_of_the_smoothed_target():
    from pitmpi.kernels import classifier_loss_and_grad
    rng = np.random.default_rng(9)
    W, mu, Y = rng.standard_normal((3, 5)), rng.standard_normal(3), rng.standard_normal((6, 5))
    y = np.array([0, 1, 2, 2, 1, 0])
    loss, _, _, _, _ = classifier_loss_and_grad(W, mu, Y, y, 6, smoothing=0.2)
    S = Y @ W.T + mu
    logp = S - np.log(np.exp(S).sum(axis=1, keepdims=True))
    q = 0.8 * np.eye(3)[y] + 0.2 / 3
    assert loss == pytest.approx(-(q * logp).sum() / 6, rel=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_output_errors_are_the_loss_gradient_at_the_scores(smoothing):
    """softmax(S) − q, each row the gradient of its sample's loss at its
    scores (central differences of the label-smoothed cross-entropy)."""
    from pitmpi.kernels import classifier_loss_and_grad, cross_entropy, output_errors
    rng = np.random.default_rng(3)
    S, y = rng.standard_normal((5, 4)), np.array([0, 3, 1, 1, 2])
    e = output_errors(cross_entropy(S, y)[1], y, smoothing)
    eye = np.eye(4)  # scores as the classifier's of the state I with W = I, mu = 0

    def loss(S):
        return classifier_loss_and_grad(eye, np.zeros(4), S, y, 1, smoothing)[0]

    fd = np.zeros_like(S)
    for i in range(5):
        for j in range(4):
            d = np.zeros_like(S)
            d[i, j] = 1e-6
            fd[i, j] = (loss(S + d) - loss(S - d)) / 2e-6
    np.testing.assert_allclose(e, fd, atol=1e-8)


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("scheme, store", [("euler", True), ("verlet", True), ("verlet", False)])
def test_costate_only_adjoint_equals_the_full_one(kind, scheme, store):
    # pit's relayed co-states need no weight gradients (grads=False): the
    # co-state recursion is the same, so the co-state is the same to the bit
    extra = dict(kind="conv", image_shape=(1, 4, 4), kernel=3) if kind == "conv" else {}
    net = ResNet(scheme, 16, 3, 6, 3, T=2.0, weight_decay=0.01, store_trajectory=store, **extra)
    params = perturbed_params(net, 7)
    rng = np.random.default_rng(8)
    X = rng.standard_normal((5, 16))
    first, middle = net.block(0, 2, reuse=True), net.block(2, 5, reuse=True)
    p1, p2 = first.local_params(params), middle.local_params(params)
    x = first.forward(p1, X).output
    lam = rng.standard_normal(x.shape)
    lam_full, g, _ = middle.backward(p2, middle.forward(p2, x), lam_out=lam)
    assert set(g) == {"K", "b"}
    lam_only, g_none, stats = middle.backward(p2, middle.forward(p2, x), lam_out=lam, grads=False)
    assert g_none == {} and stats == (0.0, 0)
    np.testing.assert_array_equal(lam_only, lam_full)
    assert not np.array_equal(lam_only, lam)
    # the first block hands back no co-state either way
    assert first.backward(p1, first.forward(p1, X), lam_out=x, grads=False)[:2] == (None, {})
