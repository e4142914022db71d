"""Run configuration: TOML files, ``--set section.key=value`` overrides, checks.

A run's values come from the defaults, the file, for ``pit`` on
:data:`MANY_BLOCKS` blocks or more the ``[many_blocks.<section>]`` tables
(the package's :data:`OVERLAY_DEFAULTS`, then the file's), and ``--set``, each
later one winning.  The schema below is the single source of truth for keys,
types, defaults and allowed values; ``python -m pitmpi keys`` prints it and the documentation's
configuration reference is generated from it (``docs/conf.py``).  Unknown sections or keys and bad
values raise :class:`ConfigError` naming the key and what is allowed.
"""
import math
import tomllib

from .errors import ConfigError


class Key:
    """One configuration key: type, default, check and a line of help."""

    def __init__(self, kind, default, help, choices=None, minimum=None, maximum=None,
                 strict_min=False):
        self.kind, self.default, self.help = kind, default, help
        self.choices, self.minimum, self.maximum, self.strict_min = choices, minimum, maximum, strict_min

    def allowed(self):
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        parts = [{"int": "an integer", "float": "a number", "str": "a string",
                  "bool": "true or false"}[self.kind]]
        if self.minimum is not None:
            parts.append(f"{'>' if self.strict_min else '>='} {self.minimum}")
        if self.maximum is not None:
            parts.append(f"<= {self.maximum}")
        return " ".join(parts)

    def check(self, name, value):
        """Return ``value`` converted to this key's type, or raise ConfigError."""
        bad = ConfigError(f"{name} = {value!r} is not allowed; expected {self.allowed()}")
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise bad
        elif self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad
        elif self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad
            value = float(value)
            if not math.isfinite(value):
                raise bad
        elif self.kind == "str":
            if not isinstance(value, str):
                raise bad
        if self.choices is not None and value not in self.choices:
            raise bad
        if self.minimum is not None:
            if value < self.minimum or (self.strict_min and value == self.minimum):
                raise bad
        if self.maximum is not None and value > self.maximum:
            raise bad
        return value


METHODS = ("serial", "data-parallel", "model-parallel", "pit")

