"""ControlNets of the DiTs per tile (FLUX.1, Qwen-Image, SD3, SANA, Z-Image): one tile equal to
FluxControlNetPipeline, with an InstantX-style net (the control image VAE-encoded, sampled with the run's generator
before the noise) and an XLabs-style one (the pixels through its hint block, residuals repeated over the blocks), to
QwenImageControlNetPipeline (with true CFG: its nets see the prompt in both passes), to
StableDiffusion3ControlNetPipeline (InstantX-style, shifted and SD3.5 Large-style nets, tile and global positions),
and to SanaControlNetPipeline and ZImageControlNetPipeline, in fp32 and bf16, with a scale and a start/end window;
on a tiled canvas each tile's net sees the crop of the encoded image under its window; a ControlNet of another
family is refused before any weights load."""

from __future__ import annotations

import itertools

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from gigadiff.api import generate_result, open_backend
from gigadiff.backends.flow import unpack
from gigadiff.cli import app
from tests.helpers.families import CASES, PROMPT, SIZE, STEPS
from tests.test_control import control_image, saved_acting, tiny_controlnet


def tiny_flux_controlnet(folder, out, hint: bool = False, seed: int = 0, modes: int | None = None):
    """A ControlNet of the tiny FLUX.1 transformer (its first blocks' weights, as diffusers' `from_transformer`
    takes them), its zero-initialised layers given seeded weights so that it acts; `hint`: XLabs-style, with a
    hint block that reads the control image's pixels; `modes`: a union net of that many kinds of image (InstantX's
    union layout: a seeded mode embedding prepended to the prompt)."""
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(str(folder), subfolder="transformer")
    c = transformer.config
    controlnet = FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1,
                                                      attention_head_dim=c.attention_head_dim,
                                                      num_attention_heads=c.num_attention_heads)  # fmt: skip
    if hint:  # the same network with a hint block before its embedder
        weights = controlnet.state_dict()
        controlnet = FluxControlNetModel.from_config({**controlnet.config, "conditioning_embedding_channels": 16})
        controlnet.load_state_dict(weights, strict=False)
    if modes:  # the same network with a mode embedding (its config's defaults not restored: num_mode is one)
        weights = controlnet.state_dict()
        config = {k: v for k, v in controlnet.config.items() if not k.startswith("_")}
        torch.manual_seed(seed)
        controlnet = FluxControlNetModel.from_config({**config, "num_mode": modes})
        controlnet.load_state_dict(weights, strict=False)
    blocks = [*controlnet.controlnet_blocks, *controlnet.controlnet_single_blocks, controlnet.controlnet_x_embedder]
    return saved_acting(controlnet, (p for block in blocks for p in block.parameters()), out, seed)


def tiny_qwen_controlnet(folder, out, seed: int = 0):
    """A ControlNet of the tiny Qwen-Image transformer (as `from_transformer` makes one), its zero-initialised
    layers given seeded weights."""
    from diffusers import QwenImageControlNetModel, QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_pretrained(str(folder), subfolder="transformer")
    c = transformer.config
    controlnet = QwenImageControlNetModel.from_transformer(transformer, num_layers=1,
                                                           attention_head_dim=c.attention_head_dim,
                                                           num_attention_heads=c.num_attention_heads)  # fmt: skip
    blocks = [*controlnet.controlnet_blocks, controlnet.controlnet_x_embedder]
    return saved_acting(controlnet, (p for block in blocks for p in block.parameters()), out, seed)


def tiny_sd3_controlnet(folder, out, style: str = "instantx", seed: int = 0):
    """A ControlNet of the tiny SD3 transformer, its zero-initialised layers given seeded weights: `instantx` as
    `from_transformer` makes one (zero pooled embeddings, latents without the VAE's shift), `shifted` the same net
    fed the pooled embedding and shifted latents, `sd35-large` as SD3.5 Large's nets (no patch embedding or text
    embedder of its own: the pipeline lends it the transformer's patch embedding)."""
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(str(folder), subfolder="transformer")
    controlnet = SD3ControlNetModel.from_transformer(transformer, num_layers=1, num_extra_conditioning_channels=0)
    if style != "instantx":
        large = {"use_pos_embed": False, "joint_attention_dim": None} if style == "sd35-large" else {}
        weights = controlnet.state_dict()
        torch.manual_seed(seed)
        controlnet = SD3ControlNetModel.from_config({**controlnet.config, "force_zeros_for_pooled_projection": False,
                                                     **large})  # fmt: skip
        controlnet.load_state_dict({k: v for k, v in weights.items() if k in controlnet.state_dict()}, strict=False)
    blocks = [*controlnet.controlnet_blocks, controlnet.pos_embed_input]
    return saved_acting(controlnet, (p for block in blocks for p in block.parameters()), out, seed)


