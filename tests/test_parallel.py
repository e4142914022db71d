"""Parallel methods on emulated ranks (threads), no mpirun needed."""
import numpy as np
import pytest

from pitmpi import config, data
from pitmpi.errors import ConfigError
from pitmpi.parallel.coarse import prolong
from pitmpi.parallel.comm import run_emulated
from pitmpi.parallel.methods import make_trainer, reads_features
from pitmpi.parallel.partition import layer_costs, partition
from pitmpi.parallel.regression import CostateRegression, prediction_errors
from pitmpi.model import ResNet

SWISS = data.swissroll()
QUICK = ["model.layers=8", "train.epochs=2", "output.progress=false"]


def train(size, overrides, ds=SWISS):
    cfg = config.load(None, QUICK + overrides)
    return run_emulated(size, lambda comm: make_trainer(comm, cfg, ds).run())[0]


def max_param_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.fixture(scope="module")
def serial_ref():
    return {scheme: train(1, ["train.method=serial", f"model.scheme={scheme}"])
            for scheme in ("euler", "verlet")}


@pytest.mark.parametrize("scheme", ["euler", "verlet"])
@pytest.mark.parametrize("method", ["data-parallel", "model-parallel", "pit"])
def test_one_rank_reproduces_serial_bitwise(serial_ref, scheme, method):
    res = train(1, [f"train.method={method}", f"model.scheme={scheme}"])
    assert max_param_diff(res.params, serial_ref[scheme].params) == 0.0
    np.testing.assert_array_equal(res.history["loss"], serial_ref[scheme].history["loss"])


@pytest.mark.parametrize("scheme", ["euler", "verlet"])
@pytest.mark.parametrize("method", ["data-parallel", "model-parallel"])
@pytest.mark.parametrize("size", [2, 3])
def test_exact_methods_match_serial(serial_ref, scheme, method, size):
    res = train(size, [f"train.method={method}", f"model.scheme={scheme}"])
    assert max_param_diff(res.params, serial_ref[scheme].params) <= 1e-12
    np.testing.assert_allclose(res.history["loss"], serial_ref[scheme].history["loss"], atol=1e-12)
    assert res.attrs["ranks"] == size


def test_pit_differs_from_serial_but_has_all_parameters(serial_ref):
    res = train(2, ["train.method=pit"])
    ref = serial_ref["verlet"]
    assert {k: v.shape for k, v in res.params.items()} == {k: v.shape for k, v in ref.params.items()}
    assert max_param_diff(res.params, ref.params) > 1e-6  # predicted co-states: not the same iterates
    n_iter = len(res.history["loss"])
    assert res.history["regression_mse"].shape == (n_iter, 1)
    assert np.isfinite(res.history["regression_mse"][1:]).all()
    # the regression's cost on rank 0 (about 2.3 layers here) shifts the boundary left
    np.testing.assert_array_equal(res.extra["partition"], [[0, 2], [2, 8]])


@pytest.mark.parametrize("overrides", [[], ["coarse.levels=1"], ["coarse.warmup=wait"],
                                        ["coarse.parallel=data-parallel"],
                                        ["regression.features=state", "model.scheme=euler"],
                                        ["regression.delay=2"],
                                        ["regression.rank=3", "coarse.parallel=data-parallel"]])
def test_pit_is_deterministic(overrides):
    a = train(3, ["train.method=pit", "model.layers=12"] + overrides)
    b = train(3, ["train.method=pit", "model.layers=12"] + overrides)
    assert max_param_diff(a.params, b.params) == 0.0
    np.testing.assert_array_equal(a.history["regression_mse"], b.history["regression_mse"])


LABELS_ONLY = data.swissroll(features=False)