SCHEMA = {
    "data": {
        "name": Key("str", "swissroll", "dataset", choices=("swissroll", "ellipses", "mnist", "npz")),
        "path": Key("str", "", "directory of the MNIST IDX files, or the .npz file "
                               "(empty: $PITMPI_DATA)"),
        "n_train": Key("int", 0, "keep only the first n training samples (0: all)", minimum=0),
        "n_val": Key("int", 0, "keep only the first n validation samples (0: all)", minimum=0),
        "seed": Key("int", 0, "seed of generated datasets (ellipses)", minimum=0),
    },
    "model": {
        "kind": Key("str", "dense", "the ODE layers' linear map: a matrix (dense) or a 'same' "
                                    "convolution over images (conv; mnist, or an .npz of "
                                    "images)", choices=("dense", "conv")),
        "scheme": Key("str", "verlet", "ODE discretisation", choices=("euler", "verlet")),
        "width": Key("int", 16, "layer width w (dense)", minimum=1),
        "channels": Key("int", 8, "conv: channels of every ODE layer's state", minimum=1),
        "kernel": Key("int", 3, "conv: kernel size k (k x k, odd)", choices=(1, 3, 5, 7)),
        "stride": Key("int", 1, "conv: the opening layer's stride; the ODE layers work at "
                                "ceil(H / stride) x ceil(W / stride)", minimum=1),
        "classifier": Key("str", "flatten", "conv: the classifier reads the whole last state "
                                            "(flatten) or its per-channel means (pool)",
                          choices=("flatten", "pool")),
        "layers": Key("int", 32, "number of ODE layers L", minimum=1),
        "T": Key("float", 5.0, "final time (step h = T / L)", minimum=0.0, strict_min=True),
        "activation": Key("str", "tanh", "activation", choices=("tanh", "relu")),
        "dtype": Key("str", "float64", "floating-point type", choices=("float64", "float32")),
        "store_trajectory": Key("bool", True, "Verlet: store states (true) or rebuild them "
                                              "backwards in the adjoint (false)"),
    },
    "train": {
        "method": Key("str", "pit", "training method", choices=METHODS),
        "epochs": Key("int", 150, "passes over the training set", minimum=1),
        "batch_size": Key("int", 32, "samples per iteration", minimum=1),
        "lr": Key("float", 0.03, "learning rate (see lr_per)", minimum=0.0, strict_min=True),
        "lr_per": Key("str", "time", "what train.lr steps: the controls of each ODE layer "
                                      "with their own gradient (layer, the paper's plain SGD) "
                                      "or per unit time, with the gradient divided by the step "
                                      "h (time; the same lr then trains any depth); the opening "
                                      "layer and classifier use their own gradient either way",
                      choices=("time", "layer")),
        "momentum": Key("float", 0.9, "SGD momentum", minimum=0.0, maximum=0.999),
        "weight_decay": Key("float", 1e-4, "weight decay beta", minimum=0.0),
        "schedule": Key("str", "step", "learning-rate schedule",
                        choices=("constant", "step", "inverse")),
        "lr_gamma": Key("float", 0.1, "step schedule: factor per step",
                        minimum=0.0, maximum=1.0, strict_min=True),
        "lr_step": Key("int", 100, "step schedule: epochs per step", minimum=1),
        "lr_decay_iters": Key("int", 1000, "inverse schedule: lr_k = lr / (1 + k / lr_decay_iters)",
                              minimum=1),
        "label_smoothing": Key("float", 0.0, "train on targets (1 - e) onehot(y) + e / classes "
                                             "instead of onehot(y) (0: none)",
                               minimum=0.0, maximum=0.5),
        "lr_warmup": Key("float", 0.0, "epochs over which the learning rate rises linearly "
                                       "from near 0 to its schedule's value (0: none)",
                         minimum=0.0),
        "data_parallel_size": Key("int", 1, "pit and model-parallel: replicas of every layer "
                                            "block, which split each batch; the job's N ranks "
                                            "form N / data_parallel_size blocks (a layers x "
                                            "data grid)", minimum=1),
        "max_blocks": Key("int", 0, "pit and model-parallel: at most this many layer blocks; "
                                    "on more ranks the blocks get more replicas (the least "
                                    "multiple of data_parallel_size that leaves ranks / "
                                    "replicas <= max_blocks; 0: no limit; methods without "
                                    "layer blocks ignore it)", minimum=0),
        "allreduce": Key("str", "ordered", "how MPI ranks sum an all-reduce (data-parallel's "
                                           "gradients, a grid's replicas, a shared coarse "
                                           "phase): ordered, every number in rank order, the "
                                           "bits of --emulate on any MPI library; mpi, the "
                                           "library's MPI_Allreduce, faster on some machines, "
                                           "with iterates that differ from --emulate's in "
                                           "rounding from 3 ranks on",
                         choices=("ordered", "mpi")),
        "seed": Key("int", 0, "seed of the initial weights and the batch order", minimum=0),
        "max_loss": Key("float", 100.0, "stop as diverged when a batch loss exceeds this "
                                        "(NaN or Inf anywhere always stops; 0: no loss limit)",
                        minimum=0.0),
    },
    "coarse": {
        "levels": Key("int", 2, "2: global prediction on a coarse model first; "
                                "1: single-level (no coarse phase); k > 2: the coarse model "
                                "is itself trained with pit on every rank (on the run's "
                                "layers x data grid), with its own "
                                "coarse model (k - 1 levels), block boundaries on multiples "
                                "of factor^(k-1)", minimum=1),
        "factor": Key("int", 2, "coarsening factor c (coarse model has L / c layers)", minimum=2),
        "iterations": Key("int", 600, "SGD iterations of the coarse model (0: one epoch)", minimum=0),
        "lr": Key("float", 0.0, "coarse learning rate (0: train.lr)", minimum=0.0),
        "prolongation": Key("str", "constant", "coarse-to-fine control transfer",
                            choices=("constant", "linear")),
        "warmup": Key("str", "coarse", "what rank r does in the first r iterations, before its "
                                       "first state arrives", choices=("coarse", "wait")),
        "parallel": Key("str", "rank0", "who trains the coarse model: rank 0 alone while the "
                                        "others wait (rank0, the paper's global prediction), or "
                                        "every rank on a share of each batch (data-parallel)",
                        choices=("rank0", "data-parallel")),
    },
    "regression": {
        "features": Key("str", "per-class", "regression features: [x, 1] (state), "
                        "[x, onehot(y), 1] (state+label), or one affine map per class (per-class)",
                        choices=("state", "state+label", "per-class")),
        "ridge": Key("float", 1e-6, "ridge weight, relative to the mean diagonal of the "
                                    "Gram matrix", minimum=0.0),
        "forgetting": Key("float", 0.99, "exponential forgetting factor of the normal equations",
                          minimum=0.0, maximum=1.0, strict_min=True),
        "pairs_per_batch": Key("int", 0, "add only the first k (state, co-state) pairs of each "
                                         "batch to the regression (0: all)", minimum=0),
        "rank": Key("int", 0, "predict the co-states within a subspace of this many "
                              "dimensions that follows their span (0: the full state "
                              "width); at most the boundary state's width", minimum=0),
        "delay": Key("int", 0, "iterations by which a co-state may join the regression late: "
                               "0 is the paper's schedule (blocking Sendrecv); d > 0 exchanges "
                               "without blocking and lets each rank run up to d iterations "
                               "ahead of its right neighbour", minimum=0),
        "target": Key("str", "neighbour", "the co-state a boundary's regression learns from: "
                                          "the one its right neighbour computed from its own "
                                          "prediction (neighbour, the paper's), or the batch's "
                                          "exact co-state, relayed back block by block along "
                                          "the batch's kept states (relayed; 2(N-r)-3 "
                                          "iterations late at rank r, one more forward and "
                                          "co-state-only backward per iteration on ranks "
                                          "1..N-2)",
                       choices=("neighbour", "relayed")),
        "relay_every": Key("int", 1, "with target = 'relayed': relay the exact co-states of "
                                     "every k-th batch only (the extra sweep's cost divided by "
                                     "k; the regression learns from those batches)", minimum=1),
        "clip": Key("float", 0.0, "bound the predicted co-state of a batch to this many times "
                                  "the running mean norm of the co-states that arrived at the "
                                  "boundary (scaled down if larger; 0: no bound)", minimum=0.0),
        "damping": Key("str", "none", "scale each block's learning rate by its trust in the "
                                      "co-state predicted at its right end, 1 minus the running "
                                      "mean relative error against the co-states that arrived "
                                      "there (error), or not (none); the last block is exact",
                       choices=("none", "error")),
        "pool": Key("int", 0, "conv: fit on each channel's means over P x P patches of the "
                              "boundary state's positions instead of the whole state (the "
                              "co-states are still predicted whole); 0: the whole state",
                    minimum=0),
        "output_errors": Key("bool", False, "pit: add to the regression's features each "
                                            "sample's output error softmax(S) - q from its "
                                            "last pass through the network (the coarse "
                                            "model's, then the last epoch's; c numbers a "
                                            "sample, shared once an epoch)"),
        "refit_every": Key("int", 1, "refit the regression after every k-th arriving co-state "
                                     "(per-class: the classes' refits spread over those k "
                                     "arrivals; pairs are always added)", minimum=1),
    },
    "monitor": {
        "every": Key("int", 0, "pit: every k-th iteration compute, with the current controls, "
                               "the exact co-states of that iteration's batch at every block "
                               "boundary (a model-parallel sweep, not timed as training) and "
                               "record the predicted co-states' error and the gradients' "
                               "cosines (history/monitor_*); 0: off", minimum=0),
        "fallback": Key("float", 0.0, "pit: when the monitor measures a predicted co-state "
                                      "error above this at any boundary, train on exact "
                                      "co-states (one model-parallel sweep per iteration) until "
                                      "every boundary's prediction is back below it, then "
                                      "refill the pipeline; needs monitor.every > 0 (0: never)",
                        minimum=0.0),
    },
    "output": {
        "path": Key("str", "results/run.h5", "HDF5 output file"),
        "progress": Key("bool", True, "print a line per epoch on rank 0"),
        "checkpoint_every": Key("int", 0, "also write the output file (a complete checkpoint) "
                                          "every k epochs during the run (0: only at the end)",
                                minimum=0),
    },
}