def tiny_sana_controlnet(folder, out, seed: int = 0):
    """A ControlNet of the tiny SANA transformer (its widths; diffusers has no `from_transformer` for SANA): its
    first block's weights copied, its zero-initialised layers given seeded weights."""
    import inspect

    from diffusers import SanaControlNetModel, SanaTransformer2DModel

    transformer = SanaTransformer2DModel.from_pretrained(str(folder), subfolder="transformer")
    takes = inspect.signature(SanaControlNetModel.__init__).parameters
    config = {k: v for k, v in transformer.config.items() if k in takes}
    torch.manual_seed(seed)
    controlnet = SanaControlNetModel(**{**config, "num_layers": 1})
    controlnet.load_state_dict(transformer.state_dict(), strict=False)
    blocks = [*controlnet.controlnet_blocks, controlnet.input_block]
    parameters = (p for block in blocks for p in block.parameters())
    return saved_acting(controlnet, parameters, out, seed, scale=0.2)  # acts well beyond bf16's rounding


def tiny_z_image_controlnet(folder, out, control_in_dim: int = 16, seed: int = 0):
    """A ControlNet of the tiny Z-Image transformer's widths (its control layers beside both of its layers),
    seeded; `control_in_dim` above the latents' 16 channels: version 2.0's layout (the latents zero-padded)."""
    from diffusers import ZImageControlNetModel, ZImageTransformer2DModel

    c = ZImageTransformer2DModel.load_config(str(folder), subfolder="transformer")
    torch.manual_seed(seed)
    controlnet = ZImageControlNetModel(control_layers_places=[0, 1], control_in_dim=control_in_dim,
                                       all_patch_size=tuple(c["all_patch_size"]),
                                       all_f_patch_size=tuple(c["all_f_patch_size"]), dim=c["dim"],
                                       n_refiner_layers=c["n_refiner_layers"], n_heads=c["n_heads"],
                                       n_kv_heads=c["n_kv_heads"])  # fmt: skip
    return saved_acting(controlnet, [p for p in controlnet.parameters() if not p.any()], out, seed, scale=0.2)


def sharp_posterior(folder, out):
    """A copy of a pipeline folder whose VAE's posterior has (almost) no variance: StableDiffusion3ControlNet-
    Pipeline samples the control image's encoding from torch's global generator, once per guidance pass, where
    gigadiff draws one sample with the run's generator; with a sharp posterior both are its mean."""
    import shutil

    from diffusers import AutoencoderKL

    shutil.copytree(folder, out)
    vae = AutoencoderKL.from_pretrained(str(out), subfolder="vae")
    moments = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    half = moments.out_channels // 2
    with torch.no_grad():
        moments.weight[half:] = 0
        moments.bias[half:] = -30.0  # log-variance: a standard deviation of 3e-7
    vae.save_pretrained(str(out / "vae"))
    return out


PIPELINES = {
    "flux": ("FluxPipeline", "FluxControlNetPipeline", "FluxControlNetModel"),
    "sd3": ("StableDiffusion3Pipeline", "StableDiffusion3ControlNetPipeline", "SD3ControlNetModel"),
    "sana": ("SanaPipeline", "SanaControlNetPipeline", "SanaControlNetModel"),
    "z-image": ("ZImagePipeline", "ZImageControlNetPipeline", "ZImageControlNetModel"),
    "qwen-image": ("QwenImagePipeline", "QwenImageControlNetPipeline", "QwenImageControlNetModel"),
}
"""Each family's base pipeline, ControlNet pipeline and ControlNet class."""


