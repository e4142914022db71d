"""Communicators: a thin wrapper over mpi4py and a serial stand-in.

Training code talks to a :class:`Comm` (passed explicitly, never a module
global).  :class:`MPIComm` wraps an mpi4py communicator; :func:`run_emulated`
runs ``N`` ranks as threads of one process over :class:`ThreadComm`, with the
same message semantics, so that "N emulated blocks == N MPI ranks" is
testable without ``mpirun``.  Both count the seconds spent inside
communication calls (``wait_seconds``) and what the array calls sent
(``traffic``), the same on both since the calls are.
"""
import copy
import queue
import sys
import threading
import time

import numpy as np

STATE_TAG = 0          # states travel forward
COSTATE_TAG = 1 << 14  # co-states travel backward
TAG_SPAN = 1 << 14     # batch ids are folded into [0, TAG_SPAN)
TRAFFIC = ("sent_bytes", "messages", "allreduce_bytes", "allreduce_steps")
ABORT_GRACE = 0.5  # seconds a failing rank's output gets before MPI_Abort
ORDERED_ALLGATHER_BYTES = 1 << 20  # an MPI all-reduce of at most this times the ranks
                                   # gathers whole buffers; a larger one sums by slices


def batch_tag(base, batch_id):
    """Message tag for a batch: ``base + batch_id mod TAG_SPAN``."""
    return base + (batch_id % TAG_SPAN)


def allreduce_slices(n, size):
    """Edges of the ``size`` slices of an ``n``-element buffer that an
    all-reduce sums, one slice per rank (as a ring all-reduce does).

    Returns
    -------
    ndarray of int, shape (size + 1,)
        Rank ``r`` sums elements ``[edges[r], edges[r + 1])``.
    """
    return np.linspace(0, n, size + 1).round().astype(int)


def sum_in_rank_order(parts, out=None):
    """``parts[0] + parts[1] + ...`` from the left: the order of every
    all-reduce, so that it gives the same bits on every communicator,
    emulated or MPI, whatever the MPI library.

    Parameters
    ----------
    parts : sequence of ndarray, each of shape (m,), by rank
    out : ndarray, shape (m,), optional
        Where the sum goes (not one of ``parts``); default a new array.
    """
    if out is None:
        out = np.array(parts[0], copy=True)
    else:
        out[...] = parts[0]
    for p in parts[1:]:
        out += p
    return out