@pytest.mark.parametrize("method, overrides, readers", [
    ("pit", [], [True, False, False]),
    ("pit", ["coarse.parallel=data-parallel"], [True, True, True]),
    ("pit", ["coarse.levels=1"], [True, False, False]),
    ("model-parallel", [], [True, False, False]),
    ("data-parallel", [], [True, True, True]),
    ("serial", [], [True]),
])
def test_ranks_that_do_not_read_the_features_train_without_them(method, overrides, readers):
    # every rank that reads_features says False for gets labels only, and the
    # run is the one where every rank holds the features, bit for bit
    size = len(readers)
    cfg = config.load(None, QUICK + [f"train.method={method}", "model.layers=12"] + overrides)
    assert [reads_features(cfg, r, size) for r in range(size)] == readers

    def job(comm):
        ds = SWISS if reads_features(cfg, comm.rank, comm.size) else LABELS_ONLY
        return make_trainer(comm, cfg, ds).run()

    a = run_emulated(size, job)[0]
    b = run_emulated(size, lambda comm: make_trainer(comm, cfg, SWISS).run())[0]
    assert max_param_diff(a.params, b.params) == 0.0
    np.testing.assert_array_equal(a.history["val_acc"], b.history["val_acc"])


def test_regression_delay_lets_co_states_arrive_later():
    # delay d: the pair of the batch sent at iteration k - 1 joins at k + d
    # instead of k; the first iterations agree, later ones differ; it still learns
    a = train(2, ["train.method=pit", "train.epochs=30"])
    b = train(2, ["train.method=pit", "train.epochs=30", "regression.delay=1"])
    mse_a, mse_b = a.history["regression_mse"][:, 0], b.history["regression_mse"][:, 0]
    np.testing.assert_array_equal(mse_a[1:2], mse_b[1:2])  # the first pair, learnt 1 later
    assert np.isnan(mse_b[-1]) or mse_b[-1] != mse_a[-1]
    assert max_param_diff(a.params, b.params) > 1e-6
    # learns as well (the last epochs' mean: single epochs swing by ±5 points)
    assert np.mean(b.history["val_acc"][-5:]) >= np.mean(a.history["val_acc"][-5:]) - 0.05


def test_coarse_phase_on_rank0_or_data_parallel_agree():
    # the same coarse iterates up to the rounding of the gradient sum, so the
    # fine runs start alike and stay close over a short run
    # (few coarse iterations: SGD on the Swiss roll amplifies rounding over hundreds)
    a = train(2, ["train.method=pit", "train.epochs=1", "coarse.iterations=5"])
    b = train(2, ["train.method=pit", "train.epochs=1", "coarse.iterations=5",
                  "coarse.parallel=data-parallel"])
    assert 0.0 < max_param_diff(a.params, b.params) < 1e-8
    assert np.isclose(a.history["loss"][-1], b.history["loss"][-1], rtol=1e-6)


def test_pit_learns_the_swiss_roll():
    # a short run on 2 emulated ranks learns (chance is 50 %); the accuracy
    # against serial on the full default problem is checked under MPI
    res = train(2, ["train.method=pit", "train.epochs=60", "model.layers=16"])
    assert res.history["val_acc"].max() >= 0.8


def test_partition_balances_cost_on_the_grid():
    net = ResNet("euler", 784, 64, 16, 10, T=1.0)
    costs = layer_costs(net)
    b = partition(costs, 2, grid=2)
    assert b[0] == 0 and b[-1] == 16 and all(x % 2 == 0 for x in b)
    # the opening layer (784*64 per sample) is as costly as ~12 ODE layers: rank 0 gets fewer
    assert b[1] < 8
    shares = [costs[x:y].sum() for x, y in zip(b[:-1], b[1:])]
    assert max(shares) / min(shares) < 1.6
    np.testing.assert_array_equal(partition(np.ones(8), 4), [0, 2, 4, 6, 8])
    with pytest.raises(ConfigError, match="cannot be split into 5 blocks"):
        partition(np.ones(8), 5, grid=2)
    with pytest.raises(ConfigError, match="not a multiple of coarse.factor"):
        partition(np.ones(9), 2, grid=2)