def pipeline_latents(family, folder, net, image, scale, start, end, dtype, theirs=None):
    """The family's ControlNet pipeline's latents (unpacked) for one tile, seeded as the runs are."""
    import diffusers

    base_class, pipeline_class, net_class = (getattr(diffusers, name) for name in PIPELINES[family])
    base = base_class.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
    pipe = pipeline_class(**base.components, controlnet=net_class.from_pretrained(str(net), dtype=dtype))
    pipe.set_progress_bar_config(disable=True)
    window = {} if (start, end) == (0.0, 1.0) else {"control_guidance_start": start, "control_guidance_end": end}
    result = pipe(PROMPT, control_image=Image.open(image), height=SIZE, width=SIZE, num_inference_steps=STEPS,
                  controlnet_conditioning_scale=scale, output_type="latent",
                  generator=torch.Generator("cpu").manual_seed(3), **window,
                  **(CASES[family].theirs if theirs is None else theirs))  # fmt: skip
    latents = result.images.float()
    return latents if latents.ndim == 4 else unpack(latents, SIZE // 8, SIZE // 8)


def assert_one_tile_equals_the_pipeline(family, folder, net, image, scale, start, end, dtype, theirs_options=None,
                                        **options):  # fmt: skip
    """gigadiff's one-tile run with the ControlNet (and `options`) equals the family's ControlNet pipeline (given
    `theirs_options` instead of the family's own, if any; fp32: 1e-4, bf16: 2e-2 of the latents' range), and
    differs from the run without it by far more (the net acts). Returns the backend."""
    backend = open_backend(str(folder), "cpu", dtype="fp32" if dtype == torch.float32 else "bf16",
                           controlnets=(str(net),))  # fmt: skip
    run = {"size": f"{SIZE}x{SIZE}", "steps": STEPS, "seed": 3, **CASES[family].ours, **options}
    got = generate_result(PROMPT, model=backend, control=[f"{net}={image}:{scale}:{start}:{end}"], **run).latents
    theirs = pipeline_latents(family, folder, net, image, scale, start, end, dtype, theirs_options)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert (got - theirs).abs().max() <= tolerance * max(1.0, float(theirs.abs().max()))
    plain = generate_result(PROMPT, model=backend, **run).latents
    assert (plain - theirs).abs().max() > 20 * tolerance, "the ControlNet changed nothing: the test proves nothing"
    return backend


@pytest.mark.parametrize(("scale", "start", "end", "dtype"),
                         [(0.9, 0.0, 1.0, torch.float32), (1.3, 0.3, 0.7, torch.float32),
                          (0.9, 0.0, 1.0, torch.bfloat16)],
                         ids=["whole-fp32", "window-fp32", "whole-bf16"])  # fmt: skip
def test_one_tile_equals_qwen_image_controlnet_pipeline(scale, start, end, dtype, tiny_qwen_image_dir, tmp_path):
    net = tiny_qwen_controlnet(tiny_qwen_image_dir, tmp_path / "net")
    image = control_image(tmp_path / "edges.png")
    assert_one_tile_equals_the_pipeline("qwen-image", tiny_qwen_image_dir, net, image, scale, start, end, dtype)


@pytest.mark.parametrize(("style", "scale", "start", "end", "dtype"),
                         [("instantx", 0.8, 0.0, 1.0, torch.float32), ("instantx", 1.2, 0.3, 0.7, torch.float32),
                          ("xlabs", 0.7, 0.0, 1.0, torch.float32), ("instantx", 0.8, 0.0, 1.0, torch.bfloat16),
                          ("xlabs", 0.7, 0.0, 1.0, torch.bfloat16)],
                         ids=["instantx-fp32", "instantx-window-fp32", "xlabs-fp32", "instantx-bf16",
                              "xlabs-bf16"])  # fmt: skip
def test_one_tile_equals_flux_controlnet_pipeline(style, scale, start, end, dtype, tiny_flux_dir, tmp_path):
    net = tiny_flux_controlnet(tiny_flux_dir, tmp_path / "net", hint=style == "xlabs")
    image = control_image(tmp_path / "edges.png")
    assert_one_tile_equals_the_pipeline("flux", tiny_flux_dir, net, image, scale, start, end, dtype)


@pytest.mark.parametrize(("style", "scale", "start", "end", "dtype", "positions"),
                         [("instantx", 0.8, 0.0, 1.0, torch.float32, "local"),
                          ("instantx", 1.2, 0.3, 0.7, torch.float32, "local"),
                          ("instantx", 0.8, 0.0, 1.0, torch.bfloat16, "local"),
                          ("instantx", 0.8, 0.0, 1.0, torch.float32, "global"),
                          ("shifted", 0.8, 0.0, 1.0, torch.float32, "local"),
                          ("sd35-large", 0.8, 0.0, 1.0, torch.float32, "local"),
                          ("sd35-large", 0.8, 0.0, 1.0, torch.bfloat16, "global")],
                         ids=["instantx-fp32", "instantx-window-fp32", "instantx-bf16", "instantx-global-fp32",
                              "shifted-fp32", "sd35-large-fp32", "sd35-large-global-bf16"])  # fmt: skip
def test_one_tile_equals_sd3_controlnet_pipeline(style, scale, start, end, dtype, positions, tiny_sd3_dir, tmp_path):
    folder = sharp_posterior(tiny_sd3_dir, tmp_path / "sd3")
    net = tiny_sd3_controlnet(folder, tmp_path / "net", style=style)
    image = control_image(tmp_path / "edges.png")
    assert_one_tile_equals_the_pipeline("sd3", folder, net, image, scale, start, end, dtype, positions=positions)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_tile_equals_sana_controlnet_pipeline(dtype, tiny_sana_dir, tmp_path):
    """SANA's pipeline takes no schedule window: the whole schedule, scale 0.8."""
    net = tiny_sana_controlnet(tiny_sana_dir, tmp_path / "net")
    image = control_image(tmp_path / "edges.png")
    assert_one_tile_equals_the_pipeline("sana", tiny_sana_dir, net, image, 0.8, 0.0, 1.0, dtype)


@pytest.mark.parametrize(("control_in_dim", "dtype"), [(16, torch.float32), (16, torch.bfloat16), (24, torch.float32)],
                         ids=["fp32", "bf16", "v2-padded-fp32"])  # fmt: skip
def test_one_tile_equals_z_image_controlnet_pipeline(control_in_dim, dtype, tiny_z_image_dir, tmp_path):
    """Z-Image's pipeline takes no schedule window: the whole schedule, scale 0.75 (its default)."""
    net = tiny_z_image_controlnet(tiny_z_image_dir, tmp_path / "net", control_in_dim)
    image = control_image(tmp_path / "edges.png")
    assert_one_tile_equals_the_pipeline("z-image", tiny_z_image_dir, net, image, 0.75, 0.0, 1.0, dtype)


def test_sd3_tiles_see_their_crops_and_their_own_place_on_the_controlnets_position_table(tiny_sd3_dir, tmp_path):
    """With global positions each tile's ControlNet reads the crop of the encoded image under its window and its
    tokens take the positions of that window on the net's own table (as the transformer's do)."""
    net = tiny_sd3_controlnet(tiny_sd3_dir, tmp_path / "net")
    image = control_image(tmp_path / "edges.png", 512, 256)
    backend = open_backend(str(tiny_sd3_dir), "cpu", controlnets=(str(net),))
    model = backend.controlnets[str(net)]
    seen, positions = [], []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["controlnet_cond"].clone()), with_kwargs=True)  # fmt: skip
    model.pos_embed.register_forward_hook(lambda m, args, out: positions.append(m.cropped_pos_embed(32, 32).clone()))
    generate_result(PROMPT, model=backend, size="512x256", steps=1, seed=3, tile=256, overlap=128, shift=False,
                    tile_batch=1, positions="global", control=[f"{net}={image}"], guidance=1.0)  # fmt: skip
    assert len(seen) == 3 and seen[0].shape == (1, 16, 32, 32)
    for left, right in itertools.pairwise(seen):  # neighbours share 16 latent columns
        assert torch.equal(left[..., 16:], right[..., :16]), "two tiles saw different images over their overlap"
    table = model.pos_embed.pos_embed.reshape(1, 48, 48, -1)  # the net's whole table, 48 patches a side
    for k, crop in enumerate(positions):  # the canvas (16x32 patches) sits centred: rows 16..32, columns 8..40
        expected = table[:, 16:32, 8 + 8 * k : 24 + 8 * k].reshape(1, 256, -1)
        assert torch.equal(crop, expected), f"tile {k} took another place on the ControlNet's table"


