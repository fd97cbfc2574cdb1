"""Trained models by name, run directory or file: the layer between the models and their files.

* :mod:`.reader` — a model's checkpoint found (a shipped model's name through the registry,
  :mod:`lavae_fast.pretrained`), read verified, and made a model of a given class;
* :mod:`.loading` — :func:`~lavae_fast.hub.loading.load_model`: the same, with the class the
  checkpoint names; the one reader of a trained model for every reader of a run.

The shipped model files, their registry and the ``python -m lavae_fast.pretrained`` command
(list, info, export) stay in :mod:`lavae_fast.pretrained`: export rebuilds a run's training command
and checks its evaluation, so it sits above the trainer, which nothing here imports
(tests/test_imports.py).
"""
