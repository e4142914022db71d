"""``pit``: the parallel-in-time method (paper Algorithm 4, N ranks; DESIGN §6).

At iteration ``k`` rank ``r`` works on batch ``g = k − r``:

1. forward through its layers from the state received last iteration (rank
   0: from the batch's features);
2. the co-state at its right end is the loss gradient on the last rank and
   the regression's prediction ``Λ̂ = φ(x) Θ / n`` elsewhere;
3. backward, weight decay, update of its own controls;
4. one ``Sendrecv`` with each neighbour: the state forward and the co-state
   back (``x_out → r+1``, ``λ_out ← r+1``; ``λ_in → r−1``, ``x_in ← r−1``),
   tagged with the batch id (:meth:`PitTrainer.exchange`);
5. the co-state that arrived from ``r+1`` belongs to the state sent one
   iteration earlier: that pair joins the information set, and the
   regression is refitted (``regression.refit_every``).

With ``regression.delay = d > 0`` the same messages travel by
``Isend``/``Irecv`` and a co-state joins the information set ``d``
iterations later, so a rank may run ahead of its right neighbour (the
paper's "asynchronous version"; see :meth:`PitTrainer.exchange_async`).

Before its first state arrives (``k < r``) rank ``r`` either starts from the
coarse model's state at its boundary (``coarse.warmup = "coarse"``, only with
the coarse phase) or waits (``"wait"``).  With one rank there are no
boundaries and ``pit`` is exactly ``serial`` (the coarse phase is skipped).
"""
import time
from collections import deque

import numpy as np

from ..config import replicas_of
from ..errors import ConfigError
from .blocks import BlockTrainer
from .coarse import check_coarse_loss, coarse_phase, prolong, warm_states
from .comm import COSTATE_TAG, STATE_TAG, LoneComm, batch_tag
from .methods import register
from .monitor import CostateMonitor
from .partition import critical_path, ode_layer_cost, regression_cost
from .regression import CostateRegression, WithOutputErrors, prediction_errors, state_map_for


def two_level(cfg, size):
    """Whether a ``pit`` job of ``size`` ranks has the coarse phase (it has
    more than one layer block)."""
    return cfg["coarse"]["levels"] >= 2 and size // replicas_of(cfg, size) > 1


def boundary_step(cfg, size):
    """Block boundaries of a ``pit`` job of ``size`` ranks lie on multiples of
    this: ``coarse.factor ** (coarse.levels − 1)`` with the coarse phase, else 1."""
    co = cfg["coarse"]
    return co["factor"] ** (co["levels"] - 1) if two_level(cfg, size) else 1


def multilevel(cfg, size):
    """Whether the coarse model is itself trained with ``pit`` on every rank
    (``coarse.levels > 2``)."""
    return two_level(cfg, size) and cfg["coarse"]["levels"] > 2


def shared_coarse(cfg, size):
    """Whether every rank trains the coarse model (``coarse.parallel =
    "data-parallel"``, or with ``pit`` at more than two levels), not rank 0
    alone."""
    return multilevel(cfg, size) or (two_level(cfg, size)
                                     and cfg["coarse"]["parallel"] == "data-parallel")


