"""Importing your own images (issue 26): `python -m lavae_fast.data import`, the checks of the model's
assumptions, the suggested sprite size, the random-shape scenes, and every bad input refused with a
clear error and nothing half-written."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lavae_fast import data
from lavae_fast.data import analysis, importer, shapes, storage
from lavae_fast.data.__main__ import main as cli_main


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _scenes(folder, n=40, canvas=32, size=8, colours="saturated", seed=0, counts=(0, 3)):
    """A folder of n random-shape PNGs and its labels.csv; returns the drawn scenes."""
    os.makedirs(folder, exist_ok=True)
    sc = shapes.draw_scenes(n, canvas, size, counts, colours, seed)
    names = [f"s{i:03d}.png" for i in range(n)]
    for name, img in zip(names, sc["images"]):
        Image.fromarray(img).save(os.path.join(folder, name))
    with open(os.path.join(folder, "labels.csv"), "w") as f:
        f.write(shapes._labels_csv(names, sc["counts"], sc["centres"]))
    sc["names"] = names
    return sc


def _cli(argv, capsys):
    rc = cli_main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _import(src, out, *args, capsys):
    return _cli(["import", str(src), "--out", str(out), "--no-progress", *args], capsys)


def _pixels(root):
    """{source index: uint8 [C, H, W] stored levels} over every split of an imported set."""
    got = {}
    for split in ("train", "val", "test"):
        ds = data.MultiObjectDataset(root, split)
        if len(ds):
            x, _ = ds.get_batch(np.arange(len(ds)))
            for i, img in zip(ds.source_index, (x * 255).round().to(torch.uint8).numpy()):
                got[int(i)] = img
    return got


def _assert_nothing_written(out):
    assert not os.path.exists(out) or not os.listdir(out), os.listdir(out)
    parent = os.path.dirname(os.path.abspath(out))
    assert not [n for n in os.listdir(parent) if ".new-" in n or ".tmp-" in n]


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("colours", ["saturated", "hue"])
def test_png_round_trip_is_bit_identical(tmp_path, capsys, colours):
    sc = _scenes(tmp_path / "src", n=30, colours=colours)
    out = tmp_path / "set"
    rc, stdout, err = _import(tmp_path / "src", out, "--labels", str(tmp_path / "src" / "labels.csv"), capsys=capsys)
    assert rc == 0, err
    meta = storage.read_meta(out)
    assert meta["format"] == storage.FORMAT_IMPORTED and meta["annotations"] == "centres"
    assert meta["values"] == ("binary" if colours == "saturated" else "grey")
    assert meta["bitpacked"] == (colours == "saturated")
    got = _pixels(out)
    assert sorted(got) == list(range(30))  # the splits partition the source
    for i in range(30):
        np.testing.assert_array_equal(got[i], sc["images"][i].transpose(2, 0, 1))
    # Labels follow their images through the shuffle.
    for split in ("train", "val", "test"):
        ds = data.MultiObjectDataset(out, split, verify=True)
        assert ds.labelled and ds.has_centres
        src = ds.source_index
        np.testing.assert_array_equal(ds.counts, sc["counts"][src])
        k = ds.centres.shape[1]
        np.testing.assert_array_equal(ds.centres, sc["centres"][src][:, :k])
        assert (ds.boxes == -1).all()
        x, counts = ds.get_batch(np.arange(len(ds)))
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and 0 <= x.min() and x.max() <= 1
        assert counts.dtype == torch.int64
    names = np.load(out / "source_names.npy")
    assert list(names) == sc["names"]


def test_arbitrary_levels_round_trip_grey_and_colour(tmp_path, capsys):
    # Every byte value 0..255, in L and RGB images: what is imported comes back bit for bit (the
    # noise is no scene: the background check is off).
    rng = np.random.default_rng(1)
    for mode, shape in (("L", (12, 10)), ("RGB", (12, 10, 3))):
        src = tmp_path / mode
        src.mkdir()
        imgs = rng.integers(0, 256, size=(20, *shape), dtype=np.uint8)
        imgs[0].flat[:256] = np.arange(256)
        for i, a in enumerate(imgs):
            Image.fromarray(a, mode).save(src / f"{i:02d}.png")
        out = tmp_path / f"set{mode}"
        rc, _, err = _import(src, out, "--no-background-check", "--split", "0.5,0.25,0.25", capsys=capsys)
        assert rc == 0, err
        got = _pixels(out)
        for i in range(20):
            want = imgs[i][None] if mode == "L" else imgs[i].transpose(2, 0, 1)
            np.testing.assert_array_equal(got[i], want)
        assert storage.read_meta(out)["channels"] == (1 if mode == "L" else 3)


def test_unlabelled_and_counts_only_sets(tmp_path, capsys):
    sc = _scenes(tmp_path / "src", n=24)
    rc, _, err = _import(tmp_path / "src", tmp_path / "u", capsys=capsys)
    # labels.csv lies among the images: without --labels it is a stray file.
    assert rc == 1 and "labels.csv" in err and "--labels" in err
    os.rename(tmp_path / "src" / "labels.csv", tmp_path / "labels.csv")
    rc, _, err = _import(tmp_path / "src", tmp_path / "u", capsys=capsys)
    assert rc == 0, err
    ds = data.MultiObjectDataset(tmp_path / "u", "train")
    assert not ds.labelled and not ds.has_centres and ds.centres.shape == (len(ds), 0, 2)
    assert (ds.counts == -1).all() and (ds.get_batch([0, 1])[1] == -1).all()
    assert storage.read_meta(tmp_path / "u")["annotations"] == "none"
    # Counts only: no coordinates in the CSV.
    lines = ["file,count"] + [f"{n},{k}" for n, k in zip(sc["names"], sc["counts"])]
    (tmp_path / "counts.csv").write_text("\n".join(lines) + "\n")
    rc, _, err = _import(tmp_path / "src", tmp_path / "c", "--labels", str(tmp_path / "counts.csv"), capsys=capsys)
    assert rc == 0, err
    ds = data.MultiObjectDataset(tmp_path / "c", "train")
    assert ds.labelled and not ds.has_centres and (ds.centres == -1).all()
    np.testing.assert_array_equal(ds.counts, sc["counts"][ds.source_index])
    # stats and grid read both.
    for root in ("u", "c"):
        rc, stdout, err = _cli(["stats", str(tmp_path / root)], capsys)
        assert rc == 0 and "suggested sprite size S = 9" in stdout, err
        rc, _, err = _cli(["grid", str(tmp_path / root), "--out", str(tmp_path / f"{root}.png"), "--rows", "1",
                           "--cols", "2"], capsys)
        assert rc == 0, err


def test_splits_seeded_and_fingerprinted(tmp_path, capsys):
    _scenes(tmp_path / "src", n=50)
    lab = str(tmp_path / "src" / "labels.csv")
    metas = []
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        rc, _, err = _import(tmp_path / "src", tmp_path / name, "--labels", lab, "--seed", seed, "--split",
                             "0.6,0.2,0.2", capsys=capsys)
        assert rc == 0, err
        metas.append(storage.read_meta(tmp_path / name))
    a, b, c = metas
    assert {s: i["n"] for s, i in a["splits"].items()} == {"train": 30, "val": 10, "test": 10}
    assert a["split"] == {"seed": 3, "fractions": [0.6, 0.2, 0.2], "sizes": {"train": 30, "val": 10, "test": 10}}
    assert storage.fingerprint(a) == storage.fingerprint(b) != storage.fingerprint(c)
    # The run's validation split is the set's own (its first n_val images).
    val = data.load_run_split({"data": str(tmp_path / "a"), "n_val": 4}, "val")
    assert len(val) == 4 and val.split == "val"
    np.testing.assert_array_equal(val.source_index, data.MultiObjectDataset(tmp_path / "a", "val").source_index[:4])
    with pytest.raises(data.DataFormatError, match="test7"):
        data.load_run_split({"data": str(tmp_path / "a")}, "test7")


def test_replacing_a_set_is_all_or_nothing(tmp_path, capsys):
    _scenes(tmp_path / "src", n=30)
    lab = str(tmp_path / "src" / "labels.csv")
    out = tmp_path / "set"
    assert _import(tmp_path / "src", out, "--labels", lab, capsys=capsys)[0] == 0
    before = storage.fingerprint(storage.read_meta(out))
    rc, _, err = _import(tmp_path / "src", out, "--labels", lab, capsys=capsys)
    assert rc == 1 and "--overwrite" in err
    # A failure half-way through the replacement (a corrupt image read after others were written)
    # leaves the old set as it was.
    (tmp_path / "src" / "s029.png").write_bytes((tmp_path / "src" / "s029.png").read_bytes()[:60])
    rc, _, err = _import(tmp_path / "src", out, "--labels", lab, "--overwrite", "--seed", "1", capsys=capsys)
    assert rc == 1 and "s029.png" in err and "truncated" in err
    assert storage.fingerprint(storage.read_meta(out)) == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".set.")]


def test_interrupted_import_leaves_nothing(tmp_path, monkeypatch):
    _scenes(tmp_path / "src", n=20)
    calls = {"n": 0}
    real = importer._FolderSource.read

    def read(self, i):
        calls["n"] += 1
        if calls["n"] == 10:  # after the probe's 5, during the whole pass
            raise KeyboardInterrupt
        return real(self, i)

    monkeypatch.setattr(importer, "PROBE", 5)
    monkeypatch.setattr(importer._FolderSource, "read", read)
    with pytest.raises(KeyboardInterrupt):
        data.import_images(tmp_path / "src", tmp_path / "set", labels=str(tmp_path / "src" / "labels.csv"),
                           progress=False)
    _assert_nothing_written(tmp_path / "set")


# ---------------------------------------------------------------------------------------------
# Conversions: 16-bit, palette, alpha, channels, sizes, JPEG, threshold, invert


def test_sixteen_bit_png(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    a = np.zeros((4, 16, 16), np.uint16)
    a[:, 4:9, 4:9] = np.array([65535, 32768, 1000, 257])[:, None, None]
    for i, img in enumerate(a):
        Image.fromarray(img).save(src / f"{i}.png")
    assert Image.open(src / "0.png").mode.startswith("I")
    rc, _, err = _import(src, tmp_path / "set", "--split", "0.5,0.25,0.25", capsys=capsys)
    assert rc == 0, err
    got = _pixels(tmp_path / "set")
    for i in range(4):
        np.testing.assert_array_equal(got[i][0], np.rint(a[i] / 65535 * 255).astype(np.uint8))
    meta = storage.read_meta(tmp_path / "set")
    assert meta["values"] == "grey" and meta["conversion"]["sixteen_bit_images"] == 4
    # 0 / 65535 only: binary, stored bit-packed.
    for i, img in enumerate(a):
        Image.fromarray(np.where(img == 65535, img, 0).astype(np.uint16)).save(src / f"{i}.png")
    rc, _, err = _import(src, tmp_path / "bin", "--split", "0.5,0.25,0.25", capsys=capsys)
    assert rc == 0 and storage.read_meta(tmp_path / "bin")["values"] == "binary", err


def test_palette_png_reads_through_its_palette(tmp_path, capsys):
    sc = shapes.draw_scenes(6, 24, 6, (1, 2), "saturated", 0)
    src = tmp_path / "src"
    src.mkdir()
    for i, img in enumerate(sc["images"]):
        Image.fromarray(img).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(src / f"{i}.png")
    assert Image.open(src / "0.png").mode == "P"
    rc, _, err = _import(src, tmp_path / "set", "--split", "0.5,0.25,0.25", capsys=capsys)
    assert rc == 0, err
    got = _pixels(tmp_path / "set")
    for i in range(6):
        np.testing.assert_array_equal(got[i], sc["images"][i].transpose(2, 0, 1))
    assert storage.read_meta(tmp_path / "set")["values"] == "binary"


def test_rgba_alpha_makes_transparent_pixels_background(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    a = np.zeros((4, 16, 16, 4), np.uint8)
    a[..., :3] = 255  # white everywhere, visible only where alpha says
    a[:, 4:10, 4:10, 3] = 255
    a[:, 4:10, 4:10, 0] = 100  # the object: (100, 255, 255)
    a[:, 0, 0, 3] = 128  # one half-transparent white pixel
    for i, img in enumerate(a):
        Image.fromarray(img, "RGBA").save(src / f"{i}.png")
    for flag, name in (([], "plain"), (["--invert"], "inv")):
        rc, _, err = _import(src, tmp_path / name, "--split", "0.5,0.25,0.25", *flag, capsys=capsys)
        assert rc == 0, err
        got = _pixels(tmp_path / name)[0]
        assert (got[:, 12:, 12:] == 0).all()  # transparent: empty background, with --invert too
        if not flag:
            assert tuple(got[:, 5, 5]) == (100, 255, 255) and tuple(got[:, 0, 0]) == (128, 128, 128)
        else:
            assert tuple(got[:, 5, 5]) == (155, 0, 0) and tuple(got[:, 0, 0]) == (0, 0, 0)
        meta = storage.read_meta(tmp_path / name)
        assert meta["conversion"]["alpha_images"] == 4 and "transparent" in meta["conversion"]["alpha"]


def test_grey_and_colour_mixed(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    grey = np.zeros((16, 16), np.uint8)
    grey[4:9, 4:9] = 200
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[4:9, 4:9] = (255, 0, 0)
    for i in range(4):
        Image.fromarray(grey).save(src / f"a{i}.png")
    Image.fromarray(rgb).save(src / "b.png")
    rc, _, err = _import(src, tmp_path / "set", capsys=capsys)
    assert rc == 1 and "grey and colour" in err and "'b.png' is colour (RGB)" in err and "--channels" in err
    _assert_nothing_written(tmp_path / "set")
    rc, _, err = _import(src, tmp_path / "c3", "--channels", "3", "--split", "0.6,0.2,0.2", capsys=capsys)
    assert rc == 0, err
    got = _pixels(tmp_path / "c3")
    assert tuple(got[0][:, 5, 5]) == (200, 200, 200) and tuple(got[4][:, 5, 5]) == (255, 0, 0)
    rc, _, err = _import(src, tmp_path / "c1", "--channels", "1", "--split", "0.6,0.2,0.2", capsys=capsys)
    assert rc == 0, err
    got = _pixels(tmp_path / "c1")
    assert got[4].shape == (1, 16, 16) and got[4][0, 5, 5] == round(0.299 * 255) and got[0][0, 5, 5] == 200


def test_sizes_differ_refused_unless_crop_or_resize(tmp_path, capsys):
    src = tmp_path / "src"
    sc = _scenes(src, n=8, canvas=24, size=6)
    os.remove(src / "labels.csv")
    big = np.zeros((30, 28, 3), np.uint8)
    big[10:16, 10:16] = 255
    Image.fromarray(big).save(src / "s005.png")
    rc, _, err = _import(src, tmp_path / "set", capsys=capsys)
    assert rc == 1 and "'s005.png' is 30×28 (H×W)" in err and "'s000.png'" in err and "--resize" in err
    _assert_nothing_written(tmp_path / "set")
    rc, _, err = _import(src, tmp_path / "crop", "--crop", "24x24", "--split", "0.5,0.25,0.25", capsys=capsys)
    assert rc == 0, err
    got = _pixels(tmp_path / "crop")
    np.testing.assert_array_equal(got[0], sc["images"][0].transpose(2, 0, 1))
    np.testing.assert_array_equal(got[5], big[3:27, 2:26].transpose(2, 0, 1))
    rc, _, err = _import(src, tmp_path / "rs", "--resize", "16", "--split", "0.5,0.25,0.25", capsys=capsys)
    assert rc == 0, err
    meta = storage.read_meta(tmp_path / "rs")
    assert (meta["height"], meta["width"], meta["values"]) == (16, 16, "grey")
    rc, _, err = _import(src, tmp_path / "small", "--crop", "26x26", capsys=capsys)
    assert rc == 1 and "only 24×24" in err


def test_labels_follow_crop_and_resize(tmp_path, capsys):
    src = tmp_path / "src"
    sc = _scenes(src, n=12, canvas=24, size=4, counts=(1, 2))
    os.rename(src / "labels.csv", tmp_path / "labels.csv")
    lab = str(tmp_path / "labels.csv")
    rc, _, err = _import(src, tmp_path / "up", "--labels", lab, "--resize", "48", "--split", "0.5,0.25,0.25",
                         capsys=capsys)
    assert rc == 0, err
    ds = data.MultiObjectDataset(tmp_path / "up", "train")
    want = sc["centres"][ds.source_index][:, : ds.centres.shape[1]]
    present = want[..., 0] >= 0
    # Pixel r of 24 covers [2r, 2r + 2) of 48: its centre point 2r + 1 lands in pixel 2r + 1.
    np.testing.assert_array_equal(ds.centres[present], 2 * want[present] + 1)
    # A crop shifts the centres, and refuses one it cuts away.
    rows = [f"s{i:03d}.png,1,{8 + i % 3},{9 + i % 2}" for i in range(12)]
    (tmp_path / "mid.csv").write_text("\n".join(rows) + "\n")
    rc, _, err = _import(src, tmp_path / "crop", "--labels", str(tmp_path / "mid.csv"), "--crop", "16x20",
                         "--no-background-check", "--split", "0.5,0.25,0.25", capsys=capsys)
    assert rc == 0, err
    ds = data.MultiObjectDataset(tmp_path / "crop", "train")
    i = ds.source_index
    np.testing.assert_array_equal(ds.centres[:, 0], np.stack([8 + i % 3 - 4, 9 + i % 2 - 2], axis=1))
    (tmp_path / "edge.csv").write_text("\n".join(rows[:11] + ["s011.png,1,1,1"]) + "\n")
    rc, _, err = _import(src, tmp_path / "edge", "--labels", str(tmp_path / "edge.csv"), "--crop", "16x20",
                         capsys=capsys)
    assert rc == 1 and "edge.csv:12" in err and "falls outside the 16×20 crop" in err


def test_jpeg_threshold_and_invert(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    sc = shapes.draw_scenes(10, 32, 8, (1, 2), "saturated", 3)
    for i, img in enumerate(sc["images"]):
        Image.fromarray(255 - img.max(axis=2)).save(src / f"{i}.jpg", quality=95)  # dark shapes on white
    rc, _, err = _import(src, tmp_path / "set", "--split", "0.6,0.2,0.2", capsys=capsys)
    assert rc == 1 and "bright" in err and "--invert" in err
    _assert_nothing_written(tmp_path / "set")
    rc, _, err = _import(src, tmp_path / "grey", "--invert", "--split", "0.6,0.2,0.2", capsys=capsys)
    assert rc == 0, err
    assert storage.read_meta(tmp_path / "grey")["values"] == "grey"  # JPEG: not exactly 0 and 255
    rc, _, err = _import(src, tmp_path / "bin", "--invert", "--threshold", "0.5", "--split", "0.6,0.2,0.2",
                         capsys=capsys)
    assert rc == 0, err
    meta = storage.read_meta(tmp_path / "bin")
    assert meta["values"] == "binary" and meta["conversion"]["threshold"] == 0.5 and meta["conversion"]["invert"]
    got = _pixels(tmp_path / "bin")
    for i in range(10):
        np.testing.assert_array_equal(got[i][0] // 255, sc["images"][i].max(axis=2) > 0)


# ---------------------------------------------------------------------------------------------
# Arrays and HDF5


def test_npz_with_label_keys_and_npy(tmp_path, capsys):
    sc = shapes.draw_scenes(20, 24, 6, (0, 3), "hue", 2)
    x = sc["images"].astype(np.float32) / 255  # NHWC floats in [0, 1]
    np.savez(tmp_path / "a.npz", images=x, counts=sc["counts"], centres=sc["centres"])
    rc, _, err = _import(tmp_path / "a.npz", tmp_path / "set", "--split", "0.5,0.25,0.25", capsys=capsys)
    assert rc == 0, err
    meta = storage.read_meta(tmp_path / "set")
    assert meta["annotations"] == "centres" and meta["source"]["layout"] == "NHWC"
    got = _pixels(tmp_path / "set")
    ds = data.MultiObjectDataset(tmp_path / "set", "train")
    np.testing.assert_array_equal(ds.counts, sc["counts"][ds.source_index])
    for i in range(20):
        np.testing.assert_array_equal(got[i], sc["images"][i].transpose(2, 0, 1))
    # .npy NCHW, binary uint8 {0, 1}... as bool; labels by index in a CSV.
    np.save(tmp_path / "b.npy", sc["images"].transpose(0, 3, 1, 2) > 0)
    (tmp_path / "b.csv").write_text("".join(f"{i},{k}\n" for i, k in enumerate(sc["counts"])))
    rc, _, err = _import(tmp_path / "b.npy", tmp_path / "b", "--labels", str(tmp_path / "b.csv"), "--split",
                         "0.5,0.25,0.25", capsys=capsys)
    assert rc == 0, err
    meta = storage.read_meta(tmp_path / "b")
    assert meta["values"] == "binary" and meta["source"]["layout"] == "NCHW" and meta["annotations"] == "counts"
    # [N, 3, H, 3] could be either layout.
    np.save(tmp_path / "amb.npy", np.zeros((4, 3, 5, 3), np.uint8))
    rc, _, err = _import(tmp_path / "amb.npy", tmp_path / "amb", capsys=capsys)
    assert rc == 1 and "--layout" in err


@pytest.mark.parametrize("value,needle", [(np.nan, "nan at row 2, col 3"), (1.5, "the value 1.5 at row 2, col 3"),
                                          (-0.25, "the value -0.25")])
def test_bad_array_values(tmp_path, capsys, value, needle):
    x = np.zeros((8, 6, 6), np.float32)
    x[5, 2, 3] = value
    np.save(tmp_path / "x.npy", x)
    rc, _, err = _import(tmp_path / "x.npy", tmp_path / "set", "--no-background-check", "--split", "0.5,0.25,0.25",
                         capsys=capsys)
    assert rc == 1 and "image 5" in err and needle in err and "Traceback" not in err, err
    _assert_nothing_written(tmp_path / "set")


def test_integer_arrays_other_than_bytes_must_be_binary(tmp_path, capsys):
    x = np.zeros((8, 6, 6), np.int64)
    x[3, 1, 1] = 7
    np.save(tmp_path / "x.npy", x)
    rc, _, err = _import(tmp_path / "x.npy", tmp_path / "set", "--split", "0.5,0.25,0.25", capsys=capsys)
    assert rc == 1 and "image 3 has the value 7" in err and "uint8" in err


def test_hdf5_without_h5py_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    (tmp_path / "x.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    monkeypatch.setitem(sys.modules, "h5py", None)
    rc, _, err = _import(tmp_path / "x.h5", tmp_path / "set", capsys=capsys)
    assert rc == 1 and "pip install h5py" in err
    _assert_nothing_written(tmp_path / "set")


def test_hdf5_source(tmp_path, capsys):
    h5py = pytest.importorskip("h5py")
    sc = shapes.draw_scenes(12, 16, 4, (0, 2), "saturated", 1)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["data/images"] = sc["images"]
        f["data/n"] = sc["counts"]
    rc, _, err = _import(tmp_path / "x.h5", tmp_path / "set", "--images-key", "data/images", "--counts-key", "data/n",
                         "--split", "0.5,0.25,0.25", capsys=capsys)
    assert rc == 0, err
    got = _pixels(tmp_path / "set")
    for i in range(12):
        np.testing.assert_array_equal(got[i], sc["images"][i].transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------
# Bad folders and label files: each a clear error, nothing written


def _bad_folder(tmp_path, case):
    src = tmp_path / "src"
    _scenes(src, n=12, canvas=16, size=4)
    os.remove(src / "labels.csv")
    png = src / "s003.png"
    if case == "empty":
        for n in os.listdir(src):
            os.remove(src / n)
    elif case == "truncated":
        png.write_bytes(png.read_bytes()[:70])
    elif case == "corrupt":
        b = bytearray(png.read_bytes())
        b[50:60] = b"\xff" * 10
        png.write_bytes(bytes(b))
    elif case == "not an image":
        png.write_bytes(b"this is text, not a PNG\n" * 10)
    elif case == "stray file":
        (src / "notes.txt").write_text("hello")
    elif case == "sub-folder":
        (src / "more").mkdir()
    elif case == "gif":
        Image.new("P", (16, 16)).save(src / "s003.png", format="GIF")
    return src


@pytest.mark.parametrize("case,needle", [
    ("empty", "holds no PNG or JPEG images"),
    ("truncated", "s003.png"),
    ("corrupt", "s003.png"),
    ("not an image", "s003.png is not an image"),
    ("stray file", "notes.txt is not a PNG or JPEG"),
    ("sub-folder", "more is a folder"),
    ("gif", "s003.png is a GIF image"),
])
def test_bad_folders(tmp_path, capsys, case, needle):
    src = _bad_folder(tmp_path, case)
    rc, _, err = _import(src, tmp_path / "set", capsys=capsys)
    assert rc == 1 and needle in err and "Traceback" not in err, err
    _assert_nothing_written(tmp_path / "set")


@pytest.mark.parametrize("edit,needle", [
    (lambda rows: rows + ["ghost.png,1,3,3"], "'ghost.png' is not an image file"),
    (lambda rows: rows[:1] + ["s000.png,two"] + rows[2:], "the count 'two' is not a whole number"),
    (lambda rows: rows[:1] + ["s000.png,-1"] + rows[2:], "the count '-1'"),
    (lambda rows: rows[:1] + ["s000.png,2,3,3,5"] + rows[2:], "2 object(s) need 4 coordinates"),
    (lambda rows: rows[:1] + ["s000.png,1,3,x"] + rows[2:], "the coordinate 'x' is not a number"),
    (lambda rows: rows[:1] + ["s000.png"] + rows[2:], "expected file,count"),
    (lambda rows: rows + [rows[1]], "labelled twice"),
    (lambda rows: rows[:-1], "has no row for 1 of the 12 images"),
    (lambda rows: rows[:1] + ["s000.png,1,3,40"] + rows[2:], "lies outside the 16×16 image"),
    (lambda rows: rows[:1] + ["s000.png,1"] + ["s001.png,1,5,5"] + rows[3:], "gives no coordinates"),
])
def test_bad_label_files(tmp_path, capsys, edit, needle):
    src = tmp_path / "src"
    sc = _scenes(src, n=12, canvas=16, size=4, counts=(1, 1))
    rows = (src / "labels.csv").read_text().splitlines()
    os.remove(src / "labels.csv")
    (tmp_path / "l.csv").write_text("\n".join(edit(rows)) + "\n")
    rc, _, err = _import(src, tmp_path / "set", "--labels", str(tmp_path / "l.csv"), capsys=capsys)
    assert rc == 1 and needle in err and "Traceback" not in err, err
    assert "l.csv" in err  # the file (and line) named
    _assert_nothing_written(tmp_path / "set")
    assert sc["counts"].sum() == 12


def test_missing_label_file_and_too_small_set(tmp_path, capsys):
    src = tmp_path / "src"
    _scenes(src, n=5, canvas=16, size=4)
    rc, _, err = _import(src, tmp_path / "set", "--labels", str(tmp_path / "none.csv"), capsys=capsys)
    assert rc == 1 and "none.csv does not exist" in err
    os.remove(src / "labels.csv")
    rc, _, err = _import(src, tmp_path / "set", capsys=capsys)
    assert rc == 1 and "5 image(s) are too few" in err and "at least 6" in err and "--split" in err
    _assert_nothing_written(tmp_path / "set")
    rc, _, err = _import(src, tmp_path / "set", "--split", "0.6,0.2,0.2", capsys=capsys)
    assert rc == 0, err


@pytest.mark.parametrize("argv,needle", [
    (["--split", "0.8,0.3,0.1"], "sum to 1"),
    (["--split", "a,b,c"], "TRAIN,VAL,TEST"),
    (["--threshold", "1.5"], "[0, 1]"),
    (["--sprite-size", "8"], "odd"),
    (["--max-objects", "0"], "positive"),
    (["--channels", "2"], "invalid choice"),
    (["--resize", "8", "--crop", "8"], "not allowed with"),
])
def test_import_argument_errors(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        cli_main(["import", str(tmp_path), "--out", str(tmp_path / "o"), *argv])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The model's assumptions: background, clutter, objects per image, sprite size


def test_bright_background_refused_and_inverted(tmp_path, capsys):
    src = tmp_path / "src"
    sc = _scenes(src, n=20, canvas=24, size=6)
    os.remove(src / "labels.csv")
    for i, img in enumerate(sc["images"]):
        Image.fromarray(255 - img).save(src / sc["names"][i])
    rc, _, err = _import(src, tmp_path / "set", capsys=capsys)
    assert rc == 1 and "bright" in err and "--invert" in err and "dark, empty background" in err
    _assert_nothing_written(tmp_path / "set")
    rc, _, err = _import(src, tmp_path / "set", "--invert", capsys=capsys)
    assert rc == 0, err
    got = _pixels(tmp_path / "set")
    np.testing.assert_array_equal(got[3], sc["images"][3].transpose(2, 0, 1))
    # Inverting a dark set makes it bright: the message says to drop --invert.
    for i, img in enumerate(sc["images"]):
        Image.fromarray(img).save(src / sc["names"][i])
    rc, _, err = _import(src, tmp_path / "x", "--invert", capsys=capsys)
    assert rc == 1 and "drop --invert" in err


def test_grey_noise_and_clutter_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(20):
        Image.fromarray(rng.integers(60, 120, (24, 24), dtype=np.uint8)).save(grey / f"{i}.png")
    rc, _, err = _import(grey, tmp_path / "g", capsys=capsys)
    assert rc == 1 and "not dark" in err and "--threshold" in err and "--no-background-check" in err
    speck = tmp_path / "speck"
    speck.mkdir()
    for i in range(20):
        a = np.zeros((32, 32), np.uint8)
        a[::3, ::3] = 255 * (rng.random((11, 11)) < 0.6)  # ~70 isolated specks
        Image.fromarray(a).save(speck / f"{i}.png")
    rc, _, err = _import(speck, tmp_path / "s", capsys=capsys)
    assert rc == 1 and "busy" in err and "--max-objects" in err
    rc, _, err = _import(speck, tmp_path / "s", "--max-objects", "30", capsys=capsys)
    assert rc == 0, err
    assert storage.read_meta(tmp_path / "s")["max_objects"] == 30
    framed = tmp_path / "frame"
    framed.mkdir()
    for i in range(20):
        a = np.zeros((32, 32), np.uint8)
        a[0, :] = a[-1, :] = a[:, 0] = a[:, -1] = 255
        a[10:15, 10:15] = 255
        Image.fromarray(a).save(framed / f"{i}.png")
    rc, _, err = _import(framed, tmp_path / "f", capsys=capsys)
    assert rc == 1 and "all four edges" in err
    rc, _, err = _import(framed, tmp_path / "f", "--no-background-check", capsys=capsys)
    assert rc == 0 and "warning" in err
    assert not os.path.exists(tmp_path / "g")


def test_a_few_odd_images_are_tolerated_and_named(tmp_path, capsys):
    src = tmp_path / "src"
    sc = _scenes(src, n=300, canvas=16, size=4)
    os.remove(src / "labels.csv")
    Image.fromarray(255 - sc["images"][7]).save(src / sc["names"][7])  # one bright image in 300
    rc, _, err = _import(src, tmp_path / "set", capsys=capsys)
    assert rc == 0 and "warning" in err and "s007.png" in err and "1 of 300" in err
    assert any("s007.png" in w for w in storage.read_meta(tmp_path / "set")["warnings"])


def test_more_objects_than_m(tmp_path, capsys):
    src = tmp_path / "src"
    _scenes(src, n=12, canvas=48, size=4, counts=(3, 12))
    lab = str(src / "labels.csv")
    rc, _, err = _import(src, tmp_path / "set", "--labels", lab, capsys=capsys)
    assert rc == 1 and "more than --max-objects 10" in err and "--max-objects 12" in err and "labels.csv:" in err
    _assert_nothing_written(tmp_path / "set")
    rc, _, err = _import(src, tmp_path / "set", "--labels", lab, "--max-objects", "12", capsys=capsys)
    assert rc == 0, err
    assert storage.read_meta(tmp_path / "set")["max_objects"] == 12


@pytest.mark.parametrize("canvas,size", [(32, 8), (64, 16), (48, 7), (64, 11), (40, 5)])
def test_suggested_sprite_size_within_two_pixels_of_the_shapes(tmp_path, capsys, canvas, size):
    src = tmp_path / "src"
    _scenes(src, n=60, canvas=canvas, size=size, colours="hue")
    os.remove(src / "labels.csv")
    rc, _, err = _import(src, tmp_path / "set", capsys=capsys)
    assert rc == 0, err
    meta = storage.read_meta(tmp_path / "set")
    s = meta["sprite_size"]
    assert s % 2 == 1 and abs(s - size) <= 2 and meta["sprite_size_origin"] == "suggested"
    rc, stdout, _ = _cli(["stats", str(tmp_path / "set"), "--json"], capsys)
    st = json.loads(stdout)
    assert st["objects"]["suggestion"]["sprite_size"] == s and st["objects"]["suggestion"]["extent_p95"] == size
    # A given size is recorded as given.
    rc, _, err = _import(src, tmp_path / "given", "--sprite-size", str(s + 2), capsys=capsys)
    meta = storage.read_meta(tmp_path / "given")
    assert rc == 0 and meta["sprite_size"] == s + 2 and meta["sprite_size_origin"] == "given"


def test_stats_suggests_sprite_size_for_generated_sets(tmp_path):
    root = str(tmp_path / "ds")
    data.generate("multi-dsprites", root, n_train=200, n_test=0, n_test7=0, progress=False)
    from lavae_fast.data.__main__ import object_stats

    ob = object_stats(root, 200)
    # dSprites' ink spans 11 to 19 px (scale 0.6 to 1), 95% of it at most 17: S = 19, two under the
    # paper's 21 (which leaves a pixel of slack around the 19-pixel patch).
    assert ob["suggestion"]["sprite_size"] == 19 and ob["suggestion"]["extent_max"] == 19
    assert ob["label_agreement"] > 0.9


# ---------------------------------------------------------------------------------------------
# The pieces


def test_components_match_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for p in (0.05, 0.3, 0.55, 0.9):
        ink = rng.random((30, 23, 19)) < p
        labels, image = analysis.label_components(ink)
        for i in range(len(ink)):
            ref, n = ndimage.label(ink[i], structure=np.ones((3, 3)))
            ours = labels[i][ink[i]]
            assert (image == i).sum() == n
            assert len(set(zip(ref[ink[i]].tolist(), ours.tolist()))) == n  # the same partition
            assert set(ours.tolist()) == set(np.flatnonzero(image == i).tolist())
    labels, image = analysis.label_components(np.zeros((2, 4, 4), bool))
    assert (labels == -1).all() and image.shape == (0,)


def test_find_objects_extents_at_half_maximum():
    img = np.zeros((1, 1, 20, 20), np.uint8)
    img[0, 0, 5:12, 3:8] = 200
    img[0, 0, 4, 3:8] = 60  # a faint, anti-aliased edge: ink, but below half the peak
    ob = analysis.find_objects(img)
    assert ob["per_image"].tolist() == [1]
    assert (ob["height"][0], ob["width"][0], ob["pixels"][0]) == (7, 5, 40)
    # Extent 7 (odd): the next odd side up, with a pixel of margin on each side.
    assert analysis.suggest_sprite_size(ob, (20, 20))["sprite_size"] == 9
    assert analysis.suggest_sprite_size(ob, (6, 8))["sprite_size"] == 5  # capped by the canvas
    speck = np.zeros((1, 1, 8, 8), np.uint8)
    speck[0, 0, 3, 3] = 255
    assert analysis.suggest_sprite_size(analysis.find_objects(speck), (8, 8)) is None  # a speck is no object


def test_shapes_cli_and_folder(tmp_path, capsys):
    out = tmp_path / "scenes"
    rc, stdout, err = _cli(["shapes", "--out", str(out), "--n", "12", "--canvas", "32", "--size", "8",
                            "--no-progress"], capsys)
    assert rc == 0, err
    names = sorted(os.listdir(out))
    assert names[-1] == "scene_00011.png" and "labels.csv" in names and len(names) == 13
    rows = (out / "labels.csv").read_text().splitlines()
    assert rows[0].startswith("file,count") and len(rows) == 13
    rc, _, err = _cli(["shapes", "--out", str(out), "--n", "3", "--no-progress"], capsys)
    assert rc == 1 and "not empty" in err
    (out / "mine.txt").write_text("x")
    rc, _, err = _cli(["shapes", "--out", str(out), "--n", "3", "--overwrite", "--no-progress"], capsys)
    assert rc == 1 and "other than PNGs" in err and (out / "mine.txt").exists()
    rc, _, err = _cli(["shapes", "--out", str(tmp_path / "x"), "--n", "3", "--canvas", "8", "--size", "8",
                       "--min-objects", "2", "--no-progress"], capsys)
    assert rc == 1 and "cannot fit" in err and not os.path.exists(tmp_path / "x")
    for kind in shapes.SHAPES:
        for size in (3, 8, 9):
            m = shapes.shape_mask(kind, size)  # the ink touches all four sides: its extent is the size
            assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()


def test_end_to_end_three_commands(tmp_path, capsys):
    scenes, root = tmp_path / "scenes", tmp_path / "set"
    assert _cli(["shapes", "--out", str(scenes), "--n", "200", "--canvas", "32", "--size", "8", "--no-progress"],
                capsys)[0] == 0
    rc, stdout, err = _import(scenes, root, "--labels", str(scenes / "labels.csv"), capsys=capsys)
    assert rc == 0 and "sprite size 9 (suggested)" in stdout, err
    rc, stdout, err = _cli(["stats", str(root), "--verify"], capsys)
    assert rc == 0 and "suggested sprite size S = 9" in stdout and "100.0%" in stdout, err
    ds = data.MultiObjectDataset(root, "train", verify=True)
    x, counts = ds.get_batch(np.arange(16))
    assert x.shape == (16, 3, 32, 32) and set(np.unique(x.numpy())) <= {0.0, 1.0}
    assert counts.min() >= 0 and counts.max() <= 3


def test_generated_sets_keep_format_one(tmp_path):
    root = str(tmp_path / "g")
    data.generate("multi-dsprites", root, n_train=8, n_test=4, n_test7=0, progress=False)
    meta = storage.read_meta(root)
    assert meta["format"] == storage.FORMAT and meta["bitpacked"] is True and "annotations" not in meta
    ds = data.MultiObjectDataset(root, "train")
    assert ds.labelled and ds.has_centres and ds.values == "binary" and ds.source_index is None
    # A format this loader does not know is refused by name.
    path = os.path.join(root, "meta.json")
    m = json.load(open(path))
    m["format"] = "lavae_fast.data/3"
    m.pop("meta_sha256")
    json.dump(m, open(path, "w"))
    with pytest.raises(data.DataFormatError, match="lavae_fast.data/3"):
        storage.read_meta(root)


def test_out_inside_the_source_is_refused(tmp_path, capsys):
    src = tmp_path / "src"
    _scenes(src, n=12, canvas=16, size=4)
    rc, _, err = _import(src, src / "set", capsys=capsys)
    assert rc == 1 and "inside the source folder" in err
    assert not os.path.exists(src / "set")


def test_import_benchmark_runs(tmp_path):
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, os.path.join(root, "bench", "import_speed.py"), "--n", "60", "--canvas",
                           "32", "--tmp", str(tmp_path), "--json", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["n"] == 60 and res["import_best_s"] > 0 and res["suggested_sprite_size"] == 9
    assert [p.name for p in tmp_path.iterdir()] == ["speed.json"]  # the scenes and the set are removed


def test_max_objects_limit_matches_the_ops():
    from lavae_fast import model, ops

    assert importer.MAX_OBJECTS_LIMIT == ops.MAX_OBJECTS and importer.MAX_SPRITE_SIZE == model.MAX_SPRITE_SIZE