@pytest.mark.parametrize("family", ["flux", "qwen-image"])
def test_true_guidance_runs_each_controlnet_once_per_tile_as_the_pipelines_do(family, request, tmp_path):
    """The pipelines feed their nets the prompt and reuse the residuals in the negative pass: with true guidance
    (FLUX.1 --true-cfg, both passes in one call; Qwen-Image, a call per pass) each net runs once per tile and step,
    and the image is the pipeline's."""
    folder = request.getfixturevalue("tiny_flux_dir" if family == "flux" else "tiny_qwen_image_dir")
    make = tiny_flux_controlnet if family == "flux" else tiny_qwen_controlnet
    net = make(folder, tmp_path / "net")
    image = control_image(tmp_path / "edges.png")
    ours, theirs = {}, None
    if family == "flux":
        ours = {"true_cfg": 2.0, "negative": "fog"}
        theirs = {**CASES["flux"].theirs, "true_cfg_scale": 2.0, "negative_prompt": "fog"}
    backend = assert_one_tile_equals_the_pipeline(family, folder, net, image, 0.8, 0.0, 1.0, torch.float32,
                                                  theirs, **ours)  # fmt: skip
    rows = []
    backend.controlnets[str(net)].register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)  # fmt: skip
    generate_result(PROMPT, model=backend, size=f"{SIZE}x{SIZE}", steps=STEPS, seed=3, control=[f"{net}={image}"],
                    **{**CASES[family].ours, **ours})  # fmt: skip
    assert rows == [1] * STEPS, f"the ControlNet ran on {rows} rows a step for one tile"


