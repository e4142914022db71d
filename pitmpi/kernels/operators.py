"""The linear map inside an ODE layer: dense (matrix) or convolution.

The Euler and Verlet kernels are written once over an operator ``op`` that
knows how to apply a layer's weights ``K[j]`` to a stack of per-sample
states and how to form the weights' gradient (DESIGN §10, §11.5):

- ``op.apply(x, Kj, out)``: ``conv(x, Kj)``; dense ``x @ Kj.T``;
- ``op.apply_t(x, Kj, out)``: the adjoint, ``convᵀ(x, Kj)``; dense ``x @ Kj``,
  so that ``⟨apply(x, K), v⟩ = ⟨x, apply_t(v, K)⟩``;
- both take ``grad=(other, g)`` to write into ``g`` the weight gradient that
  pairs with the product: ``apply(x, ·, grad=(D, g))`` the gradient of
  ``⟨D, apply(x, K)⟩``, ``apply_t(x, ·, grad=(X, g))`` that of
  ``⟨x, apply(X, K)⟩``.  A convolution forms it from the columns the
  product has just built (``op.grads_with_products``); the dense kernels
  batch a chunk of layers' gradients with ``weight_grads`` instead;
- ``op.add_bias(s, bj)``: one bias per unit (dense) or per channel (conv);
- ``op.weight_grads(D, X, out)``: ``out[i] = ∂/∂K ⟨D[i], apply(X[i], K)⟩``
  for a chunk of layers (dense ``D[i]ᵀ X[i]``);
- ``op.bias_grads(D, out)``: ``out[i] = ∂/∂b ⟨D[i], s + b⟩`` (the sum over
  samples, and positions for a convolution).

A state of ``n`` samples has shape ``(n,) + op.sample_shape`` inside the
kernels and travels between blocks flattened to ``(n, op.size)``.
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .workspace import scratch


class Dense:
    """``K[j]`` of shape (w, d) on states (n, d) into (n, w): matrix products.

    Parameters
    ----------
    width : int
        ``w``.
    in_width : int, optional
        ``d`` (default ``w``: an ODE layer; the opening layer maps the
        features' ``d`` to ``w``).
    """

    kind = "dense"
    matmul_fraction = 1.0  # of the matrix-product rate its multiply-adds run at
    # its weight gradients batched per chunk of layers (weight_grads): faster
    # for small layers than one product beside each layer's
    grads_with_products = False

    def __init__(self, width, in_width=None):
        self.width = int(width)
        self.in_width = self.width if in_width is None else int(in_width)
        self.sample_shape = (self.width,)
        self.in_shape = (self.in_width,)
        self.size = self.width
        self.kernel_shape = (self.width, self.in_width)
        self.bias_shape = (self.width,)

    def apply(self, x, Kj, out, ws=None, grad=None):
        if grad is not None:
            np.matmul(grad[0].T, x, out=grad[1])
        return np.matmul(x, Kj.T, out=out)

    def apply_t(self, x, Kj, out, ws=None, grad=None):
        if grad is not None:
            np.matmul(x.T, grad[0], out=grad[1])
        return np.matmul(x, Kj, out=out)

    def add_bias(self, s, bj):
        s += bj

    def weight_grads(self, D, X, out, ws=None):
        """``out[i] = D[i]ᵀ X[i]``: D (k, n, w), X (k, n, d), out (k, w, d)."""
        return np.matmul(D.transpose(0, 2, 1), X, out=out)

    def bias_grads(self, D, out=None):
        """``Σ_samples D[i]``: D (k, n, w), out (k, w)."""
        return np.sum(D, axis=1, out=out)

    def macs(self):
        """Multiply-adds of one ``apply`` per sample."""
        return self.width * self.in_width

    def scratch_per_sample(self):
        """Numbers of scratch an ``apply`` holds per sample (none beyond its output)."""
        return 0


PASS_SCRATCH_BYTES = 2 * 2**20  # a conv's scratch per pass over a slice of the samples


class Conv:
    """``K[j]`` of shape (c, c_in, k, k) (out, in, kernel) on states
    (n, c_in, H_in, W_in) into (n, c, H, W): cross-correlation with "same"
    zero padding (DESIGN §10), stride 1 for an ODE layer, through an im2col
    view (:func:`im2col`) and matrix products.

    Parameters
    ----------
    channels : int
        ``c``.
    height, width : int
        ``H, W`` of the input (of every ODE layer's state).
    kernel : int
        ``k``, odd.
    in_channels : int, optional
        ``c_in`` (default ``c``).
    stride : int
        The output keeps every ``stride``-th position in each direction:
        ``H_out = ceil(H / stride)`` (the opening layer may lower the
        resolution; an ODE layer has stride 1).
    """

    kind = "conv"
    # of the dense products' rate its multiply-adds run at: the shifted copies
    # cost about as much as the small products (measured, c = 8 at 14 x 14,
    # whole loss_and_grad: 8.6 GMAC/s in float64 against 20, 15.6 in float32
    # against 40; c = 16: 12 and 22; run/bench_kernels.py --conv)
    matmul_fraction = 0.4
    grads_with_products = True  # a weight gradient reuses its product's columns

    def __init__(self, channels, height, width, kernel, in_channels=None, stride=1):
        self.channels, self.kernel, self.stride = int(channels), int(kernel), int(stride)
        self.in_channels = self.channels if in_channels is None else int(in_channels)
        if self.kernel % 2 != 1:
            raise ValueError(f"kernel must be odd for 'same' padding, got {kernel!r}")
        c, k, s = self.channels, self.kernel, self.stride
        self.in_shape = (self.in_channels, int(height), int(width))
        self.height, self.width = -(-int(height) // s), -(-int(width) // s)
        self.sample_shape = (c, self.height, self.width)
        self.size = c * self.height * self.width
        self.kernel_shape = (c, self.in_channels, k, k)
        self.bias_shape = (c,)
        # its scratch names: an opening layer's apart from the ODE layers' in a shared workspace
        self.tag = "" if s == 1 else f".s{s}"
        # the kernel rows [a0, a1) of each block of columns (see _columns)
        self.tap_rows = [(a, a + 1) for a in range(k)] if s == 1 else [(0, k)]

    def _columns(self, x, ws, name):
        """The neighbourhoods that an ``apply`` of ``x`` (n, c_in, H, W)
        multiplies, as blocks of rows, one per ``(a0, a1)`` of
        :attr:`tap_rows`: ``cols`` (n, c_in (a1 − a0) k, Ho Wg) holds the
        taps ``(ci, a, b)`` with ``a0 ≤ a < a1``; and ``Wg``: the width of
        the grid the output comes on.

        With stride 1, one block per kernel row ``a``, all views of one
        buffer: the ``k`` shifts ``b`` of the padded images laid end to end
        (each one contiguous copy), of which row ``a``'s taps are the window
        starting ``a`` padded rows further (so ``k`` copies make all ``k²``
        taps; ``Wg = W + k − 1``, whose last ``k − 1`` columns are not
        positions).  Otherwise one block, :func:`im2col` (``Wg`` the
        output's width)."""
        n, c, H, W = x.shape
        k = self.kernel
        p = k // 2
        Hp, Wp = H + 2 * p, W + 2 * p
        if self.stride > 1:
            padded = scratch(ws, name + self.tag + ".pad", (n, c, Hp, Wp), x.dtype)
            shape = cols_shape(x.shape, k, self.stride)
            cols = im2col(x, k, out=scratch(ws, name + self.tag, shape, x.dtype), padded=padded,
                          stride=self.stride)
            return [cols], self.width
        flat = scratch(ws, name + ".pad", (n, c, Hp * Wp + k - 1), x.dtype)
        zero_padded(x, p, flat[:, :, :Hp * Wp].reshape(n, c, Hp, Wp))
        flat[:, :, Hp * Wp:] = 0
        shifted = scratch(ws, name, (n, c, k, Hp * Wp), x.dtype)
        for b in range(k):
            shifted[:, :, b] = flat[:, :, b:b + Hp * Wp]
        L = H * Wp
        return [shifted[..., a * Wp:a * Wp + L].reshape(n, c * k, L) for a, _ in self.tap_rows], Wp

    def passes(self, n, itemsize):
        """Slices of ``n`` samples that an ``apply`` or a weight gradient
        takes at a time, so that their scratch stays near
        :data:`PASS_SCRATCH_BYTES` (in cache: measured 12–23 % faster at
        32 samples than at 128, c = 8, 14 × 14)."""
        rows = max(8, PASS_SCRATCH_BYTES // (self.scratch_per_sample() * itemsize))
        return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]

    def _products(self, x, ws, Kj=None, out=None, other=None):
        """One sweep over the columns of ``x`` (n, c_in, H_in, W_in), pass by
        pass: ``out`` (n, c, H, W) ``= conv(x, Kj)`` where ``Kj`` (c, c_in,
        k, k) is given, and, where ``other`` (n, c_o, H, W) is, the sum over
        samples and positions of ``columns @ otherᵀ``, returned with shape
        (c_in k k, c_o): ``[(ci, a, b), co] = Σ x[ci, · + (a, b) − k//2]
        other[co, ·]``."""
        total = None
        ci, k = x.shape[1], self.kernel
        dt = x.dtype
        if Kj is not None:
            c = Kj.shape[0]
            Kb = [Kj[:, :, a0:a1].reshape(c, -1) for a0, a1 in self.tap_rows]
        for j, rows in enumerate(self.passes(x.shape[0], dt.itemsize)):
            blocks, Wg = self._columns(x[rows], ws, "cols")
            m, L = blocks[0].shape[0], blocks[0].shape[2]
            if Kj is not None:
                grid = scratch(ws, "grid" + self.tag, (m, c, L), dt)
                np.matmul(Kb[0], blocks[0], out=grid)
                for Ka, cols in zip(Kb[1:], blocks[1:]):
                    grid += np.matmul(Ka, cols, out=scratch(ws, "grid1" + self.tag, grid.shape, dt))
                out[rows] = grid.reshape(m, c, self.height, Wg)[..., :self.width]
            if other is not None:
                co = other.shape[1]
                og = scratch(ws, "ogrid" + self.tag, (m, co, self.height, Wg), dt)
                og[..., self.width:] = 0  # on the columns' grid, zero off the positions
                og[..., :self.width] = other[rows]
                ogT = og.reshape(m, co, -1).transpose(0, 2, 1)
                if j == 0:
                    total = scratch(ws, "gtot" + self.tag, (ci, k, k, co), dt)
                for (a0, a1), cols in zip(self.tap_rows, blocks):
                    # columns @ otherᵀ, not other @ columnsᵀ: the contiguous operand
                    # first (measured 1.7x faster, c = 16 at 14 x 14, float32)
                    per = scratch(ws, "gper" + self.tag, (m, cols.shape[1], co), dt)
                    np.matmul(cols, ogT, out=per)
                    block = total[:, a0:a1]
                    if j == 0:
                        block[...] = per.sum(axis=0).reshape(block.shape)
                    else:
                        block += per.sum(axis=0).reshape(block.shape)
        return None if total is None else total.reshape(-1, total.shape[-1])

    def _kernel_gradient(self, total):
        """``Σ D ⋆ x`` shaped as ``K`` (c, c_in, k, k), from
        :meth:`_products`' ``total`` (c_in k k, c) of the columns of ``x``
        against ``D``."""
        return total.T.reshape(self.kernel_shape)

    def apply(self, x, Kj, out, ws=None, grad=None):
        """``conv(x, Kj)``: x (n, c_in, H_in, W_in), out (n, c, H, W);
        ``grad=(D, g)``: also ``g`` (c, c_in, k, k) ``= Σ_samples D ⋆ x``."""
        total = self._products(x, ws, Kj, out, None if grad is None else grad[0])
        if grad is not None:
            grad[1][...] = self._kernel_gradient(total)
        return out

    def apply_t(self, x, Kj, out, ws=None, grad=None):
        """``convᵀ(x, Kj)``: the correlation with the kernel flipped in space
        and its channels swapped (square, stride 1: an ODE layer);
        ``grad=(X, g)``: also ``g = Σ_samples x ⋆ X``, the gradient of
        ``⟨x, conv(X, K)⟩``, from the same columns (those of ``x``, whose
        shifts are the flipped ones)."""
        flipped = Kj[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
        Kt = scratch(ws, "Kflip", flipped.shape, Kj.dtype)
        Kt[...] = flipped
        total = self._products(x, ws, Kt, out, None if grad is None else grad[0])
        if grad is not None:
            k = self.kernel
            grad[1][...] = total.reshape(-1, k, k, self.in_channels)[:, ::-1, ::-1].transpose(0, 3, 1, 2)
        return out

    def add_bias(self, s, bj):
        s += bj[:, None, None]

    def weight_grads(self, D, X, out, ws=None):
        """``out[i] = Σ_samples D[i] ⋆ X[i]``: D (k, n, c, H, W), X (k, n, c_in,
        H_in, W_in), out (k, c, c_in, kh, kw)."""
        for i in range(D.shape[0]):
            out[i] = self._kernel_gradient(self._products(X[i], ws, other=D[i]))
        return out

    def bias_grads(self, D, out=None):
        """``Σ_{samples, positions} D[i]``: D (k, n, c, H, W), out (k, c)."""
        return np.sum(D, axis=(1, 3, 4), out=out)

    def macs(self):
        """Multiply-adds of one ``apply`` per sample."""
        return self.size * self.in_channels * self.kernel * self.kernel

    def scratch_per_sample(self):
        """Numbers of scratch an ``apply`` holds per sample: the padded
        image, the shifted copies (im2col) and the output on the padded
        width."""
        k, (c, H, W) = self.kernel, self.in_shape
        padded = c * (H + k) * (W + k)
        if self.stride > 1:
            return padded + c * k * k * self.height * self.width
        return padded + (c * k * (H + k - 1) + 2 * self.channels * H) * (W + k - 1)


def zero_padded(x, p, out):
    """``x`` (n, c, H, W) with ``p`` zeros around each image, written into
    ``out`` (n, c, H + 2p, W + 2p)."""
    H, W = x.shape[2:]
    if p:
        out[:, :, :p] = 0
        out[:, :, H + p:] = 0
        out[:, :, :, :p] = 0
        out[:, :, :, W + p:] = 0
    out[:, :, p:p + H, p:p + W] = x
    return out


def cols_shape(shape, k, stride=1):
    """Shape of :func:`im2col` of states ``shape`` (n, c, H, W): (n, c k k,
    H' W') with ``H' = ceil(H / stride)``."""
    n, c, H, W = shape
    return (n, c * k * k, -(-H // stride) * -(-W // stride))


def im2col(x, k, out=None, padded=None, stride=1):
    """The k × k neighbourhoods of every position, zero-padded ("same").

    Parameters
    ----------
    x : ndarray, shape (n, c, H, W)
    k : int
        Odd kernel size.
    out : ndarray, shape (n, c k k, H W), optional
    padded : ndarray, shape (n, c, H + k − 1, W + k − 1), optional
        Scratch for the zero-padded copy of ``x``.
    stride : int
        Keep the neighbourhoods of every ``stride``-th position only.

    Returns
    -------
    ndarray, shape (n, c k k, H' W')
        ``out[s, (ch, a, b), (i, j)] = x[s, ch, S i + a − k//2, S j + b −
        k//2]`` (0 outside the image; ``S`` the stride), so that a kernel
        ``K`` (c_out, c, k, k) gives the correlation as ``K.reshape(c_out,
        -1) @ out[s]``.
    """
    n, c, H, W = x.shape
    p = k // 2
    if padded is None:
        padded = np.empty((n, c, H + 2 * p, W + 2 * p), dtype=x.dtype)
    zero_padded(x, p, padded)
    windows = sliding_window_view(padded, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    Ho, Wo = windows.shape[2], windows.shape[3]  # windows: (n, c, Ho, Wo, k, k)
    if out is None:
        out = np.empty(cols_shape(x.shape, k, stride), dtype=x.dtype)
    out.reshape(n, c, k, k, Ho, Wo)[...] = windows.transpose(0, 1, 4, 5, 2, 3)
    return out
