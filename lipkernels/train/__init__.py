"""``lipkernels train``: the seed papers' GANs trained end to end with lipkernels' layers,
on data that needs no download (2-D Gaussian mixtures, scikit-learn's digits), measured
as the papers measure them. See :mod:`lipkernels.train.runner`."""
from . import data, methods, metrics  # noqa: F401
from .methods import METHOD_NAMES, METHODS, Trainer, build, method  # noqa: F401
from .runner import train_run  # noqa: F401