# pit on this many layer blocks or more takes the [many_blocks] values
MANY_BLOCKS = 4
OVERLAY = "many_blocks"
# what [many_blocks] may set: not what decides the blocks, the data or the model
OVERLAY_SECTIONS = ("train", "coarse", "regression", "monitor")
NOT_IN_OVERLAY = {("train", "method"), ("train", "data_parallel_size"), ("train", "max_blocks")}
# the package's [many_blocks]: what kept serial's accuracy on 4-16 blocks on both
# the Swiss roll and MNIST (docs/many-ranks.md); a config file adds its own
OVERLAY_DEFAULTS = {
    "regression": {"target": "relayed", "relay_every": 4, "delay": 0, "damping": "error"},
    "coarse": {"parallel": "data-parallel"},
}


def defaults():
    """The default configuration as a nested dict (``many_blocks``: the
    sparse overlay of :data:`OVERLAY_DEFAULTS`)."""
    cfg = {s: {k: key.default for k, key in keys.items()} for s, keys in SCHEMA.items()}
    cfg[OVERLAY] = {s: dict(keys) for s, keys in OVERLAY_DEFAULTS.items()}
    return cfg


def _check_known(section, key=None):
    if section not in SCHEMA:
        raise ConfigError(f"unknown section [{section}]; allowed: {', '.join(SCHEMA)}, "
                          f"{OVERLAY}")
    if key is not None and key not in SCHEMA[section]:
        raise ConfigError(f"unknown key {section}.{key}; allowed in [{section}]: "
                          f"{', '.join(SCHEMA[section])}")


