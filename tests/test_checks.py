"""A request checked against itself and its model: size parsing, model defaults, derived settings."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from gigadiff.errors import GigadiffError
from gigadiff.facts import ModelInfo, ShiftRule
from gigadiff.options import RunRequest
from gigadiff.runs.checks import parse_size, settings_for


def settings(info, prompt="", width=None, height=None, **fields):
    """The settings `fields` resolve to on a model described by `info` (width and height as --size)."""
    if width is not None or height is not None:
        fields["size"] = f"{width or height}x{height or width}"
    return settings_for(RunRequest(prompt=prompt, **fields), info)[1]


SD = ModelInfo("sd", "sd", latent_channels=4, vae_scale_factor=8, native_size=512)


@pytest.mark.parametrize(("text", "size"), [("4096x2048", (4096, 2048)), ("512X768", (512, 768)),
                                            ("1024", (1024, 1024)), (" 64 x 128 ", (64, 128))])  # fmt: skip
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_defaults_come_from_the_model():
    s = settings(SD, "x")
    assert (s.width, s.height, s.tile, s.overlap, s.steps, s.guidance) == (1024, 1024, 512, 64, 30, 7.5)
    s = settings(SD, "x", tile=520)
    assert s.overlap == 64  # 520 / 8 = 65, rounded down to the VAE factor
    assert s.weights == "gaussian"
    tent = ModelInfo("t", "t", 1, 1, 128, takes_prompt=False, default_weights="linear")
    assert settings(tent, "").weights == "linear"
    assert settings(tent, "", weights="uniform").weights == "uniform"
    assert s.level_sync is False
    synced = ModelInfo("t", "t", 1, 1, 128, takes_prompt=False, default_level_sync=True)
    assert settings(synced, "").level_sync is True
    assert settings(synced, "", level_sync=False).level_sync is False


def test_default_overlap_is_the_models_share_of_the_tile_with_room_past_the_rims():
    wide = ModelInfo("t", "t", 1, 1, 128, takes_prompt=False, default_overlap_share=0.5)
    assert settings(wide, "").overlap == 64
    assert settings(wide, "", overlap=32).overlap == 32
    rims = ModelInfo("t", "t", 1, 1, 128, takes_prompt=False, edge_margin=8)
    assert settings(rims, "").overlap == 32  # 128 / 8 = 16 < 4 x the 8 px rim


def test_explicit_settings_are_kept():
    s = settings(SD, "x", width=800, height=600, tile=256, overlap=0, steps=3, guidance=0)
    assert (s.width, s.height, s.tile, s.overlap, s.steps, s.guidance) == (800, 600, 256, 0, 3, 0)


def test_level_sync_is_refused_with_regional_prompts():
    region = {"regions": [{"box": [0, 0, 1, 1], "prompt": "x"}]}
    with pytest.raises(GigadiffError, match="level_sync cannot be used with regional prompts yet"):
        settings(SD, "x", level_sync=True, regions=region)
    assert settings(SD, "x", regions=region).level_sync is False


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": 1001}, "width 1001 is not a multiple of 8 (this model's VAE downsampling factor); use 1000 or 1008"),
        ({"scheduler": "warp"}, "unknown scheduler 'warp'"),
        ({"true_cfg": 0.5}, "true_cfg must be at least 1"),
        ({"positions": "everywhere"}, "positions must be one of local, global"),
        ({"flow_shift": "huge"}, "flow_shift 'huge' must be tile, canvas, a shift > 0"),
        ({"tile": 8}, "tile (8px) must be at least 16px"),
        ({"tile": 256, "overlap": 300}, "overlap (300px) must be smaller than the tile (256px)"),
        ({"overlap": -8}, "overlap must be at least 0, got -8"),
        ({"guidance": -1}, "guidance must be at least 0, got -1"),
        ({"guidance_rescale": 2}, "guidance_rescale must lie in [0, 1]"),
        ({"seed": -1}, "seed must lie in [0, 2**64)"),
        ({"weights": "box"}, "weights must be one of uniform, gaussian, cosine, linear, got 'box'"),
        ({"eta": float("nan")}, "eta must be a finite number, got nan"),
        ({"steps": 0}, "steps must be between 1 and 1000, got 0"),
        ({"tile": 0}, "tile must lie in (0, 8192], got 0"),
    ],
)
def test_bad_settings(changes, message):
    with pytest.raises(GigadiffError) as e:
        settings(SD, "x", **changes)
    assert message in str(e.value)


def test_prompt_refused_for_models_that_take_none():
    info = ModelInfo("terrain", "terrain", 1, 1, 128, takes_prompt=False)
    with pytest.raises(GigadiffError, match="takes no prompt"):
        settings(info, "mountains")


FLUX = ModelInfo("flux", "flux", latent_channels=16, vae_scale_factor=8, native_size=1024, latent_multiple=2,
                 scheduler_kind="flow", guidance_kind="embedded", true_cfg=True, positions="rope",
                 shift_rule=ShiftRule("linear"))  # fmt: skip


def test_flow_models_take_flow_schedulers_only_naming_the_ones_that_work():
    assert settings(FLUX, "x", scheduler="unipc").scheduler == "unipc"
    with pytest.raises(GigadiffError) as e:
        settings(FLUX, "x", scheduler="ddim")
    assert "scheduler 'ddim' has no flow-matching form, and model 'flux' is a flow-matching model" in str(e.value)
    assert "default, euler, euler_a, heun, dpmpp_2m, dpmpp_2m_sde, unipc, deis, lcm" in str(e.value)
    consistency = ModelInfo("t", "t", 1, 1, 128, takes_prompt=False, scheduler_kind="consistency")
    with pytest.raises(GigadiffError, match="has its own sampler"):
        settings(consistency, "", scheduler="euler")


def test_sizes_tiles_and_overlaps_are_whole_tokens():
    with pytest.raises(GigadiffError) as e:
        settings(FLUX, "x", width=1000, height=1024)
    assert "width 1000 is not a multiple of 16 (its VAE factor 8 x 2x2 token patches); use 992 or 1008" in str(e.value)
    with pytest.raises(GigadiffError, match=r"must be multiples of 16 \(model 'flux'"):
        settings(FLUX, "x", tile=1016)
    with pytest.raises(GigadiffError, match=r"overlap \(72px\) must be multiples of 16"):
        settings(FLUX, "x", tile=1024, overlap=72)


def test_the_default_overlap_is_whole_tokens():
    s = settings(FLUX, "x", tile=1008)
    assert s.overlap % 16 == 0 and s.overlap == 1008 // 8 // 16 * 16


def test_the_timestep_shift_comes_from_one_tiles_tokens():
    small_tile = settings(FLUX, "x", width=4096, height=4096, tile=512, coherence="none")
    native = settings(FLUX, "x", width=4096, height=4096, coherence="none")
    whole = settings(FLUX, "x", width=4096, height=4096, flow_shift="canvas", coherence="none")  # fmt: skip
    assert small_tile.mu == pytest.approx(0.5 + (1024 - 256) * 0.65 / 3840)
    assert native.mu == pytest.approx(1.15)
    assert whole.mu == pytest.approx(0.5 + (65536 - 256) * 0.65 / 3840)  # 11.55: diffusers' rule on the canvas
    assert settings(FLUX, "x", flow_shift="3").mu == pytest.approx(math.log(3))
    assert settings(FLUX, "x", flow_shift="mu=0.7").mu == pytest.approx(0.7)
    assert settings(SD, "x").mu is None
    with pytest.raises(GigadiffError, match="flow_shift applies to flow-matching models"):
        settings(SD, "x", flow_shift="3")


def test_guidance_kinds_and_positions_are_checked_against_the_model():
    schnell = replace(FLUX, guidance_kind="none")
    assert settings(schnell, "x").guidance is None
    with pytest.raises(GigadiffError, match="takes no guidance scale"):
        settings(schnell, "x", guidance=3.5)
    assert settings(schnell, "x", true_cfg=2.0).true_cfg == 2.0
    with pytest.raises(GigadiffError, match="its guidance is classifier-free already: use guidance"):
        settings(SD, "x", true_cfg=2.0)
    with pytest.raises(GigadiffError, match="has no position ids"):
        settings(SD, "x", positions="global")
    table = replace(FLUX, max_global_px=3072)
    assert settings(table, "x", width=3072, height=2048, positions="global")
    with pytest.raises(GigadiffError, match="position table covers 3072px a side"):
        settings(table, "x", width=4096, height=2048, positions="global")


def test_the_default_tile_batch_follows_the_tile_count_not_the_world():
    assert settings(SD, "x", width=1024, height=512, tile=512, overlap=0).tile_batch == 2
    assert settings(SD, "x", width=512, height=512).tile_batch == 1
    assert settings(SD, "x", width=1536, height=512, tile=512, overlap=0).tile_batch == 3
    assert settings(SD, "x", width=1024, height=1024, tile=512, overlap=0).tile_batch == 4
    assert settings(SD, "x", width=4096, height=4096).tile_batch == 3  # 81 tiles
    assert settings(SD, "x", width=4096, height=512, tile_batch=2).tile_batch == 2
    assert settings(SD, "x", width=2048, height=512).tile_batch == 1  # 5 tiles: no call filled with copies
    assert settings(SD, "x", width=3072, height=512).tile_batch == 1  # 7 tiles
