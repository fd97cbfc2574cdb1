"""Shared test configuration: say which lavae_fast and which backends the suite is testing."""

import os
import tempfile

import pytest
import torch

# A fresh inductor cache for every test session. Compiled artifacts from earlier processes on the
# same machine (other thread counts, other builds) were reused by the FX graph cache and corrupted
# the heap in a compiled forward (glibc abort in test_speed's compiled step, reproduced only with the
# machine's shared cache; a fresh cache dir, or the caches off, passed). Set before torch compiles.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="lavae_fast_inductor_"))


def pytest_report_header(config):
    import lavae_fast
    from lavae_fast import _backends

    return [
        f"lavae_fast {lavae_fast.__version__} from {os.path.dirname(lavae_fast.__file__)}",
        f"backends: {_backends.describe()}",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
    ]


@pytest.fixture(autouse=True)
def _seed_everything():
    # Automatic seeding: every test starts from the same global RNG state, so a failure reproduces.
    # The thread count is restored too: the in-process CLI tests set it (--threads 1), and a later
    # test must not run (or compile) under a setting it did not ask for.
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ext():
    """The C++ kernels must be loaded: skip (or fail under LAVAE_FAST_REQUIRE_EXT=1, set by CI)."""
    from lavae_fast import _backends

    if not _backends.cpu_kernels_loaded:
        msg = f"lavae_fast._C is not loaded ({_backends.cpu_kernels_error}); {_backends.BUILD_HINT}"
        if os.environ.get("LAVAE_FAST_REQUIRE_EXT") == "1":
            pytest.fail("LAVAE_FAST_REQUIRE_EXT=1 but " + msg)
        pytest.skip(msg)