def _check_overlay(section, key=None):
    """Check a ``[many_blocks.<section>]`` table or key."""
    where = f"{OVERLAY}.{section}" if key is None else f"{OVERLAY}.{section}.{key}"
    if section not in OVERLAY_SECTIONS:
        raise ConfigError(f"unknown section [{OVERLAY}.{section}]; allowed: "
                          + ", ".join(f"[{OVERLAY}.{s}]" for s in OVERLAY_SECTIONS))
    if key is None:
        return
    if key not in SCHEMA[section]:
        allowed = [k for k in SCHEMA[section] if (section, k) not in NOT_IN_OVERLAY]
        raise ConfigError(f"unknown key {where}; allowed in [{OVERLAY}.{section}]: "
                          f"{', '.join(allowed)}")
    if (section, key) in NOT_IN_OVERLAY:
        raise ConfigError(f"{where} is not allowed: {section}.{key} decides the number of "
                          f"blocks, so it cannot depend on it (set it in [{section}])")


def merge(cfg, updates, origin):
    """Merge a nested dict ``updates`` into ``cfg`` with checks.

    ``origin`` names where the updates come from (for messages).
    """
    for section, keys in updates.items():
        if section == OVERLAY:
            _merge_overlay(cfg, keys, origin)
            continue
        _check_known(section)
        if not isinstance(keys, dict):
            raise ConfigError(f"{origin}: {section} must be a section [{section}], "
                              f"not a value")
        for key, value in keys.items():
            _check_known(section, key)
            cfg[section][key] = SCHEMA[section][key].check(f"{section}.{key}", value)
    return cfg


def _merge_overlay(cfg, tables, origin):
    """Merge ``{section: {key: value}}`` into ``cfg["many_blocks"]`` with checks."""
    if not isinstance(tables, dict):
        raise ConfigError(f"{origin}: {OVERLAY} must hold tables such as "
                          f"[{OVERLAY}.regression], not a value")
    for section, keys in tables.items():
        if not isinstance(keys, dict):
            raise ConfigError(f"{origin}: {OVERLAY}.{section} must be a section "
                              f"[{OVERLAY}.<section>], not a value")
        _check_overlay(section)
        for key, value in keys.items():
            _check_overlay(section, key)
            cfg[OVERLAY].setdefault(section, {})[key] = SCHEMA[section][key].check(
                f"{OVERLAY}.{section}.{key}", value)


def parse_override(text):
    """Parse ``section.key=value`` (or ``many_blocks.section.key=value``); the
    value is read as TOML, else as a string.

    Returns
    -------
    dict
        ``{section: {key: value}}`` (or ``{"many_blocks": {section: {key: value}}}``).
    """
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    name, raw = text.split("=", 1)
    parts = name.strip().split(".")
    if parts[0] == OVERLAY:
        if len(parts) != 3:
            raise ConfigError(f"--set {text!r}: the name must be {OVERLAY}.section.key "
                              f"(sections: {', '.join(OVERLAY_SECTIONS)})")
        _check_overlay(*parts[1:])
    elif len(parts) == 2:
        _check_known(*parts)
    else:
        raise ConfigError(f"--set {text!r}: the name must be section.key or "
                          f"{OVERLAY}.section.key (sections: {', '.join(SCHEMA)})")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    *outer, section, key = parts
    update = {section: {key: value}}
    return {OVERLAY: update} if outer else update


