"""Co-state regression at a block boundary (DESIGN §5, the paper's eq. (6)).

Per-sample pairs ``(x_i, p_i)``, ``p_i = n Λ_i``, are fitted by ridge least
squares ``p ≈ φ(x) Θ`` with ``φ(x) = [x, 1]`` (``state``), ``[x, onehot(y), 1]``
(``state+label``) or ``onehot(y) ⊗ [x, 1]`` (``per-class``: one affine map per
class; a sample's co-state changes sign with its label, so the label matters).  The
normal equations ``G = Σ φφᵀ``, ``H = Σ φ pᵀ`` are kept with exponential
forgetting ``G ← γG + ΦᵀΦ``, so an update costs ``O(m f²)`` for ``m`` pairs and
a refit ``O(f³ + f² sw)`` per group (Cholesky).  A batch's co-state is
predicted as ``Λ̂ = φ(X) Θ / n``, in the network's dtype.

With ``rank = k > 0`` the co-states are kept and predicted in the
coordinates of a ``k``-dimensional subspace, ``p ≈ φ(x) Θ Bᵀ`` with ``B``
(sw, k) orthonormal and ``H = Σ φ (p B)ᵀ``: a sample's co-state at a
boundary is the loss gradient, whose ``c`` class directions the layers to
the right map back, so the co-states lie close to a subspace of about ``c``
dimensions (MNIST: 99.9 % of their energy in 10 of 128).  That makes the
pair update ``O(m f (f + k))`` and the prediction ``O(n k (f + sw))``.  ``B``
starts as the leading eigenvectors of the first co-states folded in and
follows their span by subspace iteration: the folded pairs accumulate
``Y = Σ p pᵀ B``, and when the first group is refitted ``B ← qr(Y)``, with
``H`` and ``Θ`` carried into the new coordinates (``B_oldᵀ B_new``).
"""
import numpy as np
import scipy.linalg.blas
import scipy.linalg.lapack


FEATURES = ("state", "state+label", "per-class")
MAX_NORMAL_EQUATIONS_GIB = 1.0  # larger ones are refused, naming the keys that shrink them

# With few classes and small states, ``per-class`` handles all classes in one
# product over one-hot-masked rows instead of one call per class: worth it
# while the extra arithmetic, (groups − 1) · rows · f (f + k) multiply-adds,
# stays under what a class's own calls cost (about 5 µs, 1e5 multiply-adds).
ONE_HOT_LIMIT = 1e5


def one_hot_cheaper(groups, rows, f, k):
    """Whether ``rows`` samples of ``groups`` classes (``f`` features, ``k``
    co-state coordinates: the state width, or ``regression.rank``) are
    cheaper in one-hot products than class by class."""
    return groups > 1 and (groups - 1) * rows * f * (f + k) <= ONE_HOT_LIMIT * groups


