"""Communicators that split (DESIGN §11.1): child communicators on emulated
ranks, with their own ranks and mailboxes, one wait clock, one abort."""
import time

import numpy as np
import pytest

from pitmpi.parallel.comm import EmulationAborted, run_emulated


def test_split_groups_ranks_by_color_and_orders_them_by_key():
    def body(comm):
        # 6 ranks as 3 blocks x 2 replicas: replica groups by block, chains by replica
        block, replica = divmod(comm.rank, 2)
        group = comm.split(block, replica)
        chain = comm.split(replica, block)
        rev = comm.split(0, -comm.rank)
        buf = np.array([float(comm.rank)])
        group.allreduce_sum(buf)
        return (group.rank, group.size, chain.rank, chain.size, float(buf[0]), rev.rank,
                chain.allgather(comm.rank))

    out = run_emulated(6, body)
    for r, (g_rank, g_size, c_rank, c_size, total, rev_rank, chain_members) in enumerate(out):
        block, replica = divmod(r, 2)
        assert (g_rank, g_size) == (replica, 2) and (c_rank, c_size) == (block, 3)
        assert total == sum(range(2 * block, 2 * block + 2))  # summed within the group only
        assert rev_rank == 5 - r
        assert chain_members == [replica, replica + 2, replica + 4]


@pytest.mark.parametrize("size, shape", [(3, (7, 5)), (5, (3,)), (4, (2, 3, 4))])
def test_emulated_allreduce_gives_every_rank_the_rank_ordered_sum(size, shape):
    # sliced among the ranks (fewer elements than ranks included), the sum is
    # still parts[0] + parts[1] + ... in rank order, to the bit, on every rank
    def body(comm):
        rng = np.random.default_rng(comm.rank)
        buf = rng.standard_normal(shape).astype(np.float32)
        fortran = np.asfortranarray(buf.astype(np.float64))
        interleaved = np.zeros(shape + (2,))
        interleaved[..., 0] = buf  # a strided view, summed in place
        comm.allreduce_sum(buf)
        comm.allreduce_sum(fortran)
        comm.allreduce_sum(interleaved[..., 0])
        return buf, fortran, interleaved

    out = run_emulated(size, body)
    parts = [np.random.default_rng(r).standard_normal(shape).astype(np.float32)
             for r in range(size)]
    expected = parts[0].copy()
    for p in parts[1:]:
        expected += p
    expected64 = parts[0].astype(np.float64)
    for p in parts[1:]:
        expected64 += p
    for buf, fortran, interleaved in out:
        assert buf.tobytes() == expected.tobytes()
        assert np.array_equal(fortran, expected64) and fortran.flags.f_contiguous
        assert np.array_equal(interleaved[..., 0], expected64)
        assert not interleaved[..., 1].any()


def test_an_emulated_allreduce_of_unequal_buffers_fails_on_every_rank():
    def body(comm):
        comm.allreduce_sum(np.zeros(3 + comm.rank))

    with pytest.raises(ValueError, match="differ in size or type"):
        run_emulated(3, body, timeout=5.0)


def test_a_split_communicators_messages_never_meet_the_parents():
    def body(comm):
        child = comm.dup()
        peer = 1 - comm.rank
        a, b = np.array([10.0 + comm.rank]), np.array([20.0 + comm.rank])
        got_a, got_b = np.empty(1), np.empty(1)
        # the same tag on both: each receive gets its own communicator's message
        comm.send(a, peer, 7)
        child.send(b, peer, 7)
        child.recv(got_b, peer, 7)
        comm.recv(got_a, peer, 7)
        return float(got_a[0]), float(got_b[0])

    assert run_emulated(2, body) == [(11.0, 21.0), (10.0, 20.0)]


def test_waits_on_a_split_communicator_count_in_the_same_clock():
    def body(comm):
        comm.wait_seconds = 0.0
        child = comm.split(comm.rank % 2)
        if comm.rank == 1:
            time.sleep(0.2)
        child.barrier() if child.size > 1 else None
        comm.barrier()
        return comm.wait_seconds, child.wait_seconds

    out = run_emulated(2, body)
    assert out[0][0] == out[0][1] and out[0][0] > 0.15  # rank 0 waited for rank 1


def test_traffic_counts_what_the_array_calls_send_on_every_split_communicator():
    def body(comm):
        comm.ledger = 0.0
        pair = comm.split(comm.rank // 2)  # ranks {0, 1} and {2, 3}
        lone = pair.split(pair.rank)  # one rank: its all-reduce sends nothing
        peer = comm.rank ^ 1
        got = np.empty(10)
        if comm.rank % 2 == 0:
            pair.sendrecv(np.zeros(10), 1, got, 1)
            comm.send(np.zeros(3, dtype=np.float32), peer)
        else:
            pair.sendrecv(np.zeros(10), 0, got, 0)
            comm.recv(np.empty(3, dtype=np.float32), peer)
        comm.allreduce_sum(np.zeros(8))
        lone.allreduce_sum(np.zeros(100))
        req = pair.isend(np.zeros(2), 1 - pair.rank)
        pair.wait(pair.irecv(np.empty(2), 1 - pair.rank))
        pair.wait(req)
        pair.sendrecv(None, None, got, None)  # neither half: nothing sent
        return comm.traffic, pair.traffic, comm.wait_seconds

    out = run_emulated(4, body)
    for r, (traffic, pair_traffic, waited) in enumerate(out):
        sent = 80 + 16 + (12 if r % 2 == 0 else 0)
        messages = 2 + (1 if r % 2 == 0 else 0)
        # a ring all-reduce of 64 bytes over 4 ranks: 6 steps of a 16-byte chunk
        np.testing.assert_array_equal(traffic, [sent, messages, 96.0, 6.0])
        np.testing.assert_array_equal(pair_traffic, traffic)  # one ledger per process
        assert waited >= 0


def test_an_all_reduce_over_three_ranks_counts_whole_chunks():
    def body(comm):
        comm.allreduce_sum(np.zeros(5, dtype=np.int16))  # 10 bytes: chunks of 4
        return comm.traffic

    for traffic in run_emulated(3, body):
        np.testing.assert_array_equal(traffic, [0, 0, 4 * 4, 4])


def test_a_failure_inside_a_split_communicator_ends_the_whole_job():
    def body(comm):
        child = comm.split(comm.rank % 2)
        if comm.rank == 3:
            raise ValueError("boom")
        child.barrier()  # ranks 0 and 2 would wait here forever, 1 on rank 3
        comm.barrier()

    t = time.monotonic()
    with pytest.raises(ValueError, match="boom"):
        run_emulated(4, body, timeout=60)
    assert time.monotonic() - t < 10


def test_abort_in_a_child_stops_the_others():
    def body(comm):
        child = comm.split(comm.rank % 2)
        if comm.rank == 0:
            child.abort(3)
        comm.barrier()

    with pytest.raises(EmulationAborted) as info:
        run_emulated(3, body, timeout=60)
    assert getattr(info.value, "code", None) == 3
