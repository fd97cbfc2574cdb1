"""The figure helpers: manipulations keep what they should, every figure is labelled with the
paper's figure number, and the CLI writes every figure (from a run, a checkpoint file or a name)."""

import json

import numpy as np
import pytest
import torch

from lavae_fast import figures
from lavae_fast.model import LAVAE, Latents


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LAVAE(channels=1, canvas=(24, 24), sprite_size=5, width=8, sprite_width=40).eval()


def _scene(model):
    # Two objects far apart (no overlap of their 5×5 sprites) with different appearances.
    z = torch.zeros(1, model.max_objects, model.latent_size)
    z[0, 0] = torch.linspace(-2, 2, model.latent_size)
    z[0, 1] = -torch.linspace(-2, 2, model.latent_size)
    index = torch.full((1, model.max_objects), -1)
    index[0, 0], index[0, 1] = 5 * 24 + 5, 18 * 24 + 17
    return Latents(n=torch.tensor([2]), index=index, z_app=z, canvas=(24, 24))


def _patch(img, r, c):
    return img[0, r - 2 : r + 3, c - 2 : c + 3]


def test_reverse_locations_moves_each_appearance_to_the_other_place(model):
    lat = _scene(model)
    before, after = model.decode(lat)[0], model.decode(figures.reverse_locations(lat))[0]
    assert not torch.allclose(_patch(before, 5, 5), _patch(before, 18, 17))
    torch.testing.assert_close(_patch(after, 18, 17), _patch(before, 5, 5))
    torch.testing.assert_close(_patch(after, 5, 5), _patch(before, 18, 17))


def test_tile_lays_out_rows_and_columns():
    imgs = [[torch.rand(1, 6, 5) for _ in range(3)] for _ in range(2)]
    img = np.asarray(figures.tile(imgs, gap=1, upscale=2))
    assert img.shape == (2 * (12 + 1) + 1, 3 * (10 + 1) + 1, 3)
    # The first cell holds the first image, zoomed by 2 (grey levels rounded to uint8).
    expected = (imgs[0][0][0].repeat_interleave(2, 0).repeat_interleave(2, 1) * 255 + 0.5).to(torch.uint8)
    assert np.array_equal(img[1:13, 1:11, 0], expected.numpy())


def test_manipulation_figures_need_objects(model):
    lat = _scene(model)
    empty = Latents(n=torch.tensor([0]), index=torch.full_like(lat.index, -1), z_app=lat.z_app, canvas=lat.canvas)
    for make in (figures.swap_figure, figures.location_traversal_figure, figures.appearance_traversal_figure):
        assert make(model, lat).axes  # a labelled matplotlib figure (see test_every_figure_is_labelled)
        with pytest.raises(ValueError, match="objects"):
            make(model, empty)


def test_paper_figure_numbers():
    # The paper: Fig. 1 / 5 inference (multi-MNIST-10k / multi-dSprites), Fig. 2 / 4 / 10 prior samples
    # (10k / dSprites / 1k), Fig. 3 / 6–7 / 8 / 11 disentanglement, Fig. 9 p(n) uniform over {4, 5}.
    ref = figures.paper_ref
    assert ref("inference", "multi-mnist-10k") == "paper Fig. 1"
    assert ref("inference", "multi-dsprites") == "paper Fig. 5"
    assert ref("inference", "multi-mnist-1k") == "as paper Fig. 1 on multi-MNIST-10k"
    assert [ref("prior", d) for d in ("multi-mnist-10k", "multi-dsprites", "multi-mnist-1k")] == [
        "paper Fig. 2", "paper Fig. 4", "paper Fig. 10"]
    assert ref("swap/test", "multi-dsprites") == "paper Fig. 6"
    assert ref("location/test", "multi-dsprites") == "paper Fig. 7 left"
    assert ref("appearance/test", "multi-mnist-10k") == "paper Fig. 3 bottom right"
    assert ref("location/test7", "multi-mnist-10k") == "paper Fig. 8 top"
    assert ref("swap/test7", "multi-mnist-1k") == "paper Fig. 11 top left"
    assert ref("fixed_count", "multi-dsprites") == "paper Fig. 9"


def _texts(fig):
    return " | ".join(" ".join(t.split()) for t in figures.figure_texts(fig))  # wrapped lines joined