def test_each_tile_sees_the_packed_crop_of_the_encoded_control_image_under_its_window(tiny_flux_dir, tmp_path):
    net = tiny_flux_controlnet(tiny_flux_dir, tmp_path / "net")
    image = control_image(tmp_path / "edges.png", 512, 256)
    backend = open_backend(str(tiny_flux_dir), "cpu", controlnets=(str(net),))
    seen = []
    backend.controlnets[str(net)].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["controlnet_cond"].clone()), with_kwargs=True)  # fmt: skip
    generate_result(PROMPT, model=backend, size="512x256", steps=1, seed=3, tile=256, overlap=128, shift=False,
                    tile_batch=1, control=[f"{net}={image}"], **CASES["flux"].ours)  # fmt: skip
    assert len(seen) == 3  # three 256-px windows with 128 px of overlap, one per call
    crops = [unpack(c.float(), 32, 32) for c in seen]  # each [1, 16, 32, 32]: 256 px of latents
    assert crops[0].shape == (1, 16, 32, 32)
    for left, right in itertools.pairwise(crops):  # neighbours share 16 latent columns
        assert torch.equal(left[..., 16:], right[..., :16]), "two tiles saw different images over their overlap"
    assert not torch.equal(crops[0][..., :16], crops[2][..., 16:]), "every tile saw the same crop"


@pytest.mark.parametrize(("family", "make", "argument"),
                         [("sana", tiny_sana_controlnet, "controlnet_cond"),
                          ("z-image", tiny_z_image_controlnet, "control_context")],
                         ids=["sana", "z-image"])  # fmt: skip
def test_sana_and_z_image_tiles_see_the_crop_of_the_encoded_image_under_their_windows(family, make, argument, request,
                                                                                      tmp_path):  # fmt: skip
    """On a non-square canvas (512x256, three 256-px windows over 128 px of overlap) each tile's net reads its own
    window of the one encoded control image: neighbours see the same latents where they overlap."""
    folder = request.getfixturevalue("tiny_sana_dir" if family == "sana" else "tiny_z_image_dir")
    net = make(folder, tmp_path / "net")
    image = control_image(tmp_path / "edges.png", 512, 256)
    backend = open_backend(str(folder), "cpu", controlnets=(str(net),))
    seen = []

    def record(module, args, kwargs):
        given = kwargs[argument] if argument in kwargs else args[3]  # the nets' fourth argument either way
        seen.append(torch.stack(list(given)) if isinstance(given, list) else given.clone())

    backend.controlnets[str(net)].register_forward_pre_hook(record, with_kwargs=True)
    generate_result(PROMPT, model=backend, size="512x256", steps=1, seed=3, tile=256, overlap=128, shift=False,
                    tile_batch=1, control=[f"{net}={image}"], **{**CASES[family].ours, "guidance": 1.0})  # fmt: skip
    assert len(seen) == 3  # one call per window (no guidance: one pass)
    assert seen[0].shape[-2:] == (32, 32)  # 256 px of latents
    for left, right in itertools.pairwise(seen):  # neighbours share 16 latent columns
        assert torch.equal(left[..., 16:], right[..., :16]), "two tiles saw different images over their overlap"
    assert not torch.equal(seen[0][..., :16], seen[2][..., 16:]), "every tile saw the same crop"