def test_partition_counts_call_overheads_and_the_regression():
    # Swiss roll sizes (n = 32, w = 16): fixed per-call costs are about 40 %
    # of a layer and most of the regression (measured: ~5 layers)
    from pitmpi.parallel.partition import regression_cost
    net = ResNet("verlet", 2, 16, 64, 2, T=5.0)
    cfg = config.load(None, ["model.layers=64"])
    bare, full = layer_costs(net), layer_costs(net, batch_size=32)
    assert 1.4 < full[1] / bare[1] < 2.5
    reg = regression_cost(net, cfg, 32)
    assert 2.5 < reg / full[1] < 6.0
    np.testing.assert_array_equal(partition(full, 2, 2, reg), [0, 30, 64])
    # a cheaper regression (refit every 10th arrival, 8 pairs) costs less
    cheap = config.load(None, ["regression.refit_every=10", "regression.pairs_per_batch=8"])
    assert regression_cost(net, cheap, 32) < 0.7 * reg
    # MNIST sizes (sw = 128, 10 classes): 16 co-state coordinates cost less
    mnist = ResNet("verlet", 784, 64, 16, 10, T=1.0)
    keys = ["regression.refit_every=100", "regression.pairs_per_batch=32"]
    full_width = regression_cost(mnist, config.load(None, keys), 128)
    low = regression_cost(mnist, config.load(None, keys + ["regression.rank=16"]), 128)
    assert 0.5 * full_width < low < 0.9 * full_width


def test_regression_recovers_affine_map():
    rng = np.random.default_rng(0)
    A, c = rng.standard_normal((4, 4)), rng.standard_normal(4)
    reg = CostateRegression(4, 3, ridge=0.0, forgetting=1.0)
    for _ in range(5):
        x = rng.standard_normal((20, 4))
        reg.add(x, None, (x @ A + c) / 20)
    xt = rng.standard_normal((7, 4))
    np.testing.assert_allclose(reg.predict(xt), (xt @ A + c) / 7, atol=1e-10)
    assert prediction_errors(reg.predict(xt), (xt @ A + c) / 7)[0] < 1e-18


def test_per_class_regression_recovers_one_map_per_class():
    rng = np.random.default_rng(2)
    maps = [(rng.standard_normal((3, 3)), rng.standard_normal(3)) for _ in range(3)]
    reg = CostateRegression(3, 3, features="per-class", ridge=0.0, forgetting=0.5)
    for _ in range(4):
        x, y = rng.standard_normal((40, 3)), rng.integers(0, 3, 40)
        lam = np.stack([x[i] @ maps[y[i]][0] + maps[y[i]][1] for i in range(40)]) / 40
        reg.add(x, y, lam)
    xt, yt = rng.standard_normal((9, 3)), rng.integers(0, 3, 9)
    want = np.stack([xt[i] @ maps[yt[i]][0] + maps[yt[i]][1] for i in range(9)]) / 9
    np.testing.assert_allclose(reg.predict(xt, yt), want, atol=1e-10)
    # the prediction divides by the rows it is given, whatever came before
    np.testing.assert_allclose(reg.predict(xt[:4], yt[:4]), want[:4] * 9 / 4, atol=1e-10)
    np.testing.assert_allclose(reg.predict(xt, yt), want, atol=1e-10)
    again = CostateRegression(3, 3, features="per-class")
    again.load_state(reg.state())
    np.testing.assert_array_equal(again.predict(xt, yt), reg.predict(xt, yt))


