"""The old path of :mod:`lavae_fast.runtime._io` (issue 25): importing it gives that module itself, so a name
read or patched under either path is the same object."""

import sys

from .runtime import _io as _module

sys.modules[__name__] = _module