def test_z_image_controlnets_take_their_tiles_canvas_positions_as_the_transformer_does(tiny_z_image_dir, tmp_path):
    """With `--positions global` (no pipeline runs tiles to compare with) each tile's net reads its image tokens at
    the very positions the transformer gives them: the tile's place on the canvas, 8 token columns apart here."""
    net = tiny_z_image_controlnet(tiny_z_image_dir, tmp_path / "net")
    image = control_image(tmp_path / "edges.png", 512, 256)
    backend = open_backend(str(tiny_z_image_dir), "cpu", controlnets=(str(net),))
    transformer, model = backend.pipe.transformer, backend.controlnets[str(net)]
    rope, calls = transformer.rope_embedder, []

    class Recorded:  # the rotary embedder both share, called with each sequence's position ids
        def __init__(self, who):
            self.who = who

        def __call__(self, ids):
            calls.append((self.who, ids.clone()))
            return rope(ids)

    transformer.rope_embedder, model.rope_embedder = Recorded("transformer"), Recorded("net")
    generate_result(PROMPT, model=backend, size="512x256", steps=1, seed=3, tile=256, overlap=128, shift=False,
                    tile_batch=1, positions="global", control=[f"{net}={image}"], guidance=1.0)  # fmt: skip
    images = [(who, ids[:256]) for who, ids in calls if ids[0, 0] > 1]  # image tokens (16x16), not the caption's
    assert [who for who, _ in images] == ["net", "transformer"] * 3
    for k in range(3):
        assert torch.equal(images[2 * k][1], images[2 * k + 1][1]), f"tile {k}: the net read other positions"
    first = images[0][1]
    for k in (1, 2):
        assert torch.equal(images[2 * k][1][:, 2], first[:, 2] + 8 * k)  # columns: the tile's place
        assert torch.equal(images[2 * k][1][:, 1], first[:, 1])  # rows: the one row of tiles


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_flux_union_controlnet_equals_the_pipeline_with_its_mode(dtype, tiny_flux_dir, tmp_path):
    """MODEL#MODE on FLUX.1: the union net told the kind of its image on every call, one per row, as
    FluxControlNetPipeline's `control_mode` tells it; the tile equals that pipeline's."""
    net = tiny_flux_controlnet(tiny_flux_dir, tmp_path / "net", modes=7)
    image = control_image(tmp_path / "edges.png")
    name = "fp32" if dtype == torch.float32 else "bf16"
    run = {"size": f"{SIZE}x{SIZE}", "steps": STEPS, "seed": 3, **CASES["flux"].ours}
    backend = open_backend(str(tiny_flux_dir), "cpu", dtype=name, controlnets=(f"{net}#2",))
    told = []
    backend.controlnets[str(net)].register_forward_pre_hook(
        lambda m, args, kwargs: told.append(kwargs["controlnet_mode"].tolist()), with_kwargs=True)  # fmt: skip
    got = generate_result(PROMPT, model=backend, control=[f"{net}#2={image}:0.8"], **run).latents
    assert told == [[[2]]] * STEPS
    theirs = pipeline_latents("flux", tiny_flux_dir, net, image, 0.8, 0.0, 1.0, dtype,
                              {**CASES["flux"].theirs, "control_mode": 2})  # fmt: skip
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert (got - theirs).abs().max() <= tolerance * max(1.0, float(theirs.abs().max()))


