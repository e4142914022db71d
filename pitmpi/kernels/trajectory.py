"""What a block's forward sweep keeps for its adjoint."""


class Trajectory:
    """The state ``end`` (n, width) at the block's right end and, with
    ``store=True``, the per-layer arrays a scheme's adjoint reads (a
    subclass names them; ``Y`` (m+1, n, *s) is always among them).  With
    ``store=False`` only ``end`` is kept and the arrays are None."""

    def __init__(self, end, Y=None):
        self.end = end
        self.Y = Y

    @property
    def stored(self):
        return self.Y is not None

    @property
    def output(self):
        """The state at the block's right end, shape (n, width)."""
        return self.end
