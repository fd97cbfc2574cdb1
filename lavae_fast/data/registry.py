"""The data sets, one entry each: how they are generated and what a model of them needs.

``DATASETS[name]`` is a :class:`DataSetInfo`: the sprite kind and MNIST pool size (for the
generator), the image channels, LAVAE's sprite side S (paper appendix B: 17 px for multi-MNIST,
21 px for multi-dSprites; the sprites' ink fits in 15 and 19 px) and the location inference net's
learning rate of the paper's recipe (1e-4 multi-MNIST, 5e-4 multi-dSprites).
"""

from __future__ import annotations

import dataclasses
from typing import Dict

__all__ = ["DataSetInfo", "DATASETS", "IMPORTED", "IMPORTED_LOC_LR"]


@dataclasses.dataclass(frozen=True)
class DataSetInfo:
    name: str
    kind: str  # "mnist" or "dsprites": which sprites (lavae_fast.data.mnist / .dsprites)
    pool_size: int  # MNIST training digits drawn into the set's pool (0: not MNIST)
    channels: int
    sprite_size: int  # LAVAE's sprite side S
    loc_lr: float  # learning rate of the location inference net (loc residual net + head)


DATASETS: Dict[str, DataSetInfo] = {
    info.name: info
    for info in (
        DataSetInfo("multi-mnist-1k", "mnist", 1000, channels=1, sprite_size=17, loc_lr=1e-4),
        DataSetInfo("multi-mnist-10k", "mnist", 10000, channels=1, sprite_size=17, loc_lr=1e-4),
        DataSetInfo("multi-dsprites", "dsprites", 0, channels=3, sprite_size=21, loc_lr=5e-4),
    )
}

# ``--dataset imported --data DIR``: a set brought in by ``python -m lavae_fast.data import``; its
# channels and sprite side are in its meta.json (lavae_fast.data.runs.run_dataset_info), not here.
IMPORTED = "imported"
# The location net's learning rate for an imported set: multi-dSprites' (the paper gives 1e-4 for
# MNIST digits and 5e-4 for the shapes; a user's scenes are more often shapes than digits). A
# setting (--loc-lr) like any other.
IMPORTED_LOC_LR = 5e-4