class Comm:
    """Interface of the communicators used by the trainers."""

    rank = 0
    size = 1
    emulated = False  # True: ranks are threads of one process (timings mean nothing)
    # "ordered": allreduce_sum sums every element in rank order (the emulated
    # communicator's only way); "mpi": an MPI communicator calls MPI_Allreduce,
    # whose order its library picks (train.allreduce)
    allreduce_order = "ordered"

    def __init__(self, ledger=None):
        # one ledger per process, shared with the communicators split from this one:
        # the wait seconds, then TRAFFIC
        self._ledger = ledger if ledger is not None else np.zeros(1 + len(TRAFFIC))

    @property
    def wait_seconds(self):
        """Seconds this process has spent inside communication calls, on this
        communicator and every one split from it (settable)."""
        return float(self._ledger[0])

    @wait_seconds.setter
    def wait_seconds(self, value):
        self._ledger[0] = value

    @property
    def traffic(self):
        """What this process sent by array calls, on this communicator and
        every one split from it (settable): float64 (4,), in the order of
        :data:`TRAFFIC` — bytes sent point to point and their messages, and
        for ``allreduce_sum`` of ``m`` bytes over ``P > 1`` ranks what a ring
        all-reduce sends, ``2 (P − 1)`` steps of a ``⌈m / P⌉``-byte chunk (whole
        numbers, so that sums are exact in any order)."""
        return self._ledger[1:].copy()

    @traffic.setter
    def traffic(self, value):
        self._ledger[1:] = value

    @property
    def ledger(self):
        """Wait seconds and traffic together (settable): to keep a stretch of
        calls that is not training out of both."""
        return self._ledger.copy()

    @ledger.setter
    def ledger(self, value):
        self._ledger[:] = value

    def _count_send(self, buf):
        self._ledger[1] += buf.nbytes
        self._ledger[2] += 1

    def _count_allreduce(self, buf):
        if self.size > 1:
            self._ledger[3] += 2 * (self.size - 1) * -(-buf.nbytes // self.size)
            self._ledger[4] += 2 * (self.size - 1)

    def _timed(self, fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.wait_seconds += time.perf_counter() - t

    # public API: each call is timed -------------------------------------
    def sendrecv(self, sendbuf, dest, recvbuf, source, sendtag=0, recvtag=0):
        """Send ``sendbuf`` to ``dest`` and receive into ``recvbuf`` from
        ``source`` at once; ``None`` for either rank skips that half."""
        if dest is not None:
            self._count_send(sendbuf)
        return self._timed(self._sendrecv, sendbuf, dest, recvbuf, source, sendtag, recvtag)

    def send(self, buf, dest, tag=0):
        self._count_send(buf)
        return self._timed(self._send, buf, dest, tag)

    def recv(self, buf, source, tag=0):
        return self._timed(self._recv, buf, source, tag)

    def isend(self, buf, dest, tag=0):
        """Start sending ``buf`` (leave it untouched until :meth:`wait`); a request."""
        self._count_send(buf)
        return self._timed(self._isend, buf, dest, tag)

    def irecv(self, buf, source, tag=0):
        """Start receiving into ``buf`` (complete after :meth:`wait`); a request."""
        return self._timed(self._irecv, buf, source, tag)

    def wait(self, request):
        """Complete a request of :meth:`isend` or :meth:`irecv`."""
        return self._timed(self._wait, request)

    def allreduce_sum(self, buf):
        """Sum ``buf`` (ndarray, the same shape and type on every rank) over
        ranks, in place.  Every element is summed in rank order, ``((b_0 +
        b_1) + b_2) + ...``, so that an emulated and an MPI job of the same
        size give the same bits whatever the MPI library (unless
        :attr:`allreduce_order` is ``"mpi"``: then an MPI communicator of 3
        ranks or more sums in its library's order)."""
        self._count_allreduce(buf)
        return self._timed(self._allreduce_sum, buf)

    def bcast(self, obj, root=0):
        return self._timed(self._bcast, obj, root)

    def gather(self, obj, root=0):
        """List of every rank's ``obj`` on ``root``; None elsewhere."""
        return self._timed(self._gather, obj, root)

    def allgather(self, obj):
        return self._timed(self._allgather, obj)

    def scatter(self, objs, root=0):
        """Rank r gets ``objs[r]`` (``objs`` is read on ``root`` only)."""
        return self._timed(self._scatter, objs, root)

    def barrier(self):
        return self._timed(self._barrier)

    def split(self, color, key=0):
        """Collective: the communicator of the ranks that give the same
        ``color``, ranked by ``(key, rank)`` (MPI's ``Comm_split``).  Its
        messages never meet this communicator's, its waits count in the same
        ledger, and a failure on any rank still ends the whole job."""
        return self._timed(self._split, color, key)

    def dup(self):
        """Collective: a copy of this communicator whose messages never meet
        this one's (e.g. a monitor's sweep beside the pipeline's messages)."""
        return self.split(0, self.rank)

    def local_size(self):
        """How many ranks of this job share this rank's node (collective)."""
        return 1


class LoneComm(Comm):
    """The communicator of one rank by itself (a block without replicas):
    collectives return at once, with this rank's own data.

    Parameters
    ----------
    parent : Comm, optional
        Whose ledger (wait seconds, traffic) it shares.
    """

    emulated = False

    def __init__(self, parent=None):
        super().__init__(parent._ledger if parent is not None else None)

    def _allreduce_sum(self, buf):
        return buf

    def _bcast(self, obj, root):
        return obj

    def _gather(self, obj, root):
        return [obj]

    def _allgather(self, obj):
        return [obj]

    def _scatter(self, objs, root):
        return objs[0]

    def _barrier(self):
        pass

    def _split(self, color, key):
        return LoneComm(self)


class MPIComm(Comm):
    """A :class:`Comm` over an mpi4py communicator.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
    """

    def __init__(self, comm, ledger=None):
        super().__init__(ledger)
        from mpi4py import MPI  # only here: kernels and trainers never import MPI
        self._MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self._buffers = {}  # the ordered all-reduce's receive buffers, by shape and type

    def _peer(self, r):
        return self._MPI.PROC_NULL if r is None else r

    def _sendrecv(self, sendbuf, dest, recvbuf, source, sendtag, recvtag):
        self.comm.Sendrecv(sendbuf, dest=self._peer(dest), sendtag=sendtag,
                           recvbuf=recvbuf, source=self._peer(source), recvtag=recvtag)

    def _send(self, buf, dest, tag):
        self.comm.Send(buf, dest=dest, tag=tag)

    def _isend(self, buf, dest, tag):
        return self.comm.Isend(buf, dest=dest, tag=tag)

    def _irecv(self, buf, source, tag):
        return self.comm.Irecv(buf, source=source, tag=tag)

    def _wait(self, request):
        request.Wait()

    def _recv(self, buf, source, tag):
        self.comm.Recv(buf, source=source, tag=tag)

    def _allreduce_sum(self, buf):
        # MPI_Allreduce sums in an order its library picks by size and rank
        # count, so from 3 ranks on every element is summed here in rank
        # order, as the emulated communicator does: the same bits on any MPI
        # (unless allreduce_order = "mpi"). Two ranks' single addition is the
        # same either way round.
        if self.size == 1:
            return buf
        flat = np.ascontiguousarray(buf).reshape(-1)  # buf itself where it is contiguous
        if self.size == 2 or self.allreduce_order == "mpi":
            self.comm.Allreduce(self._MPI.IN_PLACE, flat, op=self._MPI.SUM)
        elif flat.nbytes * self.size <= ORDERED_ALLGATHER_BYTES:
            # small: every rank gathers every buffer (one collective, latency-bound)
            parts = self._buffer((self.size, flat.size), flat.dtype)
            self.comm.Allgather(flat, parts)
            sum_in_rank_order(parts, out=flat)
        else:
            # large: rank r sums slice r of every buffer (all-to-all), then every
            # rank gathers the sums, a ring all-reduce's bytes
            edges = allreduce_slices(flat.size, self.size)
            counts, displs = np.diff(edges), edges[:-1]
            m = int(counts[self.rank])
            parts = self._buffer((self.size + 1, m), flat.dtype)  # the last row: the sum
            self.comm.Alltoallv([flat, (counts, displs)],
                                [parts, ([m] * self.size, m * np.arange(self.size))])
            self.comm.Allgatherv(sum_in_rank_order(parts[:-1], out=parts[-1]),
                                 [flat, (counts, displs)])
        if not buf.flags.c_contiguous:  # flat was a copy
            buf[...] = flat.reshape(buf.shape)
        return buf

    def _bcast(self, obj, root):
        return self.comm.bcast(obj, root=root)

    def _gather(self, obj, root):
        return self.comm.gather(obj, root=root)

    def _allgather(self, obj):
        return self.comm.allgather(obj)

    def _scatter(self, objs, root):
        return self.comm.scatter(objs, root=root)

    def _barrier(self):
        self.comm.Barrier()

    def _buffer(self, shape, dtype):
        """An array kept for the next all-reduce of this shape and type: the
        ordered all-reduce runs every iteration, and fresh memory costs a
        page fault per page each time."""
        key = (shape, np.dtype(dtype).str)
        if key not in self._buffers:
            self._buffers[key] = np.empty(shape, dtype)
        return self._buffers[key]

    def _split(self, color, key):
        child = MPIComm(self.comm.Split(color, key), self._ledger)
        child.allreduce_order = self.allreduce_order
        return child

    def abort(self, code=1):
        """End the whole job with exit code ``code``, after this rank's
        output has had :data:`ABORT_GRACE` seconds to reach the launcher
        (``Abort`` can otherwise kill the job before it forwards the
        message that says why)."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE)
        self.comm.Abort(code)

    def local_size(self):
        node = self.comm.Split_type(self._MPI.COMM_TYPE_SHARED)
        try:
            return node.Get_size()
        finally:
            node.Free()


class EmulationAborted(RuntimeError):
    """Raised in an emulated rank when another emulated rank has failed."""


class _ThreadJob:
    """What every communicator of one emulated job shares: whether it was
    aborted, and every barrier that an abort must break."""

    def __init__(self):
        self.aborted = threading.Event()
        self.lock = threading.Lock()
        self.barriers = []

    def add(self, barrier):
        with self.lock:
            self.barriers.append(barrier)

    def abort(self):
        self.aborted.set()
        with self.lock:
            for barrier in self.barriers:
                barrier.abort()


class _ThreadWorld:
    """Shared mailboxes and collectives of one emulated communicator."""

    def __init__(self, size, timeout, job=None):
        self.size = size
        self.timeout = timeout
        self.job = job if job is not None else _ThreadJob()
        self.aborted = self.job.aborted
        self.lock = threading.Lock()
        self.boxes = {}
        self.slots = [None] * size
        self.chunks = [None] * size
        self.barrier = threading.Barrier(size)
        self.job.add(self.barrier)

    def box(self, src, dst, tag):
        with self.lock:
            return self.boxes.setdefault((src, dst, tag), queue.Queue())

    def sync(self):
        try:
            self.barrier.wait(timeout=self.timeout)
        except threading.BrokenBarrierError:
            raise EmulationAborted("another emulated rank failed") from None


class ThreadComm(Comm):
    """One rank of an emulated job; see :func:`run_emulated`."""

    emulated = True

    def __init__(self, world, rank, ledger=None):
        super().__init__(ledger)
        self.world, self.rank, self.size = world, rank, world.size

    def _send(self, buf, dest, tag):
        self.world.box(self.rank, dest, tag).put(np.array(buf, copy=True))

    def _recv(self, buf, source, tag):
        box = self.world.box(source, self.rank, tag)
        deadline = time.monotonic() + self.world.timeout
        while True:
            if self.world.aborted.is_set():
                raise EmulationAborted("another emulated rank failed")
            try:
                msg = box.get(timeout=0.05)
                break
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"emulated rank {self.rank}: no message from "
                                       f"{source} (tag {tag})") from None
        if msg.shape != buf.shape:
            raise ValueError(f"emulated rank {self.rank}: message of shape {msg.shape} "
                             f"into buffer of shape {buf.shape}")
        buf[...] = msg

    def _sendrecv(self, sendbuf, dest, recvbuf, source, sendtag, recvtag):
        if dest is not None:
            self._send(sendbuf, dest, sendtag)
        if source is not None:
            self._recv(recvbuf, source, recvtag)

    def _isend(self, buf, dest, tag):
        self._send(buf, dest, tag)  # mailboxes hold a copy: complete at once
        return None

    def _irecv(self, buf, source, tag):
        return (buf, source, tag)

    def _wait(self, request):
        if request is not None:
            self._recv(*request)

    def _exchange(self, obj, pick=lambda slots: slots):
        """``pick`` of every rank's ``obj`` (by rank), deep-copied as a message
        would be (no rank shares live arrays with another); only what is
        picked is copied."""
        w = self.world
        w.sync()
        w.slots[self.rank] = obj
        w.sync()
        out = copy.deepcopy(pick(w.slots))
        w.sync()
        return out

    def _allreduce_sum(self, buf):
        # a reduce-scatter then an all-gather, as MPI's ring does: rank r sums
        # the r-th slice of every rank's buffer (in rank order, so every rank
        # gets the same bits) and copies the others' slices, P m work in all
        # instead of P^2 m for every rank summing every buffer
        w = self.world
        w.sync()
        w.slots[self.rank] = np.ascontiguousarray(buf).reshape(-1)  # read in place
        w.sync()
        parts = w.slots
        if any(p.shape != parts[0].shape or p.dtype != parts[0].dtype for p in parts):
            raise ValueError(f"emulated rank {self.rank}: allreduce of buffers that differ "
                             "in size or type across ranks")
        edges = allreduce_slices(parts[0].size, self.size)
        mine = slice(edges[self.rank], edges[self.rank + 1])
        w.chunks[self.rank] = sum_in_rank_order([p[mine] for p in parts])
        w.sync()  # every slice summed: no rank reads a buffer any more
        total = np.concatenate(w.chunks)
        buf[...] = total.reshape(buf.shape)
        return buf

    def _bcast(self, obj, root):
        return self._exchange(obj, lambda slots: slots[root])

    def _gather(self, obj, root):
        return self._exchange(obj, lambda slots: slots if self.rank == root else None)

    def _allgather(self, obj):
        return self._exchange(obj)

    def _scatter(self, objs, root):
        return self._exchange(objs, lambda slots: slots[root][self.rank])

    def _barrier(self):
        self.world.sync()

    def _share(self, obj):
        """Every rank's ``obj`` itself (not a copy): for setting up shared state."""
        w = self.world
        w.sync()
        w.slots[self.rank] = obj
        w.sync()
        out = list(w.slots)
        w.sync()
        return out

    def _split(self, color, key):
        members = self._share((color, key, self.rank))
        group = sorted((k, r) for c, k, r in members if c == color)
        new_rank = [r for _, r in group].index(self.rank)
        # the group's first rank makes its world; everyone picks up their group's
        world = _ThreadWorld(len(group), self.world.timeout, self.world.job) if new_rank == 0 else None
        worlds = self._share(world)
        return ThreadComm(worlds[group[0][1]], new_rank, self._ledger)

    def local_size(self):
        return self.size  # threads of one process

    def abort(self, code=1):
        self.world.job.abort()
        e = EmulationAborted(f"emulated rank {self.rank} called abort({code})")
        e.code = code
        raise e


def run_emulated(size, fn, *args, timeout=600.0, **kwargs):
    """Run ``fn(comm, *args, **kwargs)`` on ``size`` emulated ranks (threads).

    Returns
    -------
    list
        Each rank's return value, by rank.

    Raises
    ------
    Exception
        The first failure of any rank (the others are stopped, never left
        waiting).
    """
    world = _ThreadWorld(size, timeout)
    results = [None] * size
    errors = [None] * size

    def target(r):
        try:
            results[r] = fn(ThreadComm(world, r), *args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors[r] = e
            world.job.abort()

    threads = [threading.Thread(target=target, args=(r,), name=f"rank{r}") for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    primary = [e for e in errors if e is not None and not isinstance(e, EmulationAborted)]
    # an abort(code) before the ranks it stopped, so that its exit code is the job's
    aborts = sorted((e for e in errors if isinstance(e, EmulationAborted)),
                    key=lambda e: getattr(e, "code", None) is None)
    if primary or aborts:
        raise (primary or aborts)[0]
    return results


def world_comm():
    """``MPIComm(MPI.COMM_WORLD)``; the one place COMM_WORLD is looked up."""
    from mpi4py import MPI
    return MPIComm(MPI.COMM_WORLD)
