"""lavae_fast: a fast, faithful implementation of LAVAE, the Location-Appearance VAE."""

import os as _os

# In a source checkout (editable install or PYTHONPATH) the Triton kernels sit in the top-level
# kernels/ folder; setup.py ships them as lavae_fast.kernels. Make that name resolve here too.
_src_kernels = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
if not _os.path.isdir(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "kernels")) and _os.path.isfile(
    _os.path.join(_src_kernels, "__init__.py")
):
    __path__.append(_os.path.dirname(_src_kernels))  # noqa: F821 (package __path__)

from . import ops, reference  # noqa: E402
from .baseline import BetaVAE  # noqa: E402
from .model import LAVAE  # noqa: E402
from ._version import __version__  # noqa: E402

__all__ = ["LAVAE", "BetaVAE", "ops", "reference", "__version__"]
