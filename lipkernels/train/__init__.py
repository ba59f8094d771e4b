"""``lipkernels train``: the seed papers' GANs trained end to end with lipkernels' layers,
on data that needs no download (2-D Gaussian mixtures, scikit-learn's digits), measured
as the papers measure them. The command and its outputs: :mod:`lipkernels.train.runner`
(not imported here, so ``python -m lipkernels.train.runner`` runs cleanly)."""
from . import data, methods, metrics  # noqa: F401
from .methods import METHOD_NAMES, METHODS, Trainer, build, method  # noqa: F401
