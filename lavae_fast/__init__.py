"""lavae_fast: a fast, faithful implementation of LAVAE, the Location-Appearance VAE."""

from . import ops, reference
from .baseline import BetaVAE
from .model import LAVAE
from .recipe import Recipe
from ._version import __version__

__all__ = ["LAVAE", "BetaVAE", "Recipe", "ops", "reference", "__version__"]
