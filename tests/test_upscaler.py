"""Super-resolution networks before the repaint (gigadiff.backends.upscaler): tiles with ramped overlaps give the
whole image's output; `upscale --upscaler` starts the repaint from the network's output; files that are not such
networks, or a missing spandrel, are refused before the model's weights load; with spandrel installed (not on the
development machines: its torchvision has no CPU build for torch 2.13 on PyPI), an ESRGAN made from its
architecture is recognised from its file.

Without spandrel the network is a small sub-pixel convolution net wrapped as spandrel's descriptors are (a
callable with `.model` and `.scale`), which is all the tiling and the repaint use of them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from gigadiff.backends.upscaler import load_upscaler, upscale_tiled, upscaled_init
from gigadiff.cli import app


class Descriptor:
    """What gigadiff uses of spandrel's ImageModelDescriptor: the network, its scale, a call on [0, 1] images."""

    def __init__(self, model: torch.nn.Module, scale: int):
        self.model, self.scale = model.eval(), scale

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)


def sub_pixel_net(scale: int = 4) -> Descriptor:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.LeakyReLU(0.2),
                              torch.nn.Conv2d(16, 3 * scale * scale, 3, padding=1), torch.nn.PixelShuffle(scale),
                              torch.nn.Sigmoid())  # fmt: skip
    return Descriptor(net, scale)


@pytest.fixture
def esrgan(tmp_path, monkeypatch):
    """A network file and a loader that gives the sub-pixel net for it (spandrel's part, see the docstring)."""
    path = tmp_path / "4x-tiny.pth"
    torch.save({"weights": torch.zeros(1)}, path)
    monkeypatch.setattr("gigadiff.backends.upscaler.load_upscaler", lambda file, device: sub_pixel_net())
    return path


def test_spandrel_recognises_an_esrgan_and_its_scale(tmp_path):
    spandrel_esrgan = pytest.importorskip("spandrel.architectures.ESRGAN")
    torch.manual_seed(0)
    path = tmp_path / "4x-tiny-esrgan.pth"
    torch.save(spandrel_esrgan.ESRGAN(num_filters=8, num_blocks=1, scale=4).state_dict(), path)
    model = load_upscaler(str(path), "cpu")
    assert type(model.model).__name__ == "RRDBNet" and model.scale == 4


def test_tiles_give_the_whole_images_output():
    model = sub_pixel_net()
    image = torch.rand(1, 3, 48, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(image).float().clamp(0, 1)
    assert torch.equal(upscale_tiled(model, image, tile=1000), whole)  # one tile is the network's own output
    tiled = upscale_tiled(model, image, tile=32, overlap=8)
    assert tiled.shape == whole.shape == (1, 3, 192, 320)
    assert (tiled - whole).abs().max() < 1e-5  # the net's reach (2 px) lies inside the 8-px overlap


def test_the_init_is_the_networks_output_resized_to_the_canvas(esrgan, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(photo)
    init = upscaled_init(str(photo), str(esrgan), 120, 80, "cpu")
    assert init.shape == (1, 3, 80, 120) and init.min() >= -1 and init.max() <= 1
    from gigadiff.io.images import load_resized

    assert not torch.allclose(init, load_resized(photo, 120, 80), atol=0.05)  # not a plain resize


def test_upscale_repaints_from_the_upscalers_output(esrgan, tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photo)
    args = ["upscale", str(photo), "--model", str(tiny_sd_dir), "--scale", "2", "--steps", "3", "--seed", "1",
            "--device", "cpu", "-q"]  # fmt: skip
    plain = CliRunner().invoke(app, [*args, "-o", "plain.png"])
    upscaled = CliRunner().invoke(app, [*args, "--upscaler", str(esrgan), "-o", "sr.png"])
    assert plain.exit_code == 0 and upscaled.exit_code == 0, upscaled.output
    assert Image.open("sr.png").size == (128, 128)
    assert not np.array_equal(np.asarray(Image.open("sr.png")), np.asarray(Image.open("plain.png")))
    assert json.loads((tmp_path / "sr.json").read_text())["upscaler"] == str(esrgan)
    assert (tmp_path / "plain.json").is_file()


def test_files_that_are_not_upscalers_are_refused_before_the_models_weights(tiny_sd_dir, tmp_path, monkeypatch):
    import diffusers

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64)).save("photo.png")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "notes.pth")

    def refused(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refused)
    try:
        import spandrel  # noqa: F401

        unreadable = "is not a network spandrel knows"
    except Exception:
        unreadable = "needs spandrel and a torchvision that matches your torch"
    for upscaler, message in (("notes.pth", unreadable), ("absent.pth", "does not exist"),
                              ("photo.png", "must be a .pth/.pt/.safetensors/.ckpt file")):  # fmt: skip
        result = CliRunner().invoke(app, ["upscale", "photo.png", "--model", str(tiny_sd_dir), "--device", "cpu",
                                          "--upscaler", upscaler])  # fmt: skip
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split())