@pytest.mark.parametrize("features", ["state", "state+label", "per-class"])
def test_held_pairs_give_the_same_fit_as_adding_one_batch_at_a_time(features):
    rng = np.random.default_rng(3)
    eager = CostateRegression(6, 3, features=features, forgetting=0.9, one_hot=False)
    lazy = CostateRegression(6, 3, features=features, forgetting=0.9, buffer_rows=50,
                             one_hot=False)
    for i in range(12):
        x, y = rng.standard_normal((20, 6)), rng.integers(0, 3, 20)
        lam = rng.standard_normal((20, 6))
        eager.add(x, y, lam, refit=True)
        lazy.add(x, y, lam, refit=(i % 5 == 4))  # held for five batches, some flushed when full
        assert lazy._held.count <= 50
    lazy.refit()
    np.testing.assert_allclose(lazy.G, eager.G, rtol=1e-12)
    np.testing.assert_allclose(lazy.H, eager.H, rtol=1e-12)
    # (state+label's one-hot columns sum to the bias column: only the ridge
    # regularises it, so Θ is ill-conditioned there and rounding shows more)
    np.testing.assert_allclose(lazy.theta, eager.theta, rtol=1e-6, atol=1e-9)
    xt, yt = rng.standard_normal((9, 6)), rng.integers(0, 3, 9)
    np.testing.assert_allclose(lazy.predict(xt, yt), eager.predict(xt, yt), rtol=1e-6, atol=1e-9)
    # in float32 the prediction is computed in float32
    assert lazy.predict(xt.astype(np.float32), yt).dtype == np.float32


def test_held_pairs_travel_with_the_state():
    rng = np.random.default_rng(4)
    a = CostateRegression(4, 3, features="per-class", one_hot=False)
    for _ in range(3):
        a.add(rng.standard_normal((10, 4)), rng.integers(0, 3, 10), rng.standard_normal((10, 4)),
              refit=False)
    b = CostateRegression(4, 3, features="per-class", one_hot=False)
    b.load_state(a.state())
    assert len(a.state()["held_phi"]) == 30
    x, y, lam = rng.standard_normal((10, 4)), rng.integers(0, 3, 10), rng.standard_normal((10, 4))
    a.add(x, y, lam, refit=[0, 2])
    b.add(x, y, lam, refit=[0, 2])
    np.testing.assert_array_equal(a.theta, b.theta)
    assert not a.theta[1].any()  # group 1 was not refitted


def test_a_restored_regression_continues_bit_for_bit_under_a_full_buffer():
    """Pairs held across a checkpoint fold into the same sums at the same
    arrivals as without it, also when the buffer fills up (resume is exact)."""
    rng = np.random.default_rng(7)
    batches = [(rng.standard_normal((10, 4)) * np.exp(2 * rng.standard_normal((10, 1))),
                rng.integers(0, 5, 10), rng.standard_normal((10, 4))) for _ in range(60)]
    kw = dict(features="per-class", forgetting=0.95, buffer_rows=100, one_hot=False)
    a, b = CostateRegression(4, 5, **kw), None
    for i, (x, y, lam) in enumerate(batches):
        if i == 13:
            b = CostateRegression(4, 5, **kw)
            b.load_state(a.state())
        for reg in (a, b) if b is not None else (a,):
            reg.add(x, y, lam, refit=reg.due(i + 1, 4))
    b.refit()
    a.refit()
    np.testing.assert_array_equal(b.G, a.G)
    np.testing.assert_array_equal(b.theta, a.theta)


def test_one_hot_products_give_the_class_by_class_fit():
    rng = np.random.default_rng(5)
    one_hot = CostateRegression(6, 3, features="per-class", forgetting=0.9, one_hot=True)
    by_class = CostateRegression(6, 3, features="per-class", forgetting=0.9, one_hot=False)
    for i in range(8):
        x, y = rng.standard_normal((20, 6)), rng.integers(0, 3, 20)
        lam = rng.standard_normal((20, 6))
        for reg in (one_hot, by_class):
            reg.add(x, y, lam, refit=reg.due(i + 1, 2))
    assert not one_hot._held.count  # nothing held: straight into G, H
    for reg in (one_hot, by_class):
        reg.refit()
    np.testing.assert_allclose(one_hot.G, by_class.G, rtol=1e-12)
    np.testing.assert_allclose(one_hot.H, by_class.H, rtol=1e-12)
    np.testing.assert_allclose(one_hot.theta, by_class.theta, rtol=1e-9)
    xt, yt = rng.standard_normal((9, 6)), rng.integers(0, 3, 9)
    for dtype in (np.float64, np.float32):
        got = one_hot.predict(xt.astype(dtype), yt)
        assert got.dtype == dtype
        np.testing.assert_allclose(got, by_class.predict(xt.astype(dtype), yt), rtol=1e-5)
    # chosen by size: the Swiss roll's 2 classes at n = 32, not MNIST's 10 at n = 128
    assert CostateRegression(32, 2, features="per-class")._use_one_hot(32)
    assert not CostateRegression(128, 10, features="per-class")._use_one_hot(128)
    assert not CostateRegression(32, 2, features="state")._use_one_hot(32)


