"""lavae_fast: a fast, faithful implementation of LAVAE, the Location-Appearance VAE."""

from . import ops, reference
from .baseline import BetaVAE
from .model import LAVAE
from ._version import __version__

__all__ = ["LAVAE", "BetaVAE", "ops", "reference", "__version__"]
