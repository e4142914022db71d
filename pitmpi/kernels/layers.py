"""Opening layer and classifier with softmax cross-entropy (DESIGN §2, §10).

Opening: ``Y0 = σ(op(X, Ko) + bo)`` (dense ``X @ Ko.T``; conv a strided
correlation).  Classifier on the features ``F`` of ``Y_L`` (the flattened
state, or its per-channel means): ``S = F @ W.T + mu`` and
``Φ = (1/n) Σ_i [logsumexp(S_i) − S_{i,y_i}]``.
"""
import numpy as np


def opening_forward(Ko, bo, X, act, op):
    """Return ``σ(op(X, Ko) + bo)``, shape (n, op.size), for ``X`` (n, d)
    (``op``: the opening layer's operator)."""
    n = X.shape[0]
    S0 = np.empty((n, op.size), dtype=np.result_type(X, Ko))
    op.apply(X.reshape((n,) + op.in_shape), Ko, S0.reshape((n,) + op.sample_shape))
    op.add_bias(S0.reshape((n,) + op.sample_shape), bo)
    return act.apply(S0)


def opening_backward(X, S0, lam0, act, op, out=None):
    """Gradients of the opening layer.

    Parameters
    ----------
    X : ndarray, shape (n, d)
    S0 : ndarray, shape (n, op.size)
        Output of :func:`opening_forward`.
    lam0 : ndarray, shape (n, op.size)
        Co-state ``Λ^Y_0``.
    act : Activation
    op : Dense or Conv
        As for :func:`opening_forward`.
    out : ndarray, shape op.kernel_shape, optional
        Where to write ``gKo``.

    Returns
    -------
    gKo : ndarray, shape op.kernel_shape
    gbo : ndarray, shape op.bias_shape
    """
    D0 = act.scale_by_derivative(S0, lam0, out=np.empty_like(S0))
    n = X.shape[0]
    if out is None:
        out = np.empty(op.kernel_shape, dtype=D0.dtype)
    D0 = D0.reshape((1, n) + op.sample_shape)
    op.weight_grads(D0, X.reshape((1, n) + op.in_shape), out[None])
    return out, op.bias_grads(D0)[0]


def scores(W, mu, Y):
    """Class scores ``Y @ W.T + mu``, shape (n, c)."""
    S = Y @ W.T
    S += mu
    return S


def cross_entropy(S, y):
    """Per-sample cross-entropy terms and softmax probabilities.

    Parameters
    ----------
    S : ndarray, shape (n, c)
        Scores.
    y : ndarray of int, shape (n,)

    Returns
    -------
    losses : ndarray, shape (n,)
        ``logsumexp(S_i) − S_{i, y_i}``.
    P : ndarray, shape (n, c)
        ``softmax(S)``.
    """
    shift = S.max(axis=1, keepdims=True)
    E = np.exp(S - shift)
    Z = E.sum(axis=1, keepdims=True)
    rows = np.arange(S.shape[0])
    losses = (np.log(Z[:, 0]) + shift[:, 0]) - S[rows, y]
    P = E / Z
    return losses, P


def score_stats(S, y):
    """``(Σ_i cross-entropy, #correct)`` of scores ``S`` (n, c) for labels ``y`` (n,)."""
    losses, _ = cross_entropy(S, y)
    return float(losses.sum()), int(np.count_nonzero(S.argmax(axis=1) == y))


def output_errors(P, y, smoothing=0.0):
    """The loss gradient at the scores of each sample, ``softmax(S) − q``
    with the targets ``q = (1 − ε) onehot(y) + ε / c``, in place on ``P``.

    Parameters
    ----------
    P : ndarray, shape (n, c)
        ``softmax(S)`` (overwritten).
    y : ndarray of int, shape (n,)
    smoothing : float
        Label smoothing ``ε``.

    Returns
    -------
    ndarray, shape (n, c)
        ``P``.
    """
    if smoothing:
        P[np.arange(len(y)), y] -= 1.0 - smoothing
        P -= smoothing / P.shape[1]
    else:
        P[np.arange(len(y)), y] -= 1.0
    return P


def classifier_loss_and_grad(W, mu, Y, y, n_norm, smoothing=0.0, errors=None):
    """Loss and gradients of the classifier for the last state ``Y``.

    Parameters
    ----------
    W : ndarray, shape (c, w)
    mu : ndarray, shape (c,)
    Y : ndarray, shape (n, w)
        Final state ``Y_L`` (for Verlet only the ``Y`` half).
    y : ndarray of int, shape (n,)
    n_norm : int
        The ``n`` of the mean (the whole batch; a data-parallel rank holds a
        slice of it).
    smoothing : float
        Label smoothing ``ε``: the target is ``q = (1 − ε) onehot(y) + ε / c``.
    errors : ndarray, shape (n, c), optional
        Receives each row's output error ``softmax(S) − q`` (see
        :func:`output_errors`).

    Returns
    -------
    loss_sum : float
        ``Σ_i [logsumexp(S_i) − q_i · S_i] / n_norm`` over the rows given
        (with ``ε = 0``: ``logsumexp(S_i) − S_{i,y_i}``).
    correct : int
        Number of rows whose arg-max score is the label.
    gW : ndarray, shape (c, w)
    gmu : ndarray, shape (c,)
    lamY : ndarray, shape (n, w)
        ``Λ_L = G @ W`` with ``G = (softmax(S) − q) / n_norm``.
    """
    S = scores(W, mu, Y)
    losses, G = cross_entropy(S, y)
    correct = int(np.count_nonzero(S.argmax(axis=1) == y))
    if smoothing:
        # −q·S = −(1 − ε) S_y − (ε / c) Σ_j S_j, and logsumexp − S_y is in losses already
        losses = losses + smoothing * (S[np.arange(len(y)), y] - S.mean(axis=1))
    output_errors(G, y, smoothing)
    if errors is not None:
        errors[...] = G
    G /= n_norm
    return float(losses.sum() / n_norm), correct, G.T @ Y, G.sum(axis=0), G @ W
