"""ControlNets per tile (gigadiff.backends.control): one tile equal to diffusers' ControlNet pipelines of SD and
SDXL (scale, and a start/end window of the schedule); on a tiled canvas each tile's ControlNet sees the crop of
the control image under its window; a control image split in two colours paints two different halves; refusals
before any weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from gigadiff.api import generate_result, open_backend
from gigadiff.backends.control import parse_control
from gigadiff.cli import app
from gigadiff.errors import GigadiffError
from tests.helpers.families import CASES, PROMPT, SIZE, STEPS

FOLDERS = {"sd": "tiny_sd_dir", "sdxl": "tiny_sdxl_dir"}


def saved_acting(controlnet, parameters, out, seed: int = 0, scale: float = 0.05):
    """`controlnet` saved to `out` after its zero-initialised `parameters` (which make a fresh net act as none) are
    given seeded normal weights times `scale`, in order, so that it acts and its image matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(parameters):
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    controlnet.save_pretrained(str(out))
    return out


def tiny_controlnet(folder, out, seed: int = 0):
    """A ControlNet made from the model's UNet (as diffusers' `from_unet` does), its zero convolutions (the image
    embedding's last one among them) given seeded weights so that it acts and its image matters, saved as a
    diffusers folder."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    blocks = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
              controlnet.controlnet_cond_embedding.conv_out]  # fmt: skip
    return saved_acting(controlnet, (p for block in blocks for p in block.parameters()), out, seed)


def tiny_union_controlnet(folder, out, seed: int = 0):
    """A union ControlNet (SDXL's ControlNetUnionModel) made from the tiny SDXL UNet, its task transformer as wide as
    the UNet's first block, its zero-initialised layers given seeded weights."""
    from diffusers import ControlNetUnionModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    made = ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    width = unet.config.block_out_channels[0]
    torch.manual_seed(seed)
    config = {k: v for k, v in made.config.items() if k != "_use_default_values"}  # else the widths stay defaults
    controlnet = ControlNetUnionModel.from_config({**config, "num_trans_channel": width, "num_proj_channel": width,
                                                   "num_trans_head": 2})  # fmt: skip
    mine = controlnet.state_dict()
    controlnet.load_state_dict({k: v for k, v in made.state_dict().items() if mine[k].shape == v.shape},
                               strict=False)  # fmt: skip
    return saved_acting(controlnet, [p for p in controlnet.parameters() if not p.any()], out, seed)


def control_image(path, width: int = SIZE, height: int = SIZE, split: bool = False):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    if split:
        pixels[:, : width // 2] = (220, 30, 30)
        pixels[:, width // 2 :] = (30, 30, 220)
    Image.fromarray(pixels).save(path)
    return path


def diffusers_latents(family, folder, net, image, scale, start, end, **extra):
    import diffusers
    from diffusers import ControlNetModel, DiffusionPipeline

    base = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    cls = (
        diffusers.StableDiffusionControlNetPipeline if family == "sd" else diffusers.StableDiffusionXLControlNetPipeline
    )
    pipe = cls(**base.components, controlnet=ControlNetModel.from_pretrained(str(net)))
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, image=Image.open(image), height=SIZE, width=SIZE, num_inference_steps=STEPS,
                controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end,
                output_type="latent", generator=torch.Generator("cpu").manual_seed(3),
                **CASES[family].theirs, **extra).images.float()  # fmt: skip


@pytest.mark.parametrize(("scale", "start", "end"), [(0.8, 0.0, 1.0), (1.2, 0.3, 0.7)], ids=["whole", "window"])
@pytest.mark.parametrize("family", list(FOLDERS))
def test_one_tile_equals_the_controlnet_pipeline(family, scale, start, end, request, tmp_path):
    folder = request.getfixturevalue(FOLDERS[family])
    net = tiny_controlnet(folder, tmp_path / "net")
    image = control_image(tmp_path / "edges.png")
    spec = f"{net}={image}:{scale}:{start}:{end}"
    backend = open_backend(str(folder), "cpu", controlnets=(str(net),))
    got = generate_result(PROMPT, model=backend, size=f"{SIZE}x{SIZE}", steps=STEPS, seed=3, control=[spec],
                          **CASES[family].ours)  # fmt: skip
    theirs = diffusers_latents(family, folder, net, image, scale, start, end)
    assert (got.latents - theirs).abs().max() <= 1e-4 * max(1.0, float(theirs.abs().max()))
    plain = generate_result(PROMPT, model=backend, size=f"{SIZE}x{SIZE}", steps=STEPS, seed=3, **CASES[family].ours)
    assert not torch.equal(got.latents, plain.latents)  # the ControlNet acted


@pytest.mark.parametrize("family", list(FOLDERS))
def test_guess_mode_equals_the_pipelines_guess_mode(family, request, tmp_path):
    """--guess-mode: the ControlNet sees the prompted pass only (the other gets no residual) and its residuals
    are scaled up from the shallowest block, as the pipelines' guess_mode; with a tiled batch of both passes."""
    folder = request.getfixturevalue(FOLDERS[family])
    net = tiny_controlnet(folder, tmp_path / "net")
    image = control_image(tmp_path / "edges.png")
    backend = open_backend(str(folder), "cpu", controlnets=(str(net),))
    run = {"size": f"{SIZE}x{SIZE}", "steps": STEPS, "seed": 3, "control": [f"{net}={image}:0.9"], **CASES[family].ours}
    got = generate_result(PROMPT, model=backend, guess_mode=True, **run).latents
    theirs = diffusers_latents(family, folder, net, image, 0.9, 0.0, 1.0, guess_mode=True)
    assert (got - theirs).abs().max() <= 1e-4 * max(1.0, float(theirs.abs().max()))
    plain = generate_result(PROMPT, model=backend, **run).latents
    assert (plain - theirs).abs().max() > 1e-2, "guess mode changed nothing: the test shows nothing"


def test_guess_mode_is_refused_without_a_controlnet_or_where_no_pipeline_has_it(tiny_flux_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["generate", "x", "--guess-mode", "--device", "cpu"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "--guess-mode changes how ControlNets act: give a --control" in said
    image = control_image(tmp_path / "edges.png")
    result = CliRunner().invoke(app, ["generate", "x", "--model", str(tiny_flux_dir), "--guess-mode", "--control",
                                      f"net={image}", "--device", "cpu"])  # fmt: skip
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "--guess-mode is SD's and SDXL's ControlNet pipelines' option" in said


def test_a_union_controlnet_equals_the_sdxl_union_pipeline_with_its_mode(tiny_sdxl_dir, tmp_path):
    """MODEL#MODE: the union net told the kind of its image, as StableDiffusionXLControlNetUnionPipeline's
    control_mode; another mode paints another image."""
    from diffusers import ControlNetUnionModel, DiffusionPipeline, StableDiffusionXLControlNetUnionPipeline

    net = tiny_union_controlnet(tiny_sdxl_dir, tmp_path / "union")
    image = control_image(tmp_path / "edges.png")
    backend = open_backend(str(tiny_sdxl_dir), "cpu", controlnets=(f"{net}#3",))
    run = {"size": f"{SIZE}x{SIZE}", "steps": STEPS, "seed": 3, **CASES["sdxl"].ours}
    got = generate_result(PROMPT, model=backend, control=[f"{net}#3={image}:0.9"], **run).latents
    base = DiffusionPipeline.from_pretrained(str(tiny_sdxl_dir), local_files_only=True)
    pipe = StableDiffusionXLControlNetUnionPipeline(
        **base.components, controlnet=ControlNetUnionModel.from_pretrained(str(net))
    )
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, control_image=[Image.open(image)], control_mode=[3], height=SIZE, width=SIZE,
                  num_inference_steps=STEPS, controlnet_conditioning_scale=0.9, output_type="latent",
                  generator=torch.Generator("cpu").manual_seed(3), **CASES["sdxl"].theirs).images.float()  # fmt: skip
    assert (got - theirs).abs().max() <= 1e-4 * max(1.0, float(theirs.abs().max()))
    other = generate_result(PROMPT, model=backend, control=[f"{net}#1={image}:0.9"], **run).latents
    assert (other - got).abs().max() > 1e-3, "the mode changed nothing: the test shows nothing"


def test_a_union_controlnet_needs_its_mode_and_a_plain_one_takes_none(tiny_sdxl_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    union = tiny_union_controlnet(tiny_sdxl_dir, tmp_path / "union")
    plain = tiny_controlnet(tiny_sdxl_dir, tmp_path / "plain")
    image = control_image(tmp_path / "edges.png")
    for control, message in [(f"{union}={image}", "is a union ControlNet of 6 control types: name the kind"),
                             (f"{union}#6={image}", "MODE from 0 to 5 (#6 given)"),
                             (f"{plain}#2={image}", "is not a union ControlNet: it takes no #MODE")]:  # fmt: skip
        result = CliRunner().invoke(app, ["generate", "x", "--model", str(tiny_sdxl_dir), "--control", control,
                                          "--device", "cpu"])  # fmt: skip
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and message in said, said
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["edges.png"], "nothing was written"


def test_a_mode_is_refused_where_no_union_controlnet_runs(tiny_sd_dir, tmp_path, monkeypatch):
    """A hub id's #MODE (its config unread before loading) on a family without union ControlNets."""
    monkeypatch.chdir(tmp_path)
    image = control_image(tmp_path / "edges.png")
    result = CliRunner().invoke(app, ["generate", "x", "--model", str(tiny_sd_dir), "--control",
                                      f"someone/union-net#2={image}", "--device", "cpu"])  # fmt: skip
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "#MODE is for union ControlNets, which run on SDXL and FLUX.1 only" in said, said


def test_each_tile_sees_the_crop_of_the_control_image_under_its_window(tiny_sd_dir, tmp_path):
    net = tiny_controlnet(tiny_sd_dir, tmp_path / "net")
    image = control_image(tmp_path / "edges.png", 512, 256)
    backend = open_backend(str(tiny_sd_dir), "cpu", controlnets=(str(net),))
    seen = []
    controlnet = backend.controlnets[str(net)]
    controlnet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["controlnet_cond"].clone()),
                                         with_kwargs=True)  # fmt: skip
    generate_result(PROMPT, model=backend, size="512x256", steps=1, seed=3, tile=256, overlap=128, shift=False,
                    tile_batch=1, control=[f"{net}={image}"], **CASES["sd"].ours)  # fmt: skip
    canvas = torch.from_numpy(np.asarray(Image.open(image), dtype=np.float32) / 255).permute(2, 0, 1)
    assert len(seen) == 3  # three 256-px windows with 128 px of overlap, one per call
    for x, crop in zip((0, 128, 256), seen, strict=True):
        expected = canvas[:, :, x : x + 256]
        assert torch.allclose(crop[0], expected, atol=1 / 255), f"the tile at x={x} saw another part of the image"
        assert torch.equal(crop[1], crop[0])  # both guidance passes see the same crop


def test_a_two_colour_control_image_paints_each_half_as_its_colour_does(tiny_sd_dir, tmp_path):
    """Left red, right blue: the left half comes out as under an all-red image, the right as under an all-blue one
    (each tile's ControlNet sees only its crop), not as one image's average."""
    net = tiny_controlnet(tiny_sd_dir, tmp_path / "net")
    backend = open_backend(str(tiny_sd_dir), "cpu", controlnets=(str(net),))
    run = {"size": "512x256", "steps": 2, "seed": 3, "tile": 256, "overlap": 64, "shift": False, **CASES["sd"].ours}

    def painted(colours):
        pixels = np.zeros((256, 512, 3), dtype=np.uint8)
        pixels[:, :256], pixels[:, 256:] = colours
        path = tmp_path / f"{colours[0]}-{colours[1]}.png"
        Image.fromarray(pixels).save(path)
        return generate_result(PROMPT, model=backend, control=[f"{net}={path}:2"], **run).latents

    red, blue = (220, 30, 30), (30, 30, 220)
    split, all_red, all_blue = painted((red, blue)), painted((red, red)), painted((blue, blue))
    left, right = (slice(None), slice(None), slice(None), slice(0, 24)), (Ellipsis, slice(40, 64))
    assert (split[left] - all_red[left]).abs().mean() < 0.25 * (split[left] - all_blue[left]).abs().mean()
    assert (split[right] - all_blue[right]).abs().mean() < 0.25 * (split[right] - all_red[right]).abs().mean()


@pytest.mark.parametrize(
    ("text", "message"),
    [("net", "must be MODEL\\[#MODE\\]=IMAGE"), ("net=a.png:1:0.8:0.2", "START < END"),
     ("net=a.png:1:0.5", "SCALE:START:END"), ("net=a.png:30", "SCALE must lie in"),
     ("net#99=a.png", "MODE 99 is not a union ControlNet's control type")],
)  # fmt: skip
def test_a_malformed_control_is_refused(text, message):
    with pytest.raises(GigadiffError, match=message):
        parse_control(text)


def test_a_control_path_with_colons_keeps_them():
    spec = parse_control("C:/nets/canny=D:/images/edges.png:0.5:0.1:0.9")
    assert (spec.model, spec.image) == ("C:/nets/canny", "D:/images/edges.png")
    assert (spec.scale, spec.start, spec.end) == (0.5, 0.1, 0.9)


def test_controlnets_are_refused_before_the_weights_where_they_do_not_run(tiny_pixart_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image = control_image(tmp_path / "edges.png")
    result = CliRunner().invoke(app, ["generate", "x", "--model", str(tiny_pixart_dir), "--control",
                                      f"net={image}", "--device", "cpu"])  # fmt: skip
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "on SD, SDXL, SD3, FLUX.1, Qwen-Image, SANA and Z-Image so far" in said
    result = CliRunner().invoke(app, ["generate", "x", "--control", "net=absent.png", "--device", "cpu"])
    assert result.exit_code == 2 and "--control image absent.png does not exist" in " ".join(result.output.split())


def test_upscale_holds_a_tile_controlnet_to_its_own_image(tiny_sd_dir, tmp_path):
    from gigadiff.options import RunRequest
    from gigadiff.runs.resolve import resolve

    photo = control_image(tmp_path / "photo.png", 128, 128)
    request = RunRequest(model=str(tiny_sd_dir), init=str(photo), control=["tile-net:0.6", f"canny={photo}"],
                         device="cpu")  # fmt: skip
    run = resolve(request, "upscale", writes=False)
    assert run.settings.control == [f"tile-net={photo}:0.6", f"canny={photo}"]


def test_metrics_says_which_controlnets_made_an_image(tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = tiny_controlnet(tiny_sd_dir, tmp_path / "canny")
    image = control_image(tmp_path / "edges.png", 128, 128)
    args = ["--size", "128x128", "--steps", "1", "--device", "cpu", "--control", f"{net}={image}:0.7:0:0.5"]
    made = CliRunner().invoke(app, ["generate", "x", "--model", str(tiny_sd_dir), *args, "-o", "a.png", "-q"])
    assert made.exit_code == 0, made.output
    report = CliRunner().invoke(app, ["metrics", "a.png"])
    assert "ControlNets canny x0.7 (0-0.5)" in report.output


def test_residuals_of_several_controlnets_add_block_by_block():
    """As diffusers' multi-ControlNets sum them: lists per block, single tensors, and Z-Image's blocks by index."""
    from gigadiff.backends.control import summed_residuals

    one, two = torch.ones(2), torch.full((2,), 2.0)
    assert summed_residuals(None, None) is None
    assert [r.tolist() for r in summed_residuals(summed_residuals(None, (one, two)), [two, one])] == [[3, 3], [3, 3]]
    assert summed_residuals(one, two).tolist() == [3, 3]
    merged = summed_residuals(summed_residuals(None, {0: one, 2: two}), {2: one, 5: one})
    assert {k: v.tolist() for k, v in merged.items()} == {0: [1, 1], 2: [3, 3], 5: [1, 1]}