class CostateRegression:
    """Ridge regression of per-sample co-states on states, with forgetting.

    ``per-class`` keeps one independent affine map per class: its normal
    equations are block diagonal, so each class is solved on its own
    (``c`` Cholesky factorisations of size ``sw + 1`` instead of one of size
    ``c (sw + 1)``).

    New pairs wait in one buffer, with their groups, and enter a group's
    ``G`` and ``H`` in one product when that group is refitted (or when the
    waiting pairs fill the buffer): ``Θ`` depends on them only through a
    refit, so the result is the same as adding them one batch at a time (up
    to the order of the sums), at a fraction of the cost of many thin
    products.  Each group remembers how far into the buffer it has folded;
    the buffer empties once every group is past its end, and a full one
    first drops the rows already folded.

    Parameters
    ----------
    state_width : int
        Width of the boundary state (``w``, or ``2w`` for Verlet).
    n_classes : int
    features : {"state", "state+label", "per-class"}
    ridge : float
        Ridge weight relative to the mean diagonal of each group's ``G``.
    forgetting : float
        ``γ`` in (0, 1]; 1 keeps every pair with equal weight.
    pairs_per_batch : int
        Add only the first this many pairs of each batch (batches are random
        draws, so these are a random subset; 0: all).
    buffer_rows : int
        Held pairs are folded into their groups' ``G`` and ``H`` when those
        are refitted, or all at once when this many wait.
    one_hot : bool or None
        ``per-class`` only: predict and add all classes at once through
        one-hot-masked products (pairs enter ``G`` and ``H`` at once, none
        are held) instead of class by class.  None: when that is cheaper
        (:data:`ONE_HOT_LIMIT`; the Swiss roll's 2 classes, not MNIST's 10).
    rank : int
        ``k``: keep and predict the co-states in the coordinates of a
        ``k``-dimensional subspace that follows their span (module
        docstring); 0 or ``state_width``: the full width.
    state_map : callable, optional
        The state part of ``φ``: ``state_map(x)`` (m, q) for states ``x``
        (m, sw), with ``state_map.width = q`` (e.g. :class:`PooledStates`);
        default the state itself (``q = sw``).

    Attributes
    ----------
    GH : ndarray, shape (groups, f, f + k)
        ``[G | H]``, the normal equations side by side (:attr:`G` and
        :attr:`H` are views of it); ``k`` is ``rank``, or ``sw`` at full rank.
    theta : ndarray, shape (groups, f, k)
        ``groups`` is ``n_classes`` for ``per-class`` and 1 otherwise.
    basis : ndarray, shape (sw, k), or None
        ``B`` with a rank, once pairs have set it.
    """

    def __init__(self, state_width, n_classes, features="state", ridge=1e-6, forgetting=0.9,
                 pairs_per_batch=0, buffer_rows=4096, one_hot=None, rank=0, state_map=None):
        self.state_width, self.n_classes = int(state_width), int(n_classes)
        self.state_map = state_map
        self.in_width = self.state_width if state_map is None else int(state_map.width)
        if features not in FEATURES:
            raise ValueError(f"unknown regression features {features!r}; allowed: {FEATURES}")
        self.rank = int(rank)
        if not 0 <= self.rank <= self.state_width:
            raise ValueError(f"regression.rank = {rank} is not allowed here: it must lie in "
                             f"[0, {self.state_width}], the boundary state's width (0: full)")
        if self.rank == self.state_width:
            self.rank = 0  # the whole space: the same prediction without the detour
        self.basis = None  # B, shape (sw, rank), set by the first pairs folded in
        self.kind = features
        self.use_labels = features != "state"
        self.ridge, self.forgetting = float(ridge), float(forgetting)
        self.pairs_per_batch = int(pairs_per_batch)
        self.groups = self.n_classes if features == "per-class" else 1
        f, k = self.n_features, self.out_width
        gib = self.groups * f * (f + k) * 8 / 2**30
        if gib > MAX_NORMAL_EQUATIONS_GIB:
            raise ValueError(f"the co-state regression at a boundary would hold {gib:.1f} GiB of "
                             f"normal equations ({f} features per sample, boundary state width "
                             f"{self.state_width}); fit on fewer features: regression.pool "
                             "(conv states), regression.rank, or regression.features")
        self.GH = np.zeros((self.groups, f, f + k))  # [G | H] side by side: one product updates both
        self.theta = np.zeros((self.groups, f, k))
        self._Y = np.zeros((self.state_width, k)) if self.rank else None  # Σ p pᵀ B since B was set
        self._Y_rows = 0
        self._A = None  # refit workspace, made by the first refit (a coarse phase's
        # regressions on ranks other than 0 never refit)
        self.scale = 1.0
        self.pairs = 0
        self.buffer_rows = int(buffer_rows)
        self._held = _Held(self.groups, f, self.state_width)
        self._predictor = {}  # (dtype, n) -> _Predictor: theta / n in the batch's dtype
        self.one_hot = one_hot
        self._class_ids = np.arange(self.groups)[:, None]

    @classmethod
    def from_config(cls, state_width, n_classes, rg, state_map=None):
        """The regression a ``[regression]`` config table describes (with
        ``state_map``, see the class)."""
        return cls(state_width, n_classes, rg["features"], rg["ridge"], rg["forgetting"],
                   rg["pairs_per_batch"], rank=rg["rank"], state_map=state_map)

    @property
    def out_width(self):
        """Columns of ``H`` and ``Θ``: ``rank``, or ``sw`` at full rank."""
        return self.rank or self.state_width

    def _project(self, rows):
        """``p B`` (m, k) for pairs ``[φ, p]`` (m, f + sw), adding ``pᵀ (p B)``
        to ``Y``.  The first pairs set ``B``."""
        p = rows[:, self.n_features:]
        if self.basis is None:
            self._set_basis(p)
        pB = p @ self.basis
        self._Y += p.T @ pB
        self._Y_rows += len(rows)
        return pB

    def _fold(self, g, rows):
        """Add weighted pairs ``[φ, p]`` (m, f + sw) of group ``g`` to ``G_g`` and ``H_g``."""
        f = self.n_features
        if not self.rank:
            self.GH[g] += rows[:, :f].T @ rows
            return
        pB = self._project(rows)
        phi = np.asfortranarray(rows[:, :f])
        upper = scipy.linalg.blas.dsyrk(1.0, phi, trans=1)  # ΦᵀΦ at half the cost, one triangle
        upper += np.triu(upper, 1).T
        self.GH[g, :, :f] += upper
        self.GH[g, :, f:] += phi.T @ pB

    def _set_basis(self, p):
        """``B``: the leading eigenvectors of ``pᵀ p`` for co-states ``p`` (m,
        sw), as the leading right singular vectors of ``p`` (memory m·sw,
        not sw²: 315 MB and a gigabyte of eigensolver at sw = 6,272),
        completed orthonormally when fewer than ``rank`` pairs came.  Every
        cached prediction is stale then (its ``Bᵀ`` was zero)."""
        vectors = np.linalg.svd(p, full_matrices=False)[2][:self.rank].T
        if vectors.shape[1] < self.rank:
            start = np.hstack([vectors, np.eye(self.state_width, self.rank)])
            vectors = np.linalg.qr(start)[0][:, :self.rank]
        self.basis = np.ascontiguousarray(vectors)
        for predictor in self._predictor.values():
            predictor.stale.update(range(self.groups))

    def _follow_subspace(self):
        """One step of subspace iteration, ``B ← qr(Y)``, once ``Y`` holds at
        least ``sw`` pairs; ``H`` and ``Θ`` follow into the new coordinates."""
        if self._Y_rows < self.state_width or not self._Y.any():
            return False
        basis = np.linalg.qr(self._Y)[0]
        self._rotate(self.basis.T @ basis)
        self.basis = basis
        self._Y[...] = 0.0
        self._Y_rows = 0
        return True

    def _rotate(self, R):
        """Carry ``H`` and ``Θ`` into new coordinates: ``H ← H R``, ``Θ ← Θ R``."""
        f = self.n_features
        self.GH[:, :, f:] = self.GH[:, :, f:] @ R
        self.theta = self.theta @ R

    def _use_one_hot(self, rows):
        """Whether ``rows`` samples go through the one-hot products."""
        if self.groups == 1:
            return False
        if self.one_hot is not None:
            return bool(self.one_hot)
        return one_hot_cheaper(self.groups, rows, self.n_features, self.out_width)

    @property
    def n_features(self):
        """Features per group: ``q + 1`` (``+ c`` with ``state+label``), ``q``
        the state part's width (``sw`` without a state map)."""
        return self.in_width + 1 + (self.n_classes if self.kind == "state+label" else 0)

    @property
    def G(self):
        """``G = Σ φφᵀ`` (times ``scale``), shape (groups, f, f): a view of :attr:`GH`."""
        return self.GH[:, :, :self.n_features]

    @property
    def H(self):
        """``H = Σ φ pᵀ`` (times ``scale``), shape (groups, f, sw): a view of :attr:`GH`."""
        return self.GH[:, :, self.n_features:]

    def features(self, x, y=None):
        """``φ(x)`` of each sample within its group, shape (n, f)."""
        return self._rows(x, y)

    def _rows(self, x, y=None, lam=None, n=1.0):
        """``[φ(x), n Λ]`` side by side, shape (m, f + sw); ``φ(x)`` alone,
        shape (m, f), without ``lam``."""
        m, sw, q, f = x.shape[0], self.state_width, self.in_width, self.n_features
        rows = np.empty((m, f + (sw if lam is not None else 0)))
        rows[:, :q] = x if self.state_map is None else self.state_map(x)
        rows[:, f - 1] = 1.0
        if self.kind == "state+label":
            rows[:, q:f - 1] = 0.0
            rows[np.arange(m), q + np.asarray(y)] = 1.0
        if lam is not None:
            np.multiply(lam, n, out=rows[:, f:], dtype=np.float64)
        return rows

    def _segments(self, y, n):
        """``(order, [(group, slice)])``: rows sorted by group, one slice each."""
        if self.groups == 1:
            return None, [(0, slice(0, n))]
        order = np.argsort(y, kind="stable")
        counts = np.bincount(y, minlength=self.groups)
        ends = np.cumsum(counts).tolist()
        return order, [(g, slice(end - count, end))
                       for g, (count, end) in enumerate(zip(counts.tolist(), ends)) if count]

    def due(self, arrival, every):
        """Groups to refit at the ``arrival``-th batch of pairs (1, 2, ...) when
        each is refitted every ``every`` arrivals: group ``g`` at arrivals
        ``≡ −⌊g·every/groups⌋ (mod every)``, so the refits of the groups are
        spread evenly over the arrivals instead of all falling on one."""
        return [g for g in range(self.groups)
                if (arrival + g * every // self.groups) % every == 0]

    def add(self, x, y, lam, refit=True, n=None):
        """Add the batch's pairs: states ``x`` (m, sw), labels ``y`` (m,) and
        batch co-states ``lam`` (m, sw), scaled here to ``p = n Λ`` (``n``:
        the size of the batch ``lam`` is normalised by; default ``m``).
        ``refit``: True refits every group, a list of groups refits those
        (see :meth:`due`), False or an empty list none."""
        m = x.shape[0]
        n = m if n is None else n
        if 0 < self.pairs_per_batch < m:
            m = self.pairs_per_batch
            x, lam = x[:m], lam[:m]
            y = None if y is None else y[:m]
        # forgetting without touching G and H: the true normal equations are
        # scale · (G, H), and a new pair enters with weight 1 / scale
        self.scale *= self.forgetting
        if self.scale < 1e-100:
            self.flush()
            self.GH *= self.scale
            if self.rank:
                self._Y *= self.scale
            self.scale = 1.0
        rows = self._rows(x, y, lam, n)  # [φ, p]
        rows *= (1.0 / self.scale) ** 0.5
        self.pairs += m
        if self._use_one_hot(m):
            # column i of class g: masked[g] keeps it, the other classes see zeros
            if self.rank:
                rows = np.hstack([rows[:, :self.n_features], self._project(rows)])
            masked = (np.asarray(y) == self._class_ids)[:, None, :] * rows[:, :self.n_features].T
            self.GH += masked @ rows
        else:
            self._hold(rows, y, m)
        if refit:
            self.refit(None if refit is True else refit)

    def _hold(self, rows, y, m):
        """Keep weighted pairs ``[φ, p]`` with their groups until those are
        refitted.  A full buffer first drops the rows already folded; only
        if the pairs still waiting fill it are they all folded at once: so
        that happens at the same arrivals after a restore from
        :meth:`state` (which keeps the waiting pairs only) as without one."""
        held = self._held
        if held.count + m > self.buffer_rows:
            held.compact()
            if held.count + m > self.buffer_rows:
                self.flush()
        held.append(rows, 0 if self.groups == 1 else y[:m])

    def flush(self, groups=None):
        """Fold the held pairs of ``groups`` (default: all) into ``G`` and ``H``."""
        f, held = self.n_features, self._held
        if not held.count:
            return
        if self.rank and self.basis is None:  # from every group's pairs, group by group
            self._set_basis(np.concatenate([held.unfolded(g, mark=False)[:, f:]
                                            for g in range(self.groups)]))
        for g in (range(self.groups) if groups is None else groups):
            rows = held.unfolded(g)
            if len(rows):
                self._fold(g, rows)
        held.release()

    def merge(self, comm, refit=True):
        """Sum the normal equations of every rank's pairs (collective; every
        rank has added the same number of batches, so the same ``scale``), then
        refit (where ``refit``: a rank that only passes its pairs on need not)."""
        self.flush()
        if comm.size > 1:
            have = comm.allgather(self.basis is not None) if self.rank else ()
            if any(have):  # every rank's H and Y in rank 0's coordinates
                if not all(have):
                    raise ValueError("regression.rank: a rank without pairs cannot join "
                                     "the others' coordinates")
                basis = comm.bcast(self.basis)
                R = self.basis.T @ basis
                self._rotate(R)
                self._Y = self._Y @ R
                self.basis = basis
                comm.allreduce_sum(self._Y)
                self._Y_rows = int(sum(comm.allgather(self._Y_rows)))
            comm.allreduce_sum(self.GH)
            self.pairs = int(sum(comm.allgather(self.pairs)))
        if refit:
            self.refit()

    def refit(self, groups=None):
        """Solve ``(G_g + ρ_g I) Θ_g = H_g`` per group by Cholesky (LAPACK
        ``posv``), ``ρ_g = ridge · mean(diag G_g)``, for ``groups`` (default:
        all); a group without pairs gets ``Θ_g = 0``."""
        groups = range(self.groups) if groups is None else groups
        if not len(groups):
            return self.theta
        self.flush(groups)
        f = self.n_features
        if self._A is None:
            self._A = np.zeros((self.groups, f, f))
        A = self._A
        diagonal = A.reshape(self.groups, -1)[:, ::f + 1]
        if len(groups) == self.groups:
            np.copyto(A, self.G)
        else:
            for g in groups:
                A[g] = self.G[g]
        scale = diagonal.sum(axis=1) / f
        diagonal += self.ridge * scale[:, None]  # (the other groups' are not used)
        H = self.H
        for g in groups:
            if scale[g] <= 0:
                self.theta[g] = 0.0
                continue
            # A[g] is symmetric, so its transpose is the same matrix in
            # Fortran order: LAPACK works on it in place
            _, theta, info = scipy.linalg.lapack.dposv(A[g].T, H[g], overwrite_a=True)
            if info != 0:  # not positive definite (no ridge): least-squares solution
                theta = np.linalg.lstsq(self.G[g], H[g], rcond=None)[0]
            self.theta[g] = theta
        if self.rank and 0 in groups and self._follow_subspace():
            groups = range(self.groups)  # every group's weights are in the new coordinates
        for predictor in self._predictor.values():
            predictor.stale.update(groups)
        return self.theta

    def _predictor_for(self, dtype, n):
        """``Θ / n`` in ``dtype`` for batches of ``n`` (a :class:`_Predictor`),
        brought up to date for the groups refitted since it was last used:
        written in place, so a refit of one class rewrites that class's
        columns only, and no large array is allocated afresh."""
        key = (dtype, n)
        predictor = self._predictor.get(key)
        if predictor is None:
            offsets = self.n_classes if self.kind == "state+label" else self.groups
            predictor = self._predictor[key] = _Predictor(self.groups, self.in_width,
                                                          self.out_width, self.state_width,
                                                          offsets, dtype, n)
        if predictor.stale:
            sw, k, inv_n, theta = self.in_width, self.out_width, 1.0 / n, self.theta
            every = len(predictor.stale) == self.groups
            if self.rank and every:
                if self.basis is None:
                    predictor.basis_t[...] = 0.0  # no pairs yet: Θ = 0 too
                else:
                    np.copyto(predictor.basis_t, self.basis.T, casting="same_kind")
            W = predictor.weights.reshape(sw, self.groups, k)
            if every:
                np.multiply(theta[:, :sw].transpose(1, 0, 2), inv_n, out=W, casting="same_kind")
            else:
                for g in predictor.stale:
                    np.multiply(theta[g, :sw], inv_n, out=W[:, g], casting="same_kind")
            if self.kind == "state+label":  # one offset per class: its label's weight + constant
                np.multiply(theta[0, sw:-1] + theta[0, -1], inv_n, out=predictor.offsets,
                            casting="same_kind")
            elif every:
                np.multiply(theta[:, -1], inv_n, out=predictor.offsets, casting="same_kind")
            else:
                stale = sorted(predictor.stale)
                predictor.offsets[stale] = theta[stale, -1] * inv_n
            predictor.stale.clear()
        return predictor

    def predict(self, x, y=None, n=None):
        """Predicted batch co-state ``Λ̂ = φ(x) Θ / n`` (``φ(x) Θ B Bᵀ / n``
        with ``rank``), shape (rows, sw), in ``x``'s dtype (computed in it);
        ``n`` is the whole batch's size (default: the rows of ``x``; a
        replica of a layers × data grid predicts its share of a batch)."""
        predictor = self._predictor_for(x.dtype, x.shape[0] if n is None else n)
        if self.state_map is not None:
            x = self.state_map(x)
        lam = self._predict_coordinates(x, y, predictor)
        if predictor.basis_t is not None:
            lam = lam @ predictor.basis_t
        return lam

    def _predict_coordinates(self, x, y, predictor):
        """``φ(x) Θ / n`` (``φ(x) Θ B / n`` with ``rank``), shape (n, out_width)."""
        n, k = x.shape[0], self.out_width
        W, offsets, rows = predictor.weights, predictor.offsets, predictor.rows[:n]
        if self.groups == 1:
            lam = x @ W
            lam += offsets[np.asarray(y)] if self.kind == "state+label" else offsets[0]
        elif self._use_one_hot(n):
            y = np.asarray(y)
            lam = (x @ W).reshape(n, self.groups, k)[rows, y]  # every class's map, each row's own
            lam += offsets[y]
        else:
            y = np.asarray(y)
            order, segments = self._segments(y, n)
            xs = np.take(x, order, axis=0)  # (take: a fraction of fancy indexing's cost)
            sorted_lam = np.empty((n, k), dtype=x.dtype)
            for g, part in segments:
                np.matmul(xs[part], W[:, g * k:(g + 1) * k], out=sorted_lam[part])
            unsort = np.empty_like(order)
            unsort[order] = rows
            lam = np.take(offsets, y, axis=0)
            lam += np.take(sorted_lam, unsort, axis=0)
        return lam

    def state(self):
        """``{"G", "H", "scale", "theta", "pairs", "held_phi", "held_p",
        "held_group"}``, and with a rank, once pairs have set ``B``,
        ``"basis"``, ``"basis_Y"`` and ``"basis_Y_rows"`` (``Y`` and the
        pairs in it): enough to continue elsewhere bit for bit (seeding the fine
        run, checkpoints); the normal equations are ``scale · G`` and
        ``scale · H`` plus the pairs still held (features ``held_phi``,
        co-states ``held_p``, already weighted, and their group)."""
        f = self.n_features
        held = [self._held.unfolded(g, mark=False) for g in range(self.groups)]
        rows = np.concatenate(held)
        state = {"G": self.G.copy(), "H": self.H.copy(), "scale": np.float64(self.scale),
                 "theta": self.theta.copy(), "pairs": np.int64(self.pairs),
                 "held_phi": rows[:, :f], "held_p": rows[:, f:],
                 "held_group": np.repeat(np.arange(self.groups), [len(h) for h in held])}
        if self.basis is not None:
            state["basis"] = self.basis.copy()
            state["basis_Y"] = self._Y.copy()
            state["basis_Y_rows"] = np.int64(self._Y_rows)
        return state

    def load_state(self, state):
        """Continue from :meth:`state` (``theta`` is refitted if absent)."""
        if (state["G"].shape != self.G.shape or state["H"].shape != self.H.shape
                or (self.rank and state.get("basis") is not None
                    and state["basis"].shape != (self.state_width, self.rank))):
            raise ValueError(f"regression state with normal equations of shapes "
                             f"{state['G'].shape} and {state['H'].shape} does not fit this "
                             f"boundary's {self.G.shape} and {self.H.shape} (features, rank)")
        self.G[...] = state["G"]
        self.H[...] = state["H"]
        self.scale = float(state.get("scale", 1.0))
        self.pairs = int(state["pairs"])
        self._predictor = {}
        self._held.clear()
        if "held_phi" in state:
            group = np.asarray(state["held_group"])
            if state["held_phi"].shape[1:] != (self.n_features,) or np.any(group >= self.groups):
                raise ValueError("the held regression pairs do not fit this boundary")
            self._held.append(np.hstack([state["held_phi"], state["held_p"]]), group)
        if "theta" in state:
            self.theta = np.array(state["theta"], dtype=float)
        else:
            self.refit()
        self.basis = None
        if self.rank:
            self._Y[...] = 0.0
            self._Y_rows = 0
            if "basis" in state:
                self.basis = np.array(state["basis"], dtype=float)
                self._Y[...] = state["basis_Y"]
                self._Y_rows = int(state["basis_Y_rows"])


class _Predictor:
    """``Θ / n`` (``Θ B / n`` with a rank ``k``) of every group in a batch's
    dtype, for batches of ``n``; ``k = sw`` at full rank.

    Attributes
    ----------
    weights : ndarray, shape (q, groups · k)
        The groups' state weights side by side (``q``: the state part of
        ``φ``).
    offsets : ndarray, shape (n_offsets, k)
        Each group's offset (``n_offsets = groups``), or with ``state+label``
        each class's (``n_offsets = n_classes``: label weight plus constant).
    basis_t : ndarray, shape (k, sw), or None
        ``Bᵀ``, which maps the coordinates back (None at full rank).
    rows : ndarray, shape (n,)
        ``0 .. n−1``, to pick each row's own class from the one-hot product.
    stale : set of int
        Groups refitted since these were written.
    """

    def __init__(self, groups, q, k, sw, n_offsets, dtype, n):
        self.weights = np.empty((q, groups * k), dtype=dtype)
        self.offsets = np.empty((n_offsets, k), dtype=dtype)
        self.basis_t = np.empty((k, sw), dtype=dtype) if k < sw else None
        self.rows = np.arange(n)
        self.stale = set(range(groups))


class _Held:
    """Weighted pairs ``[φ, p]`` not yet folded into their groups' normal
    equations, in arrival order, with each pair's group; ``folded[g]``: the
    rows before it are done for group ``g``."""

    def __init__(self, groups, f, sw, rows=64):
        self.rows = np.empty((rows, f + sw))
        self.group = np.empty(rows, dtype=np.intp)
        self.count = 0
        self.folded = np.zeros(groups, dtype=np.intp)

    def append(self, rows, group):
        m = len(rows)
        if self.count + m > len(self.rows):
            size = max(2 * len(self.rows), self.count + m)
            grown = np.empty((size, self.rows.shape[1]))
            grown[:self.count] = self.rows[:self.count]
            self.rows = grown
            self.group = np.resize(self.group, size)
        self.rows[self.count:self.count + m] = rows
        self.group[self.count:self.count + m] = group
        self.count += m

    def unfolded(self, g, mark=True):
        """Group ``g``'s rows not folded yet (a copy with several groups, a
        view with one); ``mark``: now folded."""
        start = self.folded[g]
        rows = self.rows[start:self.count]
        if len(self.folded) > 1:
            rows = rows[self.group[start:self.count] == g]
        if mark:
            self.folded[g] = self.count
        return rows

    def _waiting(self):
        """Mask of the rows not yet folded into their own group, shape (count,)."""
        return self.folded[self.group[:self.count]] <= np.arange(self.count)

    def release(self):
        """Empty the buffer once no group has rows left to fold."""
        if not self._waiting().any():
            self.clear()

    def compact(self):
        """Drop the rows already folded, keeping the others in their order."""
        waiting = self._waiting()
        k = int(np.count_nonzero(waiting))
        self.rows[:k] = self.rows[:self.count][waiting]
        self.group[:k] = self.group[:self.count][waiting]
        self.count = k
        self.folded[:] = 0

    def clear(self):
        self.count = 0
        self.folded[:] = 0


class PooledStates:
    """The state part of ``φ`` for conv states: each channel's mean over
    ``P × P`` patches of positions (``regression.pool = P``; the last
    patches of a side not divisible by ``P`` are smaller).

    Parameters
    ----------
    channels : int
        Channels of the flattened state (Verlet: ``2c``, Y's then Z's).
    height, width : int
        Positions of each channel.
    pool : int
        ``P``.

    Attributes
    ----------
    width : int
        ``channels · ceil(height / P) · ceil(width / P)``.
    """

    def __init__(self, channels, height, width, pool):
        self.shape = (int(channels), int(height), int(width))
        # the means as one product: position (i, j) weighs 1 / (its patch's
        # size) in its patch's column (a third of a conv pit iteration's
        # regression time went to np.add.reduceat before)
        rows = np.arange(height) // pool
        cols = np.arange(width) // pool
        patch = (rows[:, None] * -(-width // pool) + cols[None, :]).ravel()
        counts = np.bincount(patch)
        self.matrix = np.zeros((height * width, counts.size))
        self.matrix[np.arange(height * width), patch] = 1.0 / counts[patch]
        self._cast = {}
        self.width = int(channels) * counts.size

    def __call__(self, x):
        """Pooled features (m, width) of states ``x`` (m, channels · height · width)."""
        m, c = x.shape[0], self.shape[0]
        M = self._cast.get(x.dtype)
        if M is None:
            M = self._cast[x.dtype] = self.matrix.astype(x.dtype)
        return np.matmul(x.reshape(m, c, -1), M).reshape(m, -1)


class WithOutputErrors:
    """The input part of ``φ`` with ``regression.output_errors``: the rows
    given are ``[x, e]``, a boundary state and the sample's output error
    ``e = softmax(S) − q`` from its last pass through the network (``c``
    numbers), and ``φ`` reads ``[m(x), e]``.  The co-state of a sample is
    about ``Jᵀ e`` (``J`` the Jacobian of its scores at the boundary), so
    ``e`` carries its size and direction, which a linear map of the state
    cannot see (how confident the layers downstream are about the sample).

    Parameters
    ----------
    state_width, n_classes : int
    inner : PooledStates, optional
        ``m``; None: the state itself.

    Attributes
    ----------
    width : int
        ``m``'s width plus ``n_classes``.
    """

    def __init__(self, state_width, n_classes, inner=None):
        self.state_width, self.inner = int(state_width), inner
        self.width = (self.state_width if inner is None else inner.width) + int(n_classes)

    @staticmethod
    def rows(x, e):
        """The rows ``[x, e]`` (m, state_width + c) that the regression reads
        for states ``x`` (m, state_width) with output errors ``e`` (m, c)."""
        return np.hstack([x, e])

    def __call__(self, rows):
        """``[m(x), e]`` (m, width) of rows ``[x, e]`` (m, state_width + c)."""
        if self.inner is None:
            return rows
        sw = self.state_width
        return np.hstack([self.inner(np.ascontiguousarray(rows[:, :sw])), rows[:, sw:]])


def state_map_for(net, rg):
    """The input part of ``φ`` that ``regression.pool`` and
    ``regression.output_errors`` ask for, for the states at a boundary of
    ``net`` (None: the state itself)."""
    inner = None
    if rg["pool"]:
        op = net.op
        channels = op.sample_shape[0] * net.state_width // op.size  # Verlet: Y's and Z's
        inner = PooledStates(channels, op.sample_shape[1], op.sample_shape[2], rg["pool"])
    if rg["output_errors"]:
        return WithOutputErrors(net.state_width, net.n_classes, inner)
    return inner


def prediction_errors(lam_hat, lam):
    """``(MSE of per-sample co-states, ‖Λ̂ − Λ‖ / ‖Λ̂‖)`` for one batch,
    computed in the co-states' dtype (a diagnostic: float32 sums of squares
    are accurate to ~1e-6 here)."""
    n = lam.shape[0]
    diff = np.subtract(lam_hat, lam).ravel()
    sq = float(np.dot(diff, diff))
    mse = sq * n * n / diff.size
    flat = lam_hat.ravel()
    norm_hat = float(np.dot(flat, flat)) ** 0.5
    return mse, (sq ** 0.5 / norm_hat if norm_hat > 0 else np.inf)
