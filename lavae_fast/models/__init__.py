"""The models, as plain ``nn.Module``s: :class:`~lavae_fast.models.lavae.LAVAE` (:mod:`.lavae`),
the β-VAE baseline (:mod:`.baseline`) and the warm-up VAE of the training recipe (:mod:`.aux_vae`).

They reach the engine through :mod:`lavae_fast.engine.ops` (with its fused norm, noise and shared
checks), never through its reference or its backends, so a model never knows which backend runs;
nothing here imports the trainer (tests/test_imports.py).
"""
