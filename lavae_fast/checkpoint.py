"""The old path of :mod:`lavae_fast.runtime.checkpoint` (issue 25), and of the model reader that moved
from it to :mod:`lavae_fast.hub.reader` (``read_model_checkpoint``, ``restore_model``, ``model_kwargs``,
``LEGACY_LAVAE_CONFIG``): the old module's names, each read, set or deleted (a test's monkeypatch) in
the module that holds it now, so that either path gives the same object.

Unlike the other old paths this cannot be the moved module itself: the file format (runtime) may
not import the registry of shipped models that the reader needs.
"""

import sys
import types

from .hub import reader as _reader
from .runtime import checkpoint as _checkpoint

_IN_HUB = frozenset(_reader.__all__) | {"_check_canvas"}


def _home(name: str):
    return _reader if name in _IN_HUB else _checkpoint


class _OldCheckpointModule(types.ModuleType):
    # Python calls __getattr__ only for names missing from the object itself, which holds nothing
    # but the module's own dunders (set below).
    def __getattr__(self, name):
        return getattr(_home(name), name)

    def __setattr__(self, name, value):
        setattr(_home(name), name, value)

    def __delattr__(self, name):
        delattr(_home(name), name)

    def __dir__(self):
        return sorted(set(dir(_checkpoint)) | _IN_HUB)


_module = _OldCheckpointModule(__name__, __doc__)
vars(_module).update(__file__=__file__, __spec__=__spec__, __loader__=__loader__, __package__=__package__,
                     __all__=[*_checkpoint.__all__, *_reader.__all__])
sys.modules[__name__] = _module