# the methods that split the layers into blocks (the layers x data grid)
BLOCK_METHODS = ("pit", "model-parallel")


def replicas_of(cfg, ranks):
    """``D``, the replicas of every layer block on ``ranks`` ranks:
    ``train.data_parallel_size``, or with ``train.max_blocks = M > 0`` the
    least multiple of it that divides ``ranks`` and leaves at most ``M``
    blocks (``ranks`` itself at worst: one block).  The same for a
    configuration that already holds the result, and for methods without
    layer blocks ``train.data_parallel_size`` as it is."""
    t = cfg["train"]
    D, cap = t["data_parallel_size"], t["max_blocks"]
    if not cap or t["method"] not in BLOCK_METHODS or ranks % D:
        return D  # a D that does not divide the ranks is the layout's error
    return next(d for d in range(D, ranks + 1, D) if ranks % d == 0 and ranks // d <= cap)


def blocks_of(cfg, ranks):
    """The number of layer blocks ``pit`` forms on ``ranks`` ranks (0 for
    other methods)."""
    if cfg["train"]["method"] != "pit":
        return 0
    return ranks // replicas_of(cfg, ranks)


def overlay_applies(cfg, ranks):
    """Whether the ``[many_blocks]`` values apply to this run on ``ranks`` ranks."""
    return blocks_of(cfg, ranks) >= MANY_BLOCKS


def load(path=None, overrides=(), ranks=None):
    """Defaults, then the TOML file ``path`` (optional), then, for ``pit`` on
    :data:`MANY_BLOCKS` blocks or more of ``ranks`` ranks, the
    ``[many_blocks]`` values, then ``overrides``.

    Returns
    -------
    dict
        The resolved, checked configuration.
    """
    text = None
    if path is not None:
        try:
            with open(path, "rb") as f:
                text = f.read().decode()
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory, not a config file") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return loads(text, overrides, origin=path, ranks=ranks)


def loads(text=None, overrides=(), origin="config", ranks=None):
    """Defaults, then the TOML ``text`` (optional), then, with ``ranks``
    given and ``pit`` on :data:`MANY_BLOCKS` blocks or more, the
    ``[many_blocks]`` values, then ``overrides``.  Without ``ranks`` (a
    saved run's config) the overlay is kept but not applied."""
    cfg = defaults()
    if text is not None:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{origin}: not valid TOML ({e})") from None
        merge(cfg, data, origin)
    updates = [parse_override(item) for item in overrides]
    for update in updates:
        merge(cfg, update, "--set")
    if ranks is not None and overlay_applies(cfg, ranks):
        for section, keys in cfg[OVERLAY].items():
            cfg[section].update(keys)
        for update in updates:  # the command line wins
            merge(cfg, update, "--set")
    return cfg


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(cfg):
    """The configuration as TOML text (round-trips through :func:`tomllib.loads`)."""
    lines = []
    for section, keys in cfg.items():
        if section == OVERLAY:
            for inner, values in keys.items():
                lines.append(f"[{OVERLAY}.{inner}]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
                lines.append("")
            continue
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in keys.items())
        lines.append("")
    return "\n".join(lines)


def describe():
    """Markdown table of every key (for README and ``--help``)."""
    rows = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for section, keys in SCHEMA.items():
        for k, key in keys.items():
            rows.append(f"| `{section}.{k}` | `{_toml_value(key.default)}` | {key.allowed()} | {key.help} |")
    for section, keys in OVERLAY_DEFAULTS.items():
        for k, value in keys.items():
            rows.append(f"| `{OVERLAY}.{section}.{k}` | `{_toml_value(value)}` | as "
                        f"`{section}.{k}` | {section}.{k} for pit on {MANY_BLOCKS} blocks or "
                        "more |")
    rows.append(f"| `{OVERLAY}.<section>.<key>` | | as `<section>.<key>` | any key of "
                + ", ".join(f"[{s}]" for s in OVERLAY_SECTIONS) + " but train.method, "
                f"train.data_parallel_size and train.max_blocks, for pit on {MANY_BLOCKS} blocks or more |")
    return "\n".join(rows)