def coarse_config(cfg, iterations, per_epoch):
    """The configuration of the coarse model's own ``pit`` run (``coarse.levels
    > 2``): ``L / c`` layers and one level less, ``iterations`` steps at the
    coarse phase's constant learning rate, no monitor."""
    co, tr = cfg["coarse"], cfg["train"]
    inner = {section: dict(values) for section, values in cfg.items()}
    inner["model"]["layers"] = cfg["model"]["layers"] // co["factor"]
    inner["coarse"]["levels"] = co["levels"] - 1
    inner["train"].update(lr=co["lr"] or tr["lr"], schedule="constant", lr_warmup=0.0,
                          epochs=-(-iterations // per_epoch))
    inner["monitor"].update(every=0, fallback=0.0)
    return inner


MEMORY = 0.9  # weight of the past in the running means of regression.clip and .damping


def running_mean(mean, value):
    """``mean`` moved towards ``value`` (``value`` itself when there is none yet)."""
    return value if mean is None else MEMORY * mean + (1.0 - MEMORY) * value


def relay_factor(cfg, net):
    """Extra cost of a middle block with ``regression.target = "relayed"``, a
    fraction of its layers' cost: a forward sweep and a co-state-only adjoint
    for every ``regression.relay_every``-th batch."""
    rg = cfg["regression"]
    if rg["target"] != "relayed":
        return 0.0
    n = cfg["train"]["batch_size"]
    return ode_layer_cost(net, n, grads=False) / ode_layer_cost(net, n) / rg["relay_every"]

# a kept batch of regression.target = "relayed", as saved in a checkpoint
LEDGER_FIELDS = ("ledger_x_in", "ledger_x_out", "ledger_y", "ledger_lam_hat")


class PitTrainer(BlockTrainer):
    method = "pit"

    def __init__(self, comm, cfg, data, log=None, bounds=None):
        self.two_level = two_level(cfg, comm.size)
        super().__init__(comm, cfg, data, log, bounds)
        self.warmup = cfg["coarse"]["warmup"] if self.two_level else "wait"
        sw, bs, dt = self.net.state_width, self.n_rows, self.net.dtype  # this replica's rows
        self.x_in = np.zeros((bs, sw), dtype=dt)
        self.lam_right = np.zeros((bs, sw), dtype=dt)
        self.zeros = np.zeros((bs, sw), dtype=dt)
        self.sent = None  # (regression input of x_out, y, Λ̂) of the previous iteration
        rg = cfg["regression"]
        if rg["rank"] > sw:
            raise ConfigError(f"regression.rank = {rg['rank']} is not allowed: at most the "
                              f"boundary state's width, {sw} here (0: full width)")
        self.reg = None
        if self.next is not None:
            try:
                self.reg = CostateRegression.from_config(sw, self.net.n_classes, rg,
                                                         state_map_for(self.net, rg))
            except ValueError as e:  # too large to hold
                raise ConfigError(str(e)) from None
        n_iter = self.epochs * self.batches.per_epoch
        self.mse = np.full(n_iter, np.nan)
        self.rel = np.full(n_iter, np.nan)
        self.warm_state = None
        self.arrived = 0  # co-states received so far
        self.pipeline_start = 0  # iteration at which rank 0 fed the pipeline's first batch
        self.refit_every = rg["refit_every"]
        self.clip = rg["clip"]
        # regression.damping = "error": running mean error of this boundary's predictions
        self.damping = rg["damping"] == "error" and self.next is not None
        self.pred_error = 1.0  # no trust before the first co-state arrives
        self.lam_norm = None  # running mean norm of arrived co-states (regression.clip)
        # regression.delay > 0: non-blocking exchange (see exchange_async)
        self.delay = rg["delay"]
        self.state_bufs = [self.x_in, np.zeros_like(self.x_in)]
        self.state_request = None  # the Irecv of the next iteration's state
        self.pending = deque()  # [request, co-state, (x_out, y, Λ̂) or None, k] per batch sent right
        self.sends = deque()  # (request, buffer) of sends not yet completed
        # regression.target = "relayed": exact co-states relayed back along kept states
        self.relay = rg["target"] == "relayed" and self.layout.blocks > 1
        self.relay_every = rg["relay_every"]
        if self.relay:
            if self.delay:
                raise ConfigError(f"regression.target = 'relayed' is not allowed with "
                                  f"regression.delay = {self.delay}: the relay follows the "
                                  "blocking schedule (set regression.delay = 0)")
            # co-state messages carry [the block's own co-state, the relayed exact one]
            self.lam_right = np.zeros((2, bs, sw), dtype=dt)
            self.lam_pack = np.zeros((2, bs, sw), dtype=dt)
            # batch id -> (input state or None, regression input of x_out, y, Λ̂) of batches kept
            self.ledger = {}
            a, b = self.layer_range()
            middle = self.prev is not None and self.next is not None
            self.relay_block = self.net.block(a, b, reuse=True) if middle else None
        if cfg["monitor"]["every"] and self.layout.blocks > 1:
            self.monitor = CostateMonitor(self, cfg["monitor"]["every"], n_iter)
        # monitor.fallback: exact co-states while the monitor finds predictions off
        self.fallback = cfg["monitor"]["fallback"] if self.layout.blocks > 1 else 0.0
        if self.fallback and not cfg["monitor"]["every"]:
            raise ConfigError(f"monitor.fallback = {self.fallback} is not allowed with "
                              "monitor.every = 0: the monitor's measurements trigger it "
                              "(set monitor.every > 0)")
        if self.fallback and self.delay:
            raise ConfigError(f"monitor.fallback is not allowed with regression.delay = "
                              f"{self.delay}: the exact sweeps follow the blocking schedule "
                              "(set regression.delay = 0)")
        self.exact_mode, self.exact_since = False, 0
        self.exact = np.zeros(n_iter, dtype=bool)  # iterations trained on exact co-states
        # regression.output_errors: each sample's output error from its last pass
        self.errors = self.errors_seen = None
        if rg["output_errors"] and self.layout.blocks > 1:
            n_train, c = len(self.y_train), self.net.n_classes
            if self.next is not None:  # what the regression reads, (n_train, c)
                self.errors = np.zeros((n_train, c), dtype=dt)
            # the last block's of this epoch and a mark per sample recorded, summed over
            # the ranks (each sample is recorded by one replica of the last block)
            self.errors_seen = np.zeros((n_train, c + 1))
            # the last block's backward fills this with its batch's output errors
            self.batch_errors = np.empty((bs, c), dtype=dt) if self.next is None else None

    @classmethod
    def reads_features(cls, cfg, rank, size):
        # block 0's replicas; with the coarse phase shared every rank takes rows of each batch
        return rank < replicas_of(cfg, size) or shared_coarse(cfg, size)

    def middle_cost(self, cfg):
        return relay_factor(cfg, self.net)

    def regression_cost(self, cfg):
        return regression_cost(self.net, cfg, cfg["train"]["batch_size"])

    def grid_for(self, cfg):
        return boundary_step(cfg, self.comm.size)

    def grid_name(self, cfg):
        co = cfg["coarse"]
        if not self.two_level or co["levels"] == 2:
            return None
        return (f"coarse.factor ** (coarse.levels - 1) = {co['factor']} ** {co['levels'] - 1} "
                f"= {self.grid_for(cfg)}")

    def setup(self):
        comm, lay = self.comm, self.layout
        self.log_partition()
        if not self.two_level:
            if lay.blocks == 1:
                self.log.info("pit with one layer block: no block boundaries, so no coarse "
                              "phase; this is the serial algorithm%s",
                              f" on {lay.replicas} replicas that split each batch"
                              if lay.replicas > 1 else "")
            self.start(self.net.init_params(self.cfg["train"]["seed"]))
            return
        payload = None
        t = time.perf_counter()
        shared = shared_coarse(self.cfg, comm.size)
        deeper = multilevel(self.cfg, comm.size)
        self.log.info("global prediction: coarse model of %d layers, %s",
                      self.net.layers // self.cfg["coarse"]["factor"],
                      f"pit on {comm.size} ranks" if deeper else
                      f"data-parallel on {comm.size} ranks" if shared else "on rank 0")
        if deeper:
            fine, reg_states, warm, info = self.coarse_pit()
        elif shared or comm.rank == 0:
            fine, reg_states, warm, info = coarse_phase(
                comm if shared else LoneComm(), self.net, self.cfg, self.batches, self.x_train,
                self.y_train, self.bounds, self.log)
        if comm.rank == 0:
            cnet = self.net.with_layers(self.net.layers // self.cfg["coarse"]["factor"])
            self.log.info("global prediction done: coarse model of %d layers in %.2f s (%d "
                          "iterations, loss %.4f)", cnet.layers, time.perf_counter() - t,
                          info["iterations"], info["final_loss"])
            errors = None  # regression.output_errors: every sample's under the coarse model
            if self.errors_seen is not None:
                errors = cnet.output_errors(info["coarse_params"], self.x_train, self.y_train)
            payload = []
            for q in range(comm.size):  # every rank: its block's share, its replica's rows
                r, i = divmod(q, lay.replicas)
                blk = self.net.block(self.bounds[r], self.bounds[r + 1])
                warm_rows = warm[r]
                if warm_rows is not None and lay.replicas > 1:
                    warm_rows = warm_rows[lay.rows(self.batches.batch_size, i)]
                inner = r < lay.blocks - 1  # a block with a boundary on its right
                payload.append((blk.local_params(fine), reg_states[r] if inner else None,
                                warm_rows, errors if inner else None))
        waited = comm.wait_seconds
        params, reg_state, self.warm_state, errors = comm.scatter(payload)
        if self.errors is not None:
            np.copyto(self.errors, errors)
        if shared or comm.rank == 0:  # the others' time here is waiting for rank 0
            self.seconds["coarse"] = time.perf_counter() - t - waited
        self.use_local_params(params)
        if reg_state is not None:
            self.reg.load_state(reg_state)

    def coarse_pit(self):
        """``coarse.levels > 2``: train the coarse model with ``pit`` on every
        rank, its blocks the fine ones coarsened (with its own coarse phase,
        one level less), for ``coarse.iterations`` iterations at the coarse
        phase's learning rate.  Collective; returns what
        :func:`~pitmpi.parallel.coarse.coarse_phase` returns, complete on
        rank 0: the prolonged controls, each boundary's regression (fitted
        on the coarse model's states and co-states there) and the warm-up
        states."""
        comm, co = self.comm, self.cfg["coarse"]
        B = self.batches.per_epoch
        iterations = co["iterations"] or B
        inner = PitTrainer(comm, coarse_config(self.cfg, iterations, B), self.data, self.log,
                           bounds=self.bounds // co["factor"])
        inner.setup()
        total = np.zeros(1)
        for k in range(iterations):
            part, _, _ = inner.step(k, k // B)
            # each rank its own part, as the fine pipeline does: no collective per iteration
            check_coarse_loss(part, k, iterations, inner.lr(k, k // B), co,
                              self.cfg["train"]["max_loss"])
            logged = (k + 1) % max(iterations // 4, 1) == 0
            if logged or k + 1 == iterations:
                total[0] = part
                comm.allreduce_sum(total)
            if logged:
                self.log.info("  coarse iteration %d/%d: batch loss %.4f", k + 1, iterations,
                              total[0])
        inner.drain()
        full = inner.gather_params()
        regs = comm.gather(inner.reg.state() if inner.reg is not None else None)
        if comm.rank != 0:
            return None, None, None, None
        regs = self.layout.of_blocks(regs)  # a block's replicas hold the same fit
        blocks = [inner.net.block(a, b) for a, b in zip(inner.bounds[:-1], inner.bounds[1:])]
        warm = warm_states(blocks, [blk.local_params(full) for blk in blocks], self.x_train,
                           self.batches)
        fine = prolong(full, co["factor"], co["prolongation"])
        return fine, regs[:-1], warm, {"iterations": iterations, "final_loss": float(total[0]),
                                       "coarse_params": full}

    def active(self, rank, k):
        """Whether ``rank`` computes at iteration ``k`` (False only while waiting)."""
        return k - self.pipeline_start >= rank or self.warmup == "coarse"

    def step(self, k, epoch):
        if self.exact_mode:
            return self.exact_step(k, epoch)
        blk, r = self.block, self.layout.block
        g = k - r
        needs_labels = blk.last or (self.reg is not None and self.reg.use_labels)
        y = self.labels(g) if needs_labels else None
        loss, correct, count = 0.0, 0, 0
        x_out = x_reg = lam_in = lam_hat = None
        if self.active(r, k):
            if blk.first:
                inp = self.features(g)
            elif k > self.pipeline_start and self.active(r - 1, k - 1):
                inp = self.incoming_state()
            else:
                inp = self.warm_state
            ctx = blk.forward(self.params, inp)
            x_out = ctx.output
            self.check_finite("state at its right boundary", x_out, k, epoch)
            kept_input = None if blk.first or not self.relay else np.array(inp)
            if blk.last:
                errors = None if self.errors_seen is None else self.batch_errors
                lam_in, grads, (loss, correct) = blk.backward(self.params, ctx, y=y,
                                                              n_norm=self.batches.batch_size,
                                                              errors=errors)
                if errors is not None:
                    self.record_errors(g, errors)
                count = len(y)
            else:
                t = time.perf_counter()
                x_reg = self.regression_input(x_out, g)
                lam_hat = self.bounded(self.reg.predict(x_reg, y, n=self.batches.batch_size))
                self.seconds["regression"] += time.perf_counter() - t
                lam_in, grads, _ = blk.backward(self.params, ctx, lam_out=lam_hat)
            if lam_in is not None:
                self.check_finite("co-state at its left boundary", lam_in, k, epoch)
            loss = self.finish_step(grads, k, epoch, loss)
        x_send = x_out if x_out is not None else self.zeros
        lam_send = lam_in if lam_in is not None else self.zeros
        if self.relay:
            if x_out is not None and self.next is not None:
                self.ledger[g] = (kept_input, x_reg, y, lam_hat)
            if self.prev is not None:
                lam_send = self.pack_relayed(k, lam_send)
        if self.delay:
            self.exchange_async(k, g, x_send, lam_send)
        else:
            self.exchange(g, x_send, lam_send)
            if self.relay:
                self.learn_relayed(k)
            elif self.next is not None and self.sent is not None and self.active(r + 1, k):
                self.learn(k, *self.sent, self.lam_right)
        if self.next is not None:
            self.sent = (x_reg, y, lam_hat) if x_out is not None else None
        return loss, correct, count

    # regression.output_errors ----------------------------------------------
    def regression_input(self, x, g):
        """What the regression reads for the states ``x`` (rows, sw) of batch
        ``g`` at this block's right end: ``x``, or with
        ``regression.output_errors`` ``[x, e]`` (rows, sw + c), ``e`` each
        sample's output error from its last pass (see
        :class:`~pitmpi.parallel.regression.WithOutputErrors`)."""
        if self.errors is None:
            return x
        return WithOutputErrors.rows(x, self.errors[self.batch_rows(g)])

    def record_errors(self, g, e):
        """The last block: batch ``g``'s output errors ``e`` (rows, c), kept
        until the epoch's end."""
        rows = self.batch_rows(g)
        self.errors_seen[rows, :-1] = e
        self.errors_seen[rows, -1] = 1.0

    def share_errors(self):
        """Collective, at an epoch's end: every block but the last takes the
        output errors the last block recorded this epoch."""
        if self.errors_seen is None:
            return
        self.comm.allreduce_sum(self.errors_seen)
        if self.errors is not None:
            seen = self.errors_seen[:, -1] > 0
            self.errors[seen] = self.errors_seen[seen, :-1]
        self.errors_seen[...] = 0.0

    def exchange(self, g, x_send, lam_send):
        """The iteration's messages, one ``Sendrecv`` per neighbour: ``x_out``
        to r+1 for the co-state from r+1, ``λ_in`` to r−1 for the state
        from r−1.  Even ranks pair with r+1 first, odd ranks with r−1, so
        every pair of neighbours exchanges at once: one round on two ranks,
        two on more."""
        right = (x_send, self.next, self.lam_right, self.next,
                 batch_tag(STATE_TAG, g), batch_tag(COSTATE_TAG, g - 1))
        left = (lam_send, self.prev, self.x_in, self.prev,
                batch_tag(COSTATE_TAG, g), batch_tag(STATE_TAG, g + 1))
        for call in ((right, left) if self.layout.block % 2 == 0 else (left, right)):
            if call[1] is not None:
                self.chain.sendrecv(*call)

    def finish_step(self, grads, k, epoch, loss):
        """As for every block, with ``regression.damping = "error"`` the
        learning rate scaled by ``1 − e``, ``e`` the running mean error of
        this block's predicted co-states (in [0, 1])."""
        lr = self.lr(k, epoch)
        if self.damping:
            lr *= 1.0 - self.pred_error
        return super().finish_step(grads, k, epoch, loss, lr)

    def whole_batch(self, *parts):
        """Each of ``parts`` (this replica's rows, or None) joined over the
        block's replicas in row order: every replica then adds the same
        pairs to its regression and holds the same fit."""
        gathered = self.layout.group.allgather(parts)
        return tuple(None if part is None else np.concatenate([g[j] for g in gathered])
                     for j, part in enumerate(parts))

    def bounded(self, lam_hat):
        """``Λ̂`` scaled down to ``regression.clip`` times the running mean
        norm of the arrived co-states, if above it (in place)."""
        if self.clip and self.lam_norm is not None:
            cap = self.clip * self.lam_norm
            norm = float(np.linalg.norm(lam_hat))
            if norm > cap:
                lam_hat *= cap / norm
        return lam_hat

    def learn(self, k, x, y, lam_hat, lam):
        """The co-state ``lam`` computed at iteration ``k`` for the state ``x``
        sent one iteration earlier: record the prediction error, add the
        pair, refit what is due."""
        t = time.perf_counter()
        if self.layout.replicas > 1:  # the whole batch's pairs, in row order, on every replica
            x, y, lam_hat, lam = self.whole_batch(x, y, lam_hat, lam)
        self.mse[k], self.rel[k] = prediction_errors(lam_hat, lam)
        self.arrived += 1
        if self.damping:
            self.pred_error = running_mean(self.pred_error, min(float(self.rel[k]), 1.0))
        if self.clip:
            self.lam_norm = running_mean(self.lam_norm, float(np.linalg.norm(lam)))
        self.reg.add(x, y, lam, refit=self.reg.due(self.arrived, self.refit_every),
                     n=self.batches.batch_size)
        self.seconds["regression"] += time.perf_counter() - t

    # regression.target = "relayed" -------------------------------------------
    def relayed_batch(self, k, rank):
        """The batch whose exact co-state rank ``rank`` sends left at iteration
        ``k``: the last rank's own batch ``k − N + 1``, and one iteration
        older for each rank further left (``k − 2N + 2 + rank``)."""
        N = self.layout.blocks
        return k - N + 1 if rank == N - 1 else k - 2 * N + 2 + rank

    def relays(self, h):
        """Whether batch ``h``'s exact co-state is relayed: every
        ``regression.relay_every``-th batch that went through the whole chain."""
        return h >= self.pipeline_start and h % self.relay_every == 0

    def pack_relayed(self, k, lam_in):
        """This iteration's co-state message to the left: ``[λ_in, λ_relay]``,
        shape (2, n, sw).  The last block's ``λ_in`` is exact and is its own
        relay; a middle block carries the exact co-state that arrived last
        iteration at its right end back through its layers, along the input
        state it kept for that batch, with its current controls."""
        self.lam_pack[0] = lam_in
        if self.next is None:
            self.lam_pack[1] = lam_in
            return self.lam_pack
        h = self.relayed_batch(k, self.layout.block)
        entry = self.ledger.get(h)
        if entry is None or not self.relays(h):
            self.lam_pack[1] = 0.0
            return self.lam_pack
        ctx = self.relay_block.forward(self.params, entry[0])
        self.lam_pack[1], _, _ = self.relay_block.backward(self.params, ctx,
                                                           lam_out=self.lam_right[1], grads=False)
        return self.lam_pack

    def learn_relayed(self, k):
        """Learn the pair of the batch whose exact co-state arrived from the
        right this iteration; forget the batches no longer needed."""
        if self.next is None:
            return
        h = self.relayed_batch(k, self.layout.block + 1)
        entry = self.ledger.get(h)
        if entry is not None and self.relays(h):
            self.learn(k, entry[1], entry[2], entry[3], self.lam_right[1])
        for old in [b for b in self.ledger if b < h]:  # h itself is relayed next iteration
            del self.ledger[old]

    # non-blocking exchange (regression.delay = d > 0) ------------------------
    def incoming_state(self):
        """The state from rank r−1 for this iteration."""
        if self.state_request is not None:
            self.chain.wait(self.state_request)
            self.state_request = None
        return self.x_in

    def exchange_async(self, k, g, x_send, lam_send):
        """Post this iteration's messages without waiting for them, then learn
        the co-state computed ``d`` iterations ago.

        The messages are those of the blocking schedule: what is posted at
        iteration ``k`` is matched by what the neighbours post at ``k``.  The
        only difference is when a rank waits: for its input state at the
        start of the next iteration, and for a co-state from rank r+1 ``d``
        iterations after the blocking schedule would have used it.  So rank r
        may run up to ``d`` iterations ahead of rank r+1, which absorbs their
        iteration-to-iteration jitter; with the same ``d`` the results do not
        depend on timing."""
        comm, r = self.chain, self.layout.block
        if self.next is not None:
            self.sends.append((comm.isend(x_send, self.next, batch_tag(STATE_TAG, g)), x_send))
        if self.prev is not None:
            self.sends.append((comm.isend(lam_send, self.prev, batch_tag(COSTATE_TAG, g)),
                               lam_send))
            self.x_in = self.state_bufs[k % 2]  # the other one may still be read this iteration
            self.state_request = comm.irecv(self.x_in, self.prev, batch_tag(STATE_TAG, g + 1))
        if self.next is not None:
            lam = np.empty_like(self.zeros)
            pair = self.sent if self.active(r + 1, k) else None
            self.pending.append([comm.irecv(lam, self.next, batch_tag(COSTATE_TAG, g - 1)),
                                 lam, pair, k])
            while len(self.pending) > self.delay:
                request, lam, pair, k_done = self.pending.popleft()
                if request is not None:
                    comm.wait(request)
                if pair is not None:
                    self.learn(k_done, *pair, lam)
        while len(self.sends) > 2 * (self.delay + 2):
            comm.wait(self.sends.popleft()[0])

    def drain(self):
        """Complete every message in flight (their data stay pending): before
        the epoch's evaluation, whose messages must not meet them, and so a
        checkpoint holds the whole state."""
        comm = self.chain
        if self.state_request is not None:
            comm.wait(self.state_request)
            self.state_request = None
        for entry in self.pending:
            if entry[0] is not None:
                comm.wait(entry[0])
                entry[0] = None
        while self.sends:
            comm.wait(self.sends.popleft()[0])

    def run_monitor(self, k):
        if self.exact_mode:  # this iteration's sweep was exact: nothing to measure
            return 0.0
        self.drain()  # the sweep's messages must not meet the pipeline's
        spent = super().run_monitor(k)
        if self.fallback:
            worst = self.worst_error(self.monitor.last_error)
            if worst > self.fallback:
                self.exact_mode, self.exact_since = True, k + 1
                self.log.debug("monitor.fallback: error %.3g > %g after iteration %d: exact "
                               "co-states", worst, self.fallback, k)
        return spent

    # monitor.fallback ------------------------------------------------------
    def worst_error(self, rel):
        """Collective over the chain: the largest of the boundaries' errors
        ``rel`` (this rank's; NaN on the last)."""
        errors = np.zeros(self.layout.blocks)
        if self.next is not None:
            errors[self.layout.block] = rel
        self.chain.allreduce_sum(errors)
        return float(errors.max())

    def exact_step(self, k, epoch):
        """Iteration ``k`` on exact co-states (``monitor.fallback``): batch
        ``k`` swept through every block with the current controls, each
        boundary learning the exact pair and measuring its prediction; every
        block updates with its exact gradient.  When every boundary's error
        is at most the bound, the pipeline refills from iteration k + 1."""
        self.exact[k] = True
        y = self.labels(k)

        def at_boundary(ctx, lam):  # the pair learnt; its error goes to self.rel[k]
            x = self.regression_input(ctx.output, k)
            self.learn(k, x, y, self.bounded(self.reg.predict(x, y, n=self.batches.batch_size)),
                       lam)

        check = lambda x_out: self.check_finite("state at its right boundary", x_out, k, epoch)
        _, grads, (loss, correct) = self.exact_sweep(self.block, k, y, check=check,
                                                     at_boundary=at_boundary)
        loss = BlockTrainer.finish_step(self, grads, k, epoch, loss)  # exact: not damped
        worst = self.worst_error(self.rel[k])
        if worst <= self.fallback:
            self.exact_mode = False
            self.log.debug("monitor.fallback: error %.3g after %d exact iterations: the "
                           "pipeline refills", worst, k + 1 - self.exact_since)
            self.restart_pipeline(k + 1)
        return loss, correct, (len(y) if self.block.last else 0)

    def progress_extra(self, epoch):
        if not self.fallback:
            return ""
        B = self.batches.per_epoch
        return f"  exact {100 * self.exact[epoch * B:(epoch + 1) * B].mean():.0f}%"

    def restart_pipeline(self, k):
        """Refill the pipeline from iteration ``k``: rank r waits r
        iterations; nothing of the batches in flight before is learnt."""
        self.pipeline_start, self.warmup = k, "wait"
        self.sent = None
        if self.relay:
            self.ledger.clear()
            self.lam_right[1] = 0.0

    def record_epoch(self, *args):
        self.drain()
        self.share_errors()
        super().record_epoch(*args)

    def result_extra(self):
        """Besides the partition, the cost model's critical path (seconds;
        an estimate that predicts the speed-up without the machine)."""
        extra, attrs = super().result_extra()
        co = self.cfg["coarse"]
        iterations = (co["iterations"] or self.batches.per_epoch) if self.two_level else 0
        est = critical_path(self.net, self.cfg, self.bounds, iterations, self.boundary_cost,
                            self.middle_factor, self.layout.replicas)
        attrs.update({f"estimate_{k}_seconds": v for k, v in est.items()})
        if self.fallback:
            attrs["fallback"] = self.fallback
        return extra, attrs

    def gather_extra_history(self, k_done):
        parts = self.comm.gather((self.mse[:k_done], self.rel[:k_done]))
        monitored = self.monitor.history(k_done) if self.monitor is not None else {}
        if self.comm.rank != 0:
            return {}
        boundaries = self.layout.of_blocks(parts)[:-1]  # the last block predicts nothing
        if self.fallback:  # every rank took the same decisions
            monitored["fallback_exact"] = self.exact[:k_done].astype(np.int8)
        return {**{name: np.array([p[i] for p in boundaries]).reshape(-1, k_done).T
                   for i, name in enumerate(("regression_mse", "regression_rel"))}, **monitored}

    # checkpoints ----------------------------------------------------------
    def method_state(self):
        state = {"arrived": np.int64(self.arrived), "pipeline_start": np.int64(self.pipeline_start)}
        if self.prev is not None:
            state["x_in"] = self.x_in.copy()
        if self.sent is not None:
            state["sent_x"], sent_y, state["sent_lam_hat"] = self.sent
            if sent_y is not None:
                state["sent_y"] = sent_y
        if self.warm_state is not None:
            state["warm_state"] = self.warm_state
        if self.lam_norm is not None:
            state["lam_norm"] = np.float64(self.lam_norm)
        if self.damping:
            state["pred_error"] = np.float64(self.pred_error)
        if self.exact_mode:
            state["exact_since"] = np.int64(self.exact_since)
        if self.errors is not None and self.comm.rank == 0:  # the same on every holder
            state["output_errors"] = self.errors.copy()
        if self.relay:
            state["relay_in"] = self.lam_right[1].copy()
            ids = sorted(self.ledger)
            if ids:
                state["ledger_ids"] = np.array(ids, dtype=np.int64)
                for i, name in enumerate(LEDGER_FIELDS):
                    if self.ledger[ids[0]][i] is not None:
                        state[name] = np.stack([self.ledger[b][i] for b in ids])
        if self.pending:  # drained: co-states received, not learnt yet
            state["pending_k"] = np.array([e[3] for e in self.pending], dtype=np.int64)
            state["pending_lam"] = np.stack([e[1] for e in self.pending])
            pairs = [e[2] for e in self.pending]
            state["pending_valid"] = np.array([p is not None for p in pairs])
            some = next((p for p in pairs if p is not None), None)
            if some is not None:
                for i, name in enumerate(("pending_x", "pending_y", "pending_lam_hat")):
                    if some[i] is not None:
                        state[name] = np.stack([p[i] if p is not None else np.zeros_like(some[i])
                                                for p in pairs])
        return state

    def regression_states(self):
        if self.reg is None:
            return {}
        return {int(self.bounds[self.layout.block + 1]): self.reg.state()}

    def resume(self, ckpt):
        """Exact continuation with the same number of ranks; otherwise the
        regression of each boundary that existed before is kept, a new
        boundary's starts from zero, and the pipeline refills (rank r waits
        r iterations, as with ``coarse.warmup = "wait"``)."""
        super().resume(ckpt)
        q, r = self.comm.rank, self.layout.block
        k0 = ckpt.epochs_done * self.batches.per_epoch
        kept = ckpt.rank_state(0).get("output_errors")  # rank 0 saves them for every holder
        if self.errors is not None and kept is not None:
            np.copyto(self.errors, kept)
        if self.reg is not None:
            where = int(self.bounds[r + 1])
            state = ckpt.regression.get(where)
            try:
                if state is None:
                    raise ValueError("there was no block boundary here before")
                self.reg.load_state(state)
            except ValueError as e:
                self.log.warning("boundary at layer %d: regression starts from zero (%s)", where, e)
        if self.exact_resume:
            st = ckpt.rank_state(q)
            self.arrived = int(st["arrived"])
            self.pipeline_start = int(st["pipeline_start"])
            if self.prev is not None:
                np.copyto(self.x_in, st["x_in"])
            if "sent_x" in st:
                self.sent = (st["sent_x"], st.get("sent_y"), st["sent_lam_hat"])
            self.warm_state = st.get("warm_state")
            self.lam_norm = float(st["lam_norm"]) if "lam_norm" in st else None
            if self.damping and "pred_error" in st:
                self.pred_error = float(st["pred_error"])
            if self.pipeline_start > 0:  # refilled after a fallback: no coarse warm start
                self.warmup = "wait"
            if self.fallback:
                self.exact_mode = "exact_since" in st
                self.exact_since = int(st.get("exact_since", 0))
                if "fallback_exact" in ckpt.history:
                    self.exact[:k0] = ckpt.history["fallback_exact"][:k0]
            if self.relay and "relay_in" in st:
                self.lam_right[1] = st["relay_in"]
                for j, b in enumerate(st.get("ledger_ids", ())):
                    self.ledger[int(b)] = tuple(np.array(st[name][j]) if name in st else None
                                                for name in LEDGER_FIELDS)
            for i, k_done in enumerate(st.get("pending_k", ())):
                pair = None
                if st["pending_valid"][i]:
                    pair = (st["pending_x"][i], st["pending_y"][i] if "pending_y" in st else None,
                            st["pending_lam_hat"][i])
                self.pending.append([None, np.array(st["pending_lam"][i]), pair, int(k_done)])
            if self.reg is not None:
                for name, arr in (("regression_mse", self.mse), ("regression_rel", self.rel)):
                    arr[:k0] = ckpt.history[name][:k0, r]
        else:
            self.pipeline_start, self.warmup = k0, "wait"
            self.log.info("pit resumed from %s (%s on %d ranks) on %d ranks: parameters and "
                          "optimizer carried over; the pipeline refills, rank r waiting r "
                          "iterations", ckpt.path, ckpt.method, ckpt.ranks, self.comm.size)
        if self.monitor is not None and not (
                self.exact_resume and self.monitor.restore(ckpt.history, k0)):
            self.log.info("monitor: records start at epoch %d (the checkpoint's were taken on "
                          "another schedule or grid)", ckpt.epochs_done + 1)


register("pit", PitTrainer)
