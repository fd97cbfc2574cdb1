"""The figure helpers: manipulations keep what they should, and the CLI writes every figure."""

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
        assert make(model, lat).size[0] > 0
        with pytest.raises(ValueError, match="objects"):
            make(model, empty)


def test_cli_writes_figures(tmp_path):
    from lavae_fast.train import main as train_main

    run = tmp_path / "run"
    train_main(["--dataset", "multi-mnist-1k", "--canvas", "32", "--n-train", "64", "--n-test", "8",
                "--n-test7", "4", "--steps", "2", "--batch-size", "4", "--width", "8", "--out", str(run),
                "--no-progress"])
    assert figures.main([str(run), "--num", "4"]) == 0
    for name in ("reconstructions_test.png", "reconstructions_test7.png", "samples.png"):
        assert (run / "figures" / name).stat().st_size > 0