@pytest.mark.parametrize("features", ["state", "state+label", "per-class"])
def test_the_cached_predictor_follows_every_refit(features):
    """The prediction kept between refits is rewritten, in place, for the
    groups refitted since: after staggered refits it equals a fresh copy's."""
    rng = np.random.default_rng(6)
    reg = CostateRegression(5, 4, features=features, forgetting=0.8, one_hot=False)
    xt, yt = rng.standard_normal((12, 5)), rng.integers(0, 4, 12)
    for i in range(9):
        x, y = rng.standard_normal((16, 5)), rng.integers(0, 4, 16)
        reg.add(x, y, rng.standard_normal((16, 5)), refit=reg.due(i + 1, 3))
        for dtype in (np.float64, np.float32):
            cached = reg.predict(xt.astype(dtype), yt)
            fresh = CostateRegression(5, 4, features=features, one_hot=False)
            fresh.load_state(reg.state())
            np.testing.assert_array_equal(cached, fresh.predict(xt.astype(dtype), yt))
    assert reg.pairs == 9 * 16


def _costates_in_a_subspace(rng, basis, batches, n=24, sw=8, classes=3):
    """Batches ``(x, y, Λ)`` whose per-sample co-states ``n Λ`` are an affine
    map of ``x`` per class, lying in the span of ``basis`` (sw, k)."""
    maps = rng.standard_normal((classes, sw + 1, basis.shape[1]))
    out = []
    for _ in range(batches):
        x, y = rng.standard_normal((n, sw)), rng.integers(0, classes, n)
        p = np.einsum("nf,nfk->nk", np.hstack([x, np.ones((n, 1))]), maps[y]) @ basis.T
        out.append((x, y, p / n))
    return out


@pytest.mark.parametrize("one_hot", [False, True])
def test_a_low_rank_regression_predicts_what_the_full_one_does_in_the_costates_span(one_hot):
    """With co-states in a k-dimensional subspace, ``rank = k`` finds that
    subspace and predicts what the full-width regression predicts."""
    rng = np.random.default_rng(8)
    span = np.linalg.qr(rng.standard_normal((8, 3)))[0]
    full = CostateRegression(8, 3, features="per-class", forgetting=0.95, one_hot=one_hot)
    low = CostateRegression(8, 3, features="per-class", forgetting=0.95, one_hot=one_hot, rank=3)
    for i, (x, y, lam) in enumerate(_costates_in_a_subspace(rng, span, 12)):
        for reg in (full, low):
            reg.add(x, y, lam, refit=reg.due(i + 1, 3))
    assert low.H.shape == (3, 9, 3) and low.theta.shape == (3, 9, 3)
    np.testing.assert_allclose(low.basis @ (low.basis.T @ span), span, atol=1e-9)
    xt, yt = rng.standard_normal((10, 8)), rng.integers(0, 3, 10)
    for dtype in (np.float64, np.float32):
        got = low.predict(xt.astype(dtype), yt)
        assert got.dtype == dtype and got.shape == (10, 8)
        np.testing.assert_allclose(got, full.predict(xt.astype(dtype), yt), rtol=1e-4, atol=1e-5)
    # a rank as wide as the state is the full regression
    assert CostateRegression(8, 3, rank=8).rank == 0
    with pytest.raises(ValueError, match="regression.rank = 9"):
        CostateRegression(8, 3, rank=9)