def test_every_figure_is_labelled(model, tmp_path):
    """What the reader sees: the title with the paper's figure, a label on every row and column.
    (This reads matplotlib's text objects, which are drawn; it cannot judge the pixels' layout —
    that was checked by eye on a trained run.)"""
    from PIL import Image

    lat = _scene(model)
    x = model.decode(lat).bernoulli()
    made = {
        "inference": figures.reconstruction_figure(model, x, [2], dataset="multi-mnist-10k", split="test"),
        "samples": figures.sample_figure(model, 6, baseline=_baseline(), per_row=3, dataset="multi-dsprites"),
        "swap": figures.swap_figure(model, lat, dataset="multi-dsprites", split="test"),
        "location": figures.location_traversal_figure(model, lat, steps=4, dataset="multi-mnist-10k", split="test7"),
        "appearance": figures.appearance_traversal_figure(model, lat, steps=5, dataset="multi-mnist-1k",
                                                          split="test7"),
        "fixed": figures.fixed_count_figure(model, 6, per_row=3, dataset="multi-dsprites"),
    }
    expect = {
        "inference": ["paper Fig. 1", "input", "reconstruction", "inferred locations", "image 1", "true n = 2"],
        "samples": ["paper Fig. 4", "LAVAE", "β-VAE baseline", "samples 1–3", "samples 4–6", "p(n)"],
        "swap": ["paper Fig. 6", "reconstruction", "objects 1 and 2", "scene 1 (n̂ = 2)"],
        "location": ["paper Fig. 8 top", "7-object", "column 0", "column 23", "object 1 on row 5"],
        "appearance": ["paper Fig. 11 bottom", "z_app dimension 0", "z_app dimension 2", "value -2.00",
                       "value +2.00"],
        "fixed": ["paper Fig. 9", "uniform distribution over {4, 5}", "samples 1–3"],
    }
    for key, fig in made.items():
        text = _texts(fig)
        for want in expect[key]:
            assert want in text, (key, want, text)
        path = tmp_path / f"{key}.png"
        figures.save_figure(fig, str(path))
        img = Image.open(path)
        # Saved at its own size (no cropping): figure inches × DPI.
        w, h = fig.get_size_inches() * figures.DPI
        assert img.size == (round(w), round(h)), key
        assert "paper Fig." in img.text["Title"] and img.text["Description"] == " | ".join(figures.figure_texts(fig))
    # The inference figure has a column per inferred object's sprite; the traversals one per step.
    k = int(model.infer(x).n[0])  # whatever this untrained model infers
    assert len(made["inference"].axes) == 3 + k
    assert sum(f"sprite {i + 1} (5×5" in _texts(made["inference"]) for i in range(k)) == k
    assert len(made["location"].axes) == 1 * 4 and len(made["appearance"].axes) == 3 * 5
    # The swap figure marks objects 1 and 2 where they are, and where they went.
    marks = [(t.get_text(), t.get_position()) for t in made["swap"].axes[0].texts + made["swap"].axes[1].texts]
    assert ("1", (5, 5)) in marks and ("2", (17, 18)) in marks and ("1", (17, 18)) in marks
    # The fixed-count figure draws only 4 or 5 objects.
    corners = [t.get_text() for ax in made["fixed"].axes for t in ax.texts if t.get_text().startswith("n=")]
    assert set(corners) <= {"n=4", "n=5"} and len(corners) == 6


def _baseline():
    from lavae_fast import BetaVAE

    return BetaVAE(channels=1, canvas=(24, 24), width=8).eval()


