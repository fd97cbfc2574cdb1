"""lavae_fast: a fast, faithful implementation of LAVAE, the Location-Appearance VAE."""

from .engine import ops, reference
from .models.baseline import BetaVAE
from .models.lavae import LAVAE
from .recipe import Recipe
from ._version import __version__

__all__ = ["LAVAE", "BetaVAE", "Recipe", "Trainer", "TrainConfig", "ops", "reference", "__version__"]

# The modules that moved into engine/, models/, runtime/ and hub/ (issue 25) keep their old paths:
# a file each, importing which gives the moved module. They stay attributes of the package too, as
# when importing the package imported most of them (``lavae_fast._backends.cpu_capability()``).
_OLD_PATHS = frozenset({"ops", "norm", "reference", "_schemas", "_backends", "noise", "_common", "model", "baseline",
                        "aux_vae", "checkpoint", "distributed", "performance", "_io", "_process", "loading"})


def __getattr__(name):
    # The trainer is imported when it is asked for: a script that only runs a model does not load
    # the training machinery (TensorBoard, the distributed set-up, the run folders).
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    if name == "TrainConfig":
        from .train_config import TrainConfig

        return TrainConfig
    if name in _OLD_PATHS:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'lavae_fast' has no attribute {name!r}")
