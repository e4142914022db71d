"""Where a rank sits in the layers × data grid (DESIGN §10, §11.2).

A job of ``N`` ranks forms ``B = N / D`` layer blocks, each replicated on
``D`` ranks (``train.data_parallel_size``) that split every batch.  A block's
replicas are neighbours in rank order, so that a launcher that fills nodes
rank by rank puts them on one node: rank ``q`` is replica ``q mod D`` of
block ``q // D``.  With ``D = 1`` every rank is a block and the chain is the
job's communicator itself (today's layout); with ``B = 1`` it is
data-parallel over whole networks.
"""
from ..config import replicas_of
from ..errors import ConfigError
from .comm import LoneComm
from .data_parallel import share


class Layout:
    """This rank's block and replica, and the communicators between them.

    Parameters
    ----------
    world : Comm
        The job's communicator (``N`` ranks).
    replicas : int
        ``D``; ``N`` must be a multiple of it.
    batch_size : int
        Rows of every batch, at least ``D``.

    Attributes
    ----------
    blocks, replicas : int
        ``B`` and ``D``.
    block, replica : int
        This rank's block index and replica index.
    chain : Comm
        The ranks of this replica index along the blocks (its rank is the
        block index): states and co-states travel here.
    group : Comm
        The replicas of this block (its rank is the replica index):
        gradients and regression pairs are summed here.
    """

    def __init__(self, world, replicas=1, batch_size=None):
        N, D = world.size, replicas
        if D < 1 or N % D:
            raise ConfigError(f"train.data_parallel_size = {D} is not allowed with {N} ranks: "
                              f"the ranks form (ranks / data_parallel_size) layer blocks, so it "
                              f"must divide {N}")
        if batch_size is not None and D > batch_size:
            raise ConfigError(f"train.data_parallel_size = {D} is larger than train.batch_size = "
                              f"{batch_size}: every replica needs rows of each batch")
        self.world, self.replicas, self.blocks = world, D, N // D
        self.block, self.replica = divmod(world.rank, D)
        if D == 1:
            self.chain, self.group = world, LoneComm(world)
        else:
            self.chain = world.split(self.replica, self.block)
            self.group = world.split(self.block, self.replica)

    @classmethod
    def from_config(cls, world, cfg):
        """The layout of ``cfg['train']['data_parallel_size']`` and
        ``['max_blocks']`` on ``world`` (:func:`pitmpi.config.replicas_of`)."""
        t = cfg["train"]
        D = replicas_of(cfg, world.size)
        if D != t["data_parallel_size"] and D > t["batch_size"]:
            raise ConfigError(f"train.max_blocks = {t['max_blocks']} on {world.size} ranks makes "
                              f"{D} replicas of each block, more than train.batch_size = "
                              f"{t['batch_size']}: every replica needs rows of each batch (raise "
                              "train.max_blocks or train.batch_size)")
        return cls(world, D, t["batch_size"])

    def rows(self, n, replica=None):
        """The contiguous share of ``n`` rows of this replica (or of ``replica``), a slice."""
        return share(n, self.replicas, self.replica if replica is None else replica)

    def block_ranks(self, block):
        """The job ranks of ``block``'s replicas."""
        return list(range(block * self.replicas, (block + 1) * self.replicas))

    def of_blocks(self, parts):
        """From a list over the job's ranks, the entries of each block's
        first replica (in block order)."""
        return parts[::self.replicas]

    def describe(self):
        """One line a block (for the log), with D > 1 only."""
        if self.replicas == 1:
            return []
        return [f"block {b}: ranks {', '.join(map(str, self.block_ranks(b)))}"
                for b in range(self.blocks)]
