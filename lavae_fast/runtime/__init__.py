"""What a process needs around the model: file formats and processes, and speed settings.

* :mod:`.checkpoint` — verified checkpoints written all or nothing, and a run directory's lock;
* :mod:`._io` — writing a file all or nothing (JSON, results), checking output locations;
  :mod:`._process` — whether a writer's process is alive;
* :mod:`.distributed` — torchrun / DistributedDataParallel set-up;
* :mod:`.performance` — process settings (allocator, threads) and whether bf16 is native here.

Nothing here imports a model class or the registry of shipped models: reading a model's
checkpoint by name, run directory or file is :mod:`lavae_fast.hub`'s (tests/test_imports.py).
"""
