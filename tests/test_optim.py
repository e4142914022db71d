"""The optimizer: SGD with momentum and weight decay on one flat buffer."""
import numpy as np
import pytest

from pitmpi import ResNet
from pitmpi.optim import SGD


def reference_steps(params, grads_seq, lrs, momentum, decay):
    """SGD with momentum and weight decay, parameter by parameter."""
    p = {k: v.copy() for k, v in params.items()}
    v = {k: np.zeros_like(a) for k, a in params.items()}
    penalties = []
    for grads, lr in zip(grads_seq, lrs):
        penalties.append(0.5 * sum(decay[k] * float(np.vdot(p[k], p[k])) for k in p))
        for k in p:
            v[k] = momentum * v[k] + (grads[k] + decay[k] * p[k])
            p[k] = p[k] - lr * v[k]
    return p, v, penalties


def test_sgd_matches_the_update_parameter_by_parameter():
    rng = np.random.default_rng(0)
    shapes = {"K": (3, 4, 4), "b": (3, 4), "cls.W": (2, 4)}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    decay = {"K": 0.01, "b": 0.01, "cls.W": 0.1}
    grads_seq = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(3)]
    lrs = [0.1, 0.1, 0.05]
    ref_p, ref_v, ref_pen = reference_steps(params, grads_seq, lrs, 0.9, decay)
    mine = {k: v.copy() for k, v in params.items()}
    opt = SGD(mine, 0.9, decay)
    penalties = [opt.step(mine, {k: g.copy() for k, g in grads.items()}, lr)
                 for grads, lr in zip(grads_seq, lrs)]
    for k in shapes:
        np.testing.assert_allclose(mine[k], ref_p[k], rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(opt.velocity[k], ref_v[k], rtol=1e-14, atol=1e-15)
        assert np.shares_memory(mine[k], opt.flat)  # the dict's entries are views now
    np.testing.assert_allclose(penalties, ref_pen, rtol=1e-13)
    # without weight decay: no penalty, plain momentum
    plain = {k: v.copy() for k, v in params.items()}
    opt = SGD(plain, 0.5)
    assert opt.step(plain, grads_seq[0], 1.0) == 0.0
    np.testing.assert_allclose(plain["b"], params["b"] - grads_seq[0]["b"], rtol=1e-15)


def test_sgd_refuses_replaced_parameters_missing_gradients_and_mixed_dtypes():
    params = {"K": np.ones((2, 2)), "b": np.ones(2)}
    opt = SGD(params, 0.9)
    params["b"] = np.zeros(2)
    with pytest.raises(ValueError, match="'b' was replaced"):
        opt.step(params, {"K": np.ones((2, 2)), "b": np.ones(2)}, 0.1)
    params = {"K": np.ones((2, 2)), "b": np.ones(2)}
    opt = SGD(params, 0.9)
    with pytest.raises(ValueError, match="every parameter needs one"):
        opt.step(params, {"K": np.ones((2, 2))}, 0.1)
    with pytest.raises(ValueError, match="one dtype"):
        SGD({"K": np.ones(2), "b": np.ones(2, dtype=np.float32)}, 0.9)


def test_sgd_velocity_round_trip():
    params = {"K": np.ones((2, 2)), "b": np.ones(2)}
    opt = SGD(params, 0.9)
    opt.step(params, {"K": np.full((2, 2), 2.0), "b": np.full(2, 3.0)}, 0.1)
    saved = {k: v.copy() for k, v in opt.velocity.items()}
    other = SGD({k: v.copy() for k, v in params.items()}, 0.9)
    other.load_velocity(saved)
    for k in saved:
        np.testing.assert_array_equal(other.velocity[k], saved[k])


@pytest.mark.parametrize("scheme", ["euler", "verlet"])
def test_block_optimizer_takes_the_adjoint_gradients_in_place(scheme):
    """With a reused workspace the adjoint writes K, b and the opening layer's
    gradients into the optimizer's buffer, and a step equals the reference."""
    net = ResNet(scheme, 3, 4, 6, 3, T=2.0, weight_decay=0.01)
    blk = net.full(reuse=True)
    params = blk.local_params(net.init_params(1))
    start = {k: v.copy() for k, v in params.items()}
    opt = blk.optimizer(params, 0.9)
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((5, 3)), rng.integers(0, 3, 5)
    _, grads, (loss, _) = blk.backward(params, blk.forward(params, X), y=y)
    for name in ("K", "b", "open.K"):
        assert grads[name] is opt.grads[name]
    expected_loss, g = net.loss_and_grad(start, X, y)  # includes the decay gradient
    penalty = opt.step(params, grads, 0.1)
    assert loss + penalty == pytest.approx(expected_loss, rel=1e-13)
    for k in params:
        np.testing.assert_allclose(params[k], start[k] - 0.1 * g[k], rtol=1e-13, atol=1e-15)


def test_layout_does_not_depend_on_the_order_of_the_dict():
    # a checkpoint read back lists parameters alphabetically, a fresh start in
    # the network's order: the buffer, and so every sum over it, must agree
    rng = np.random.default_rng(3)
    shapes = {"open.K": (4, 2), "K": (3, 4, 4), "b": (3, 4), "cls.W": (2, 4)}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    decay = {k: 0.01 * (i + 1) for i, k in enumerate(shapes)}
    grads = {k: rng.standard_normal(s) for k, s in shapes.items()}
    a = SGD({k: params[k].copy() for k in shapes}, 0.9, decay)
    b = SGD({k: params[k].copy() for k in sorted(shapes, reverse=True)}, 0.9, decay)
    np.testing.assert_array_equal(a.flat, b.flat)
    assert a.step(a.params, grads, 0.1) == b.step(b.params, grads, 0.1)
    np.testing.assert_array_equal(a.flat, b.flat)


def test_lr_per_time_steps_ode_controls_by_their_gradient_over_h():
    """train.lr_per = "time": ``v ← μ v + (g + βp) / h`` on K and b, the
    plain gradient on the opening layer and classifier."""
    net = ResNet("verlet", 3, 4, 8, 2, T=2.0, weight_decay=0.01)
    blk = net.block(0, 8)
    params = net.init_params(0)
    X = np.random.default_rng(1).standard_normal((5, 3))
    y = np.array([0, 1, 1, 0, 1])
    _, grads = net.loss_and_grad(params, X, y)
    moved = {}
    for lr_per in ("layer", "time"):
        p = blk.local_params(params)
        opt = blk.optimizer(p, 0.9, lr_per)
        before = {k: v.copy() for k, v in p.items()}
        opt.step(p, {k: grads[k] - (0.01 * net.h * params[k] if k in ("K", "b") else
                                    0.01 * params[k]) for k in p}, 0.1)
        moved[lr_per] = {k: p[k] - before[k] for k in p}
    for k in moved["layer"]:
        factor = 1.0 / net.h if k in ("K", "b") else 1.0
        np.testing.assert_allclose(moved["time"][k], factor * moved["layer"][k], rtol=1e-8,
                                   err_msg=k)
    assert net.h == 0.25


def test_lr_per_time_moves_the_function_alike_at_any_depth():
    """One step of the ODE layers' controls from a depth-independent start:
    the per-unit-time step changes the loss by about the same at L = 16 and
    128; the per-layer one by ~8x less."""
    X = np.random.default_rng(2).standard_normal((64, 2))
    y = (X[:, 0] * X[:, 1] > 0).astype(int)
    change = {}
    for lr_per in ("layer", "time"):
        for L in (16, 128):
            net = ResNet("euler", 2, 8, L, 2, T=1.0, weight_decay=0.0)
            base = net.with_layers(1).init_params(0)
            params = dict(base, K=np.repeat(base["K"], L, axis=0), b=np.repeat(base["b"], L, axis=0))
            blk = net.block(0, L)
            p = blk.local_params(params)
            opt = blk.optimizer(p, 0.0, lr_per)
            loss0, grads = net.loss_and_grad(params, X, y)
            ode_only = {k: grads[k] if k in ("K", "b") else np.zeros_like(grads[k]) for k in p}
            opt.step(p, ode_only, 1e-2 if lr_per == "time" else 1e-2 * 16)
            change[lr_per, L] = loss0 - net.loss_and_grad(p, X, y)[0]
    assert change["time", 128] == pytest.approx(change["time", 16], rel=0.05)
    assert change["layer", 128] < 0.2 * change["layer", 16]