def test_a_flux_union_controlnet_needs_its_mode(tiny_flux_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = tiny_flux_controlnet(tiny_flux_dir, tmp_path / "net", modes=7)
    image = control_image(tmp_path / "edges.png")
    for control, message in [(f"{net}={image}", "is a union ControlNet of 7 control types: name the kind"),
                             (f"{net}#7={image}", "MODE from 0 to 6 (#7 given)")]:  # fmt: skip
        result = CliRunner().invoke(app, ["generate", "x", "--model", str(tiny_flux_dir), "--control", control,
                                          "--device", "cpu"])  # fmt: skip
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and message in said, said


def test_a_controlnet_of_another_family_is_refused_before_any_weights(tiny_flux_dir, tiny_sd_dir, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    image = control_image(tmp_path / "edges.png")
    sd_net = tiny_controlnet(tiny_sd_dir, tmp_path / "sd-net")
    result = CliRunner().invoke(app, ["generate", "x", "--model", str(tiny_flux_dir), "--control",
                                      f"{sd_net}={image}", "--device", "cpu"])  # fmt: skip
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "is a ControlNetModel; model" in said and "takes a FluxControlNetModel" in said
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["edges.png"], "nothing was written"


def test_regions_share_the_runs_encoded_control_image(tiny_flux_dir, tmp_path):
    """The control image is VAE-encoded once per run, whatever the number of regional prompts: each region's
    layer holds the run's encoded image (the same draws), not an encoding of its own."""
    net = tiny_flux_controlnet(tiny_flux_dir, tmp_path / "net")
    image = control_image(tmp_path / "edges.png", 512, 256)
    backend = open_backend(str(tiny_flux_dir), "cpu", controlnets=(str(net),))
    encodes = []
    encode = backend.codec.encode
    backend.codec.encode = lambda *args, **kwargs: encodes.append(1) or encode(*args, **kwargs)
    regions = [{"prompt": "a red barn", "box": [0, 0, 256, 256]}, {"prompt": "a pond", "box": [256, 0, 512, 256]}]
    seen = []
    backend.controlnets[str(net)].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["controlnet_cond"].clone()), with_kwargs=True)  # fmt: skip
    generate_result(PROMPT, model=backend, size="512x256", steps=1, seed=3, tile=256, overlap=128, shift=False,
                    tile_batch=1, regions=regions, control=[f"{net}={image}"], **CASES["flux"].ours)  # fmt: skip
    assert len(encodes) == 1, f"the control image was encoded {len(encodes)} times"
    distinct = []
    for crop in seen:
        if not any(torch.equal(crop, d) for d in distinct):
            distinct.append(crop)
    assert len(seen) > 3 and len(distinct) == 3, "every layer's ControlNet sees one of the three windows' crops"


def test_an_sd3_inpainting_controlnet_is_refused_before_any_weights(tiny_sd3_dir, tmp_path, monkeypatch):
    """SD3's inpainting ControlNets read a mask beside the image (extra conditioning channels): refused, named."""
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel

    monkeypatch.chdir(tmp_path)
    transformer = SD3Transformer2DModel.from_pretrained(str(tiny_sd3_dir), subfolder="transformer")
    SD3ControlNetModel.from_transformer(transformer, num_layers=1).save_pretrained(str(tmp_path / "inpaint"))
    image = control_image(tmp_path / "edges.png")
    result = CliRunner().invoke(app, ["generate", "x", "--model", str(tiny_sd3_dir), "--control",
                                      f"{tmp_path / 'inpaint'}={image}", "--device", "cpu"])  # fmt: skip
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "is an inpainting ControlNet (it reads a mask beside its image)" in said
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["edges.png"], "nothing was written"


def test_an_sd3_controlnet_whose_table_is_smaller_than_the_canvas_is_refused_before_loading(tiny_sd3_dir, tmp_path,
                                                                                            monkeypatch):  # fmt: skip
    """With global positions a ControlNet's own position table must cover the canvas, as the transformer's must:
    read from its config before anything loads."""
    from diffusers import SD3ControlNetModel

    monkeypatch.chdir(tmp_path)
    net = tiny_sd3_controlnet(tiny_sd3_dir, tmp_path / "net")
    config = {**SD3ControlNetModel.load_config(str(net)), "pos_embed_max_size": 16}  # 16 patches: 256 px
    SD3ControlNetModel.from_config(config).save_pretrained(str(tmp_path / "small"))
    image = control_image(tmp_path / "edges.png", 512, 256)
    args = ["generate", "x", "--model", str(tiny_sd3_dir), "--size", "512x256", "--control",
            f"{tmp_path / 'small'}={image}", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--positions", "global"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "a ControlNet's position table covers 256px a side, the canvas is 512x256" in said
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["edges.png"], "nothing was written"
