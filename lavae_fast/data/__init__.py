"""Multi-object data sets for LAVAE: multi-MNIST-1k, multi-MNIST-10k and multi-dSprites (SPEC §8).

In memory::

    from lavae_fast.data import generate_arrays, MultiObjectDataset
    arrays = generate_arrays("multi-dsprites", n=256, seed=0)         # numpy, nothing on disk
    ds = MultiObjectDataset.from_arrays(arrays)

On disk (bit-packed, memory-mapped .npy files plus meta.json)::

    python -m lavae_fast.data generate --dataset multi-dsprites --out data/multi-dsprites
    ds = MultiObjectDataset("data/multi-dsprites", "train")
    x, counts = ds.get_batch(range(64))                                  # [64, 3, 64, 64] float32

Your own images (a folder of PNG / JPEG, a .npy / .npz array, an HDF5 file) as a set::

    python -m lavae_fast.data import scenes/ --labels scenes/labels.csv --out data/scenes
    ds = MultiObjectDataset("data/scenes", "train")                     # splits train, val, test
    ds.labelled, ds.values                                               # True, "binary" or "grey"

A training run's split, as the trainer, the evaluation and the figures read it::

    ds = load_run_split({"dataset": "multi-dsprites", "canvas": 48, "n_test": 256}, "test")

See :mod:`.registry` (the data sets: channels, sprite size, location-net learning rate),
:mod:`.importer` (importing images), :mod:`.analysis` (the background checks, the objects' extents
and the suggested sprite size), :mod:`.shapes` (random-shape scenes as PNGs),
:mod:`.runs` (a run's splits), :mod:`.generator` (generation and seeding), :mod:`.placement` (the no-overlap rule),
:mod:`.storage` (file format), :mod:`.mnist` and :mod:`.dsprites` (the sprites).
"""

from .dataset import MultiObjectDataset
from .generator import CHUNK, SPLITS, SpriteTable, generate, generate_arrays, parse_canvas, sprite_table
from .importer import ImportDataError, import_images
from .mnist import MnistFormatError, MnistNotFoundError, load_mnist_train
from .placement import PlacementError
from .registry import DATASETS, DataSetInfo
from .runs import check_data_fits, data_identity, generate_split, load_run_split, run_data_fingerprint
from .shapes import draw_scenes, write_scene_folder
from .storage import DataFormatError, load_split, read_meta

__all__ = [
    "DATASETS",
    "DataSetInfo",
    "SPLITS",
    "CHUNK",
    "MultiObjectDataset",
    "SpriteTable",
    "generate",
    "generate_arrays",
    "import_images",
    "ImportDataError",
    "draw_scenes",
    "write_scene_folder",
    "sprite_table",
    "parse_canvas",
    "load_mnist_train",
    "load_split",
    "load_run_split", "generate_split",
    "check_data_fits",
    "read_meta",
    "PlacementError",
    "DataFormatError",
    "MnistNotFoundError",
    "MnistFormatError",
]
