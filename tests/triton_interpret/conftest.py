"""The Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (SPEC §9).

The variable must be set before triton is imported, so these tests run in a process of their
own: tests/test_triton.py starts ``python -m pytest tests/triton_interpret`` with
TRITON_INTERPRET=1 and LAVAE_FAST_DISABLE_EXTENSION=1 (the launchers then serve as the ops' CPU
implementations, in place of the C++ kernels). In any other process this folder is not collected.
"""

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore_glob = ["test_*.py"]
else:
    import torch

    from lavae_fast import _backends, ops

    testing = _backends.kernels_package("testing")
    # Each program instance is interpreted in Python: one thread avoids fighting over the cores.
    torch.set_num_threads(1)
    testing.register_interpreter_kernels(ops.register_triton_kernels)

    @pytest.fixture
    def launchers():
        return testing.launchers()
