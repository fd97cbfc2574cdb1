"""Shared test configuration: say which lavae_fast and which backends the suite is testing."""

import os

import pytest
import torch


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
    torch.manual_seed(0)
    yield


@pytest.fixture
def ext():
    """The C++ kernels must be loaded: skip (or fail under LAVAE_FAST_REQUIRE_EXT=1, set by CI)."""
    from lavae_fast import _backends

    if not _backends.cpu_kernels_loaded:
        msg = f"lavae_fast._C is not loaded ({_backends.cpu_kernels_error}); {_backends.BUILD_HINT}"
        if os.environ.get("LAVAE_FAST_REQUIRE_EXT") == "1":
            pytest.fail("LAVAE_FAST_REQUIRE_EXT=1 but " + msg)
        pytest.skip(msg)
