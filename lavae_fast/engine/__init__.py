"""The engine: the four LAVAE ops and the fused Leaky ReLU + batch norm as registered PyTorch
operators, with everything beneath them.

* :mod:`.ops` — the public functional API, input checks, autograd, and the one place where ops are
  dispatched by device; :mod:`.norm` — the fused Leaky ReLU + batch-norm op;
* :mod:`.reference` — the plain-PyTorch definition of every op (tests, benchmarks, the fallback);
* :mod:`._schemas` — the ops' schemas, read from ``lavae_fast/op_schemas.inc``; :mod:`._backends` —
  loading the C++ (``lavae_fast._C``) and Triton (``lavae_fast.kernels``) kernels;
* :mod:`.noise` — the counter-based noise the ops take as arguments; :mod:`._common` — the
  definitions and argument checks the engine and its users share.

Models reach the engine through :mod:`.ops` (with :mod:`.norm`, :mod:`.noise` and :mod:`._common`),
never through its reference or its backends. Nothing here imports a model, a file format or the
trainer (tests/test_imports.py).
"""
