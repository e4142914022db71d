"""The training methods by name, and the one call that runs a configured job."""
from .serial import SerialTrainer

METHOD_CLASSES = {"serial": SerialTrainer}


def register(name, cls):
    METHOD_CLASSES[name] = cls


def make_trainer(comm, cfg, data, log=None):
    """The trainer of ``cfg['train']['method']`` for this rank."""
    _load_all()
    return METHOD_CLASSES[cfg["train"]["method"]](comm, cfg, data, log)


def reads_features(cfg, rank, size):
    """Whether rank ``rank`` of ``size`` reads the features in the job ``cfg``
    describes (see :meth:`~pitmpi.parallel.trainer.Trainer.reads_features`)."""
    _load_all()
    return METHOD_CLASSES[cfg["train"]["method"]].reads_features(cfg, rank, size)


def _load_all():
    # imported lazily so that each method module can import the base classes
    from . import data_parallel, model_parallel, pit  # noqa: F401