@pytest.mark.parametrize("m", [2, 40])
def test_the_low_rank_basis_is_the_leading_eigenvectors_of_the_first_pairs(m):
    """``B`` spans the leading eigenvectors of ``pᵀp`` (from the singular
    vectors of ``p``, never forming the sw × sw matrix), orthonormal, and
    completed to ``rank`` columns when fewer pairs than that came."""
    rng = np.random.default_rng(12)
    reg = CostateRegression(8, 3, rank=3)
    p = rng.standard_normal((m, 8)) * np.array([9.0, 7.0, 5.0, 1, 1, 1, 1, 1])
    reg._set_basis(p)
    B = reg.basis
    assert B.shape == (8, 3)
    np.testing.assert_allclose(B.T @ B, np.eye(3), atol=1e-12)
    expected = np.linalg.eigh(p.T @ p)[1][:, ::-1][:, :min(m, 3)]
    np.testing.assert_allclose(B @ (B.T @ expected), expected, atol=1e-10)


def test_a_low_rank_prediction_made_before_any_pairs_follows_the_first_refit():
    """Predicting before the basis exists caches ``Bᵀ = 0``; the first pairs
    folded in (here a refit of one class only) must replace it."""
    rng = np.random.default_rng(11)
    span = np.linalg.qr(rng.standard_normal((8, 3)))[0]
    reg = CostateRegression(8, 3, features="per-class", forgetting=0.95, one_hot=False, rank=3)
    xt, yt = rng.standard_normal((10, 8)), np.full(10, 2)
    assert not reg.predict(xt, yt).any()
    for x, y, lam in _costates_in_a_subspace(rng, span, 4):
        reg.add(x, y, lam, refit=[2])
    fresh = CostateRegression(8, 3, features="per-class", one_hot=False, rank=3)
    fresh.load_state(reg.state())
    assert reg.predict(xt, yt).any()
    np.testing.assert_array_equal(reg.predict(xt, yt), fresh.predict(xt, yt))


def test_the_low_rank_basis_follows_the_costates_to_a_new_subspace():
    """Subspace iteration at each refit of group 0 turns ``B`` to where the
    co-states have moved; ``H`` and ``Θ`` follow it into the new coordinates."""
    rng = np.random.default_rng(9)
    first, second = (np.linalg.qr(rng.standard_normal((8, 2)))[0] for _ in range(2))
    reg = CostateRegression(8, 3, features="per-class", forgetting=0.5, rank=2, one_hot=False)
    batches = _costates_in_a_subspace(rng, first, 6) + _costates_in_a_subspace(rng, second, 30)
    for i, (x, y, lam) in enumerate(batches):
        reg.add(x, y, lam, refit=reg.due(i + 1, 3))
    np.testing.assert_allclose(reg.basis @ (reg.basis.T @ second), second, atol=1e-6)
    # the last batches are predicted as well as the data allow (old pairs forgotten)
    x, y, lam = batches[-1]
    fresh = CostateRegression(8, 3, features="per-class", forgetting=0.5, one_hot=False)
    for i, (xb, yb, lb) in enumerate(batches):
        fresh.add(xb, yb, lb, refit=fresh.due(i + 1, 3))
    np.testing.assert_allclose(reg.predict(x, y), fresh.predict(x, y), rtol=1e-3, atol=1e-6)


