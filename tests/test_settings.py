"""Settings: size parsing, model defaults, and the checks that run before compute."""

from __future__ import annotations

import pytest

from gigadiff.backends.base import ModelInfo
from gigadiff.errors import GigadiffError
from gigadiff.settings import GenerationSettings, check_for_model, parse_size

SD = ModelInfo("sd", "sd", latent_channels=4, vae_scale_factor=8, native_size=512)


@pytest.mark.parametrize(("text", "size"), [("4096x2048", (4096, 2048)), ("512X768", (512, 768)),
                                            ("1024", (1024, 1024)), (" 64 x 128 ", (64, 128))])  # fmt: skip
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_defaults_come_from_the_model():
    s = check_for_model(GenerationSettings("x"), SD)
    assert (s.width, s.height, s.tile, s.overlap, s.steps, s.guidance) == (1024, 1024, 512, 64, 30, 7.5)
    s = check_for_model(GenerationSettings("x", tile=520), SD)
    assert s.overlap == 64  # 520 / 8 = 65, rounded down to the VAE factor
    assert s.weights == "gaussian"
    tent = ModelInfo("t", "t", 1, 1, 128, takes_prompt=False, default_weights="linear")
    assert check_for_model(GenerationSettings(""), tent).weights == "linear"
    assert check_for_model(GenerationSettings("", weights="uniform"), tent).weights == "uniform"
    assert s.level_sync is False
    synced = ModelInfo("t", "t", 1, 1, 128, takes_prompt=False, default_level_sync=True)
    assert check_for_model(GenerationSettings(""), synced).level_sync is True
    assert check_for_model(GenerationSettings("", level_sync=False), synced).level_sync is False


def test_default_overlap_is_the_models_share_of_the_tile_with_room_past_the_rims():
    wide = ModelInfo("t", "t", 1, 1, 128, takes_prompt=False, default_overlap_share=0.5)
    assert check_for_model(GenerationSettings(""), wide).overlap == 64
    assert check_for_model(GenerationSettings("", overlap=32), wide).overlap == 32
    rims = ModelInfo("t", "t", 1, 1, 128, takes_prompt=False, edge_margin=8)
    assert check_for_model(GenerationSettings(""), rims).overlap == 32  # 128 / 8 = 16 < 4 x the 8 px rim


def test_explicit_settings_are_kept():
    s = check_for_model(GenerationSettings("x", width=800, height=600, tile=256, overlap=0, steps=3, guidance=0), SD)
    assert (s.width, s.height, s.tile, s.overlap, s.steps, s.guidance) == (800, 600, 256, 0, 3, 0)


def test_level_sync_is_refused_with_regional_prompts():
    region = {"prompt": "x", "negative_prompt": "", "guidance": None, "seed": None, "box": [0, 0, 1, 1]}
    with pytest.raises(GigadiffError, match="--level-sync cannot be used with regional prompts yet"):
        check_for_model(GenerationSettings("x", level_sync=True, regions=(region,)), SD)
    assert check_for_model(GenerationSettings("x", regions=(region,)), SD).level_sync is False


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": 1001}, "width 1001 is not a multiple of 8 (this model's VAE downsampling factor); use 1000 or 1008"),
        ({"tile": 8}, "tile (8px) must be at least 16px"),
        ({"tile": 256, "overlap": 300}, "overlap (300px) must be smaller than the tile (256px)"),
        ({"overlap": -8}, "overlap must be >= 0"),
        ({"guidance": -1}, "guidance must be >= 0"),
        ({"guidance_rescale": 2}, "guidance rescale must lie in [0, 1]"),
        ({"seed": -1}, "seed must lie in [0, 2**64)"),
        ({"weights": "box"}, "unknown weights 'box'; choose one of: uniform, gaussian, cosine, linear"),
    ],
)
def test_bad_settings(changes, message):
    with pytest.raises(GigadiffError) as e:
        check_for_model(GenerationSettings("x", **changes), SD)
    assert message in str(e.value)


def test_prompt_refused_for_models_that_take_none():
    info = ModelInfo("terrain", "terrain", 1, 1, 128, takes_prompt=False)
    with pytest.raises(GigadiffError, match="takes no prompt"):
        check_for_model(GenerationSettings("mountains"), info)
