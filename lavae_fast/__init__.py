"""lavae_fast: a fast, faithful implementation of LAVAE, the Location-Appearance VAE."""

from . import ops, reference
from .baseline import BetaVAE
from .model import LAVAE
from .recipe import Recipe
from ._version import __version__

__all__ = ["LAVAE", "BetaVAE", "Recipe", "Trainer", "TrainConfig", "ops", "reference", "__version__"]


def __getattr__(name):
    # The trainer is imported when it is asked for: a script that only runs a model does not load
    # the training machinery (TensorBoard, the distributed set-up, the run folders).
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    if name == "TrainConfig":
        from .train_config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'lavae_fast' has no attribute {name!r}")