def test_a_low_rank_regression_continues_bit_for_bit_from_its_state():
    rng = np.random.default_rng(10)
    span = np.linalg.qr(rng.standard_normal((8, 3)))[0]
    batches = _costates_in_a_subspace(rng, span, 30)
    kw = dict(features="per-class", forgetting=0.9, buffer_rows=100, one_hot=False, rank=3)
    a, b = CostateRegression(8, 3, **kw), None
    for i, (x, y, lam) in enumerate(batches):
        lam = lam + 1e-3 * rng.standard_normal(lam.shape)  # a little outside the span
        if i == 11:
            state = a.state()
            assert {"basis", "basis_Y", "basis_Y_rows"} <= set(state) and len(state["held_phi"])
            b = CostateRegression(8, 3, **kw)
            b.load_state(state)
            again = b.state()
            for key in state:
                np.testing.assert_array_equal(again[key], state[key])
        for reg in (a, b) if b is not None else (a,):
            reg.add(x, y, lam, refit=reg.due(i + 1, 4))
    np.testing.assert_array_equal(b.basis, a.basis)
    np.testing.assert_array_equal(b.GH, a.GH)
    xt, yt = rng.standard_normal((10, 8)), rng.integers(0, 3, 10)
    np.testing.assert_array_equal(b.predict(xt, yt), a.predict(xt, yt))
    # another rank's state does not fit: say so
    with pytest.raises(ValueError, match="rank"):
        CostateRegression(8, 3, features="per-class", rank=2).load_state(a.state())


def test_staggered_refits_visit_every_group_once_per_period():
    reg = CostateRegression(3, 10, features="per-class")
    seen = [g for a in range(1, 51) for g in reg.due(a, 50)]
    assert sorted(seen) == list(range(10))
    assert max(len(reg.due(a, 50)) for a in range(1, 51)) == 1  # spread, never all at once
    assert reg.due(7, 1) == list(range(10))  # refit_every = 1: all, every time
    assert CostateRegression(3, 10).due(50, 50) == [0] and CostateRegression(3, 10).due(49, 50) == []


def test_regression_forgetting_and_ridge():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 3))
    old = CostateRegression(3, 2, ridge=0.0, forgetting=0.01)
    old.add(x, None, (x * 5.0) / 50)
    old.add(x, None, (x * -1.0) / 50)
    # forgetting weights the old batch by 0.01: Θ = (0.01·5 − 1) / 1.01
    np.testing.assert_allclose(old.predict(x) * 50, (0.05 - 1.0) / 1.01 * x, atol=1e-10)
    keep = CostateRegression(3, 2, ridge=0.0, forgetting=1.0)
    keep.add(x, None, (x * 5.0) / 50)
    keep.add(x, None, (x * -1.0) / 50)
    np.testing.assert_allclose(keep.predict(x) * 50, 2.0 * x, atol=1e-8)  # the average map
    shrunk = CostateRegression(3, 2, ridge=10.0, forgetting=1.0)
    shrunk.add(x, None, (x * 5.0) / 50)
    assert np.linalg.norm(shrunk.theta) < np.linalg.norm(keep.theta)
    labels = CostateRegression(3, 2, features="state+label")
    assert labels.features(x, rng.integers(0, 2, 50)).shape == (50, 6)


def test_prolongation():
    c = {"K": np.arange(3.0).reshape(3, 1, 1), "b": np.arange(3.0).reshape(3, 1),
         "open.K": np.ones((1, 2)), "open.b": np.zeros(1), "cls.W": np.ones((2, 1)), "cls.b": np.zeros(2)}
    f = prolong(c, 2, "constant")
    np.testing.assert_array_equal(f["K"].ravel(), [0, 0, 1, 1, 2, 2])
    f = prolong(c, 2, "linear")
    np.testing.assert_allclose(f["b"].ravel(), [0, 0.25, 0.75, 1.25, 1.75, 2])
    np.testing.assert_array_equal(f["open.K"], c["open.K"])


def test_emulated_failure_does_not_hang():
    def body(comm):
        if comm.rank == 1:
            raise RuntimeError("boom on rank 1")
        buf = np.empty(3)
        comm.recv(buf, 1, 0)  # would wait forever without the abort

    with pytest.raises(RuntimeError, match="boom on rank 1"):
        run_emulated(2, body, timeout=60)