def test_training_curves_read_the_runs_metrics(tmp_path):
    recs = [{"step": 10, "count_acc": 0.2, "recon": 50.0, "kl_app": 5.0, "kl_n": 1.0, "kl_loc": 2.0},
            {"step": 20, "eval": {"test": {"count_accuracy": 0.5, "neg_elbo": {"mean": 40.0, "sem": 1.0}},
                                  "test7": {"count_accuracy": 0.25, "neg_elbo": {"mean": 90.0, "sem": 1.0}}}},
            {"step": 20, "count_acc": 0.4, "recon": 30.0, "kl_app": 4.0, "kl_n": 1.0, "kl_loc": 2.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + '\n{"step": 30, "count')  # a torn last line
    records = figures.read_metrics(str(path))
    assert len(records) == 3
    fig = figures.training_curves_figure(records, dataset="multi-dsprites")
    acc, bound = fig.axes
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in acc.get_lines()}
    assert lines["training batches"] == ([10, 20], [0.2, 0.4])
    assert lines["evaluation, 0–3-object test images"] == ([20], [0.5])
    blines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in bound.get_lines()}
    assert blines["training batches, −ELBO (1 sample)"] == ([10, 20], [58.0, 37.0])  # recon + the three KLs
    assert blines["evaluation −ELBO, test7"] == ([20], [90.0])
    text = _texts(fig)
    assert "training step" in text and "count accuracy" in text and "not a paper figure" in text


def test_cli_writes_figures(tmp_path):
    from PIL import Image

    from lavae_fast.train import main as train_main

    run = tmp_path / "run"
    train_main(["--dataset", "multi-mnist-1k", "--canvas", "32", "--n-train", "64", "--n-test", "8",
                "--n-test7", "4", "--steps", "2", "--batch-size", "4", "--width", "8", "--out", str(run),
                "--no-progress", "--log-every", "1"])
    base = tmp_path / "base"
    train_main(["--model", "baseline", "--dataset", "multi-mnist-1k", "--canvas", "32", "--n-train", "64",
                "--n-test", "8", "--n-test7", "4", "--steps", "1", "--batch-size", "4", "--width", "8",
                "--out", str(base), "--no-progress"])
    assert figures.main([str(run), "--num", "4", "--baseline", str(base)]) == 0
    out = run / "figures"
    titles = {}
    for name in ("reconstructions_test.png", "reconstructions_test7.png", "samples.png", "fixed_count.png",
                 "training_curves.png"):
        img = Image.open(out / name)
        titles[name] = img.text["Title"]
        px = np.asarray(img.convert("L"))
        assert px.std() > 10, name  # not a blank image
    # Sizes follow the grid: 4 images per row, 2 rows of samples (+ the baseline's block beside them).
    w, h = figures.grid_size(2, 4 + 1 + 4, titles["samples.png"].replace("\n", " "))
    assert Image.open(out / "samples.png").size == (round(w * figures.DPI), round(h * figures.DPI))
    assert Image.open(out / "reconstructions_test.png").size[1] > 4 * figures.CELL * figures.DPI  # 4 image rows
    assert "paper Fig." in titles["reconstructions_test.png"] and "multi-MNIST-1k" in titles["samples.png"]
    assert "β-VAE baseline" in Image.open(out / "samples.png").text["Description"]
    assert "paper Fig. 10" in titles["samples.png"] and "paper Fig. 9" in titles["fixed_count.png"]
    assert "7-object" in titles["reconstructions_test7.png"]


def test_cli_on_a_checkpoint_file_and_a_name(tmp_path, monkeypatch, capsys):
    from lavae_fast import pretrained
    from lavae_fast.pretrained import shipping
    from lavae_fast.train import main as train_main

    run = tmp_path / "run"
    train_main(["--dataset", "multi-mnist-1k", "--canvas", "32", "--n-train", "64", "--n-test", "8",
                "--n-test7", "4", "--steps", "1", "--batch-size", "4", "--width", "8", "--out", str(run),
                "--no-progress"])
    assert figures.main([str(run / "checkpoint.pt"), "--num", "2"]) == 0
    assert (run / "figures" / "samples.png").stat().st_size > 0
    monkeypatch.setattr(pretrained, "HERE", str(tmp_path))
    with pytest.raises(SystemExit, match="not shipped"):
        figures.main(["multi-dsprites", "--out", str(tmp_path / "f")])
    shipping.export(str(run), name="multi-mnist-10k", no_metrics=True)
    with pytest.raises(SystemExit, match="give --out"):
        figures.main(["multi-mnist-10k"])
    # A shipped model has no data with it: test images of its data set are drawn in memory.
    assert figures.main(["multi-mnist-10k", "--out", str(tmp_path / "f"), "--num", "2"]) == 0
    assert (tmp_path / "f" / "reconstructions_test.png").stat().st_size > 0
    assert "skipped training_curves.png" in capsys.readouterr().err
