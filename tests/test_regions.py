"""Regional prompts: file checks, feathered weights, and what the fused run equals in the limiting cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gigadiff.api import generate_result
from gigadiff.errors import GigadiffError
from gigadiff.facts import ModelInfo
from gigadiff.options import RunRequest
from gigadiff.regions import Region, background_weight, check_regions, load_region_file, region_weight
from gigadiff.runs.checks import settings_for

BASE = {"prompt": "a meadow", "size": "768x512", "steps": 2, "guidance": 7.5, "seed": 3, "tile": 256, "overlap": 64,
        "scheduler": "ddim"}  # fmt: skip


def run(backend, **changes):
    return generate_result(model=backend, **{**BASE, **changes})


def write(tmp_path, content, name="regions.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_a_region_file_is_normalised_and_masks_are_found_next_to_it(tmp_path):
    Image.new("L", (64, 32), 255).save(tmp_path / "lake.png")
    path = write(tmp_path, {"background": {"prompt": "dusk"}, "feather": 16, "regions": [
        {"box": [0.1, 0.2, 0.5, 0.9], "prompt": "a barn", "guidance": 9, "seed": 5},
        {"mask": "lake.png", "prompt": "a lake", "negative_prompt": "boats"}]})  # fmt: skip
    f = load_region_file(path)
    assert f.background == {"prompt": "dusk"} and f.feather == 16
    assert f.regions[0] == Region("a barn", "", 9.0, 5, box=(0.1, 0.2, 0.5, 0.9))
    assert f.regions[1].mask == str(tmp_path / "lake.png") and f.regions[1].negative_prompt == "boats"
    assert load_region_file(write(tmp_path, [{"box": [0, 0, 10, 10], "prompt": "x"}], "list.json")).feather == 32


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('"a string"', "must hold an object"),
        ({"regions": []}, "has no regions"),
        ({"regions": [{"box": [0, 0, 1, 1]}]}, 'needs a non-empty "prompt"'),
        ({"regions": [{"prompt": "x"}]}, 'exactly one of "box" and "mask"'),
        ({"regions": [{"prompt": "x", "box": [0, 0, 1]}]}, "box must be [left, top, right, bottom]"),
        ({"regions": [{"prompt": "x", "box": [0, 0, 1, 1], "colour": 1}]}, "unknown key(s) colour"),
        ({"regions": [{"prompt": "x", "mask": "nope.png"}]}, "does not exist"),
        ({"regions": [{"prompt": "x", "box": [0, 0, 1, 1], "seed": -1}]}, "seed must be an integer"),
        ({"regions": [{"prompt": "x", "box": [0, 0, 1, 1]}], "feather": -2}, "feather must be a number"),
    ],
)
def test_bad_region_files_get_specific_errors(tmp_path, content, message):
    with pytest.raises(GigadiffError, match="region") as e:
        load_region_file(write(tmp_path, content))
    assert message in str(e.value)


def test_boxes_outside_the_canvas_empty_boxes_and_empty_masks_are_refused(tmp_path):
    Image.new("L", (64, 64), 0).save(tmp_path / "black.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    cases = [({"mask": str(tmp_path / "broken.png")}, "region 1 ('x'): cannot read mask image"),
             ({"box": (600, 0, 900, 100)}, "reaches outside the 768x512 canvas"),
             ({"box": (0.5, 0.5, 0.5, 0.9)}, "is empty"),
             ({"mask": str(tmp_path / "black.png")}, "is empty (no white pixel")]  # fmt: skip
    for where, message in cases:
        with pytest.raises(GigadiffError) as e:
            check_regions((Region("x", **where),), 768, 512)
        assert message in str(e.value)


def test_box_weights_are_one_inside_zero_outside_feathered_only_away_from_the_canvas_edge():
    w = region_weight(Region("x", box=(0, 128, 384, 512)), 768, 512, 8, feather_px=64)
    assert w.shape == (64, 96)
    assert w[:16].max() == 0 and w[:, 48:].max() == 0  # outside the box
    assert w[40:, :40].min() == 1  # deep inside
    assert w[63, 0] == 1  # the canvas edges are not feathered
    assert 0 < w[17, 20] < w[20, 20] < w[30, 20] == 1  # the top edge inside the canvas fades in over 8 latent px
    background = background_weight([w])
    assert torch.allclose(background[:16], torch.ones(16, 96)) and background.min() > 0
    assert torch.allclose((background + w)[w == 0], torch.ones(1)) and (background[w == 1] < 0.01).all()


def test_a_region_over_the_whole_canvas_is_exactly_a_run_with_its_prompt(sd_backend):
    """The background is then left with its floor weight everywhere, so it is skipped: same calls, same result."""
    plain = run(sd_backend, prompt="a lighthouse")
    regional = run(sd_backend, regions=[{"prompt": "a lighthouse", "box": [0, 0, 1, 1]}])
    assert torch.equal(regional.latents, plain.latents)
    assert regional.run.model_calls == plain.run.model_calls


def test_a_region_costs_model_calls_only_on_the_tiles_it_touches_and_changes_only_its_part(sd_backend):
    plain = run(sd_backend)
    regional = run(sd_backend, regions=[{"prompt": "a red barn", "guidance": 9.0, "box": [0, 0, 200, 200]}],
                   tile_batch=1)  # fmt: skip
    tiles = plain.run.tiles_per_step
    assert tiles < regional.run.model_calls // 2 < 2 * tiles  # the barn touches few of the 6 tiles per step
    diff = (regional.latents - plain.latents).abs().amax(dim=(0, 1))
    assert diff[:25, :25].mean() > 10 * diff[40:, 60:].mean()


def test_a_region_seed_redraws_the_noise_inside_it_only():
    from gigadiff.recipes.regional import region_weights, with_region_seeds

    sd = ModelInfo("sd", "sd", latent_channels=4, vae_scale_factor=8, native_size=512)
    regions = [{"prompt": "x", "seed": 9, "box": [0, 0, 384, 256]}]
    settings = settings_for(RunRequest(**BASE, regions=regions), sd)[1]
    noise = torch.zeros(1, 4, 64, 96)
    out = with_region_seeds(noise, settings, region_weights(settings, 8))
    assert (out[..., 32:, :] == 0).all() and (out[..., :, 48:] == 0).all()
    assert out[..., :28, :44].std() > 0.9


def test_regions_cli_records_regions_and_rejects_bad_files(tiny_sd_dir, tmp_path):
    from gigadiff.io.writers import read_png_metadata
    from tests.test_cli import invoke, tiny_args

    path = write(tmp_path, {"background": {"prompt": "a meadow"},
                            "regions": [{"box": [0, 0, 0.5, 0.5], "prompt": "a barn", "seed": 4}]})  # fmt: skip
    out = tmp_path / "farm.png"
    args = [a for a in tiny_args(tiny_sd_dir, out) if a != "a small house"]
    result = invoke(*args, "--regions", str(path))
    assert result.exit_code == 0, result.output
    meta = read_png_metadata(out)
    assert meta["prompt"] == "a meadow" and meta["settings"]["regions"][0]["prompt"] == "a barn"
    assert meta["request"]["regions"]["regions"][0]["box"] == [0, 0, 0.5, 0.5]
    outside = write(tmp_path, {"regions": [{"box": [0, 0, 900, 100], "prompt": "x"}]}, "outside.json")
    bad = invoke(*tiny_args(tiny_sd_dir, tmp_path / "bad.png"), "--regions", str(outside))
    assert bad.exit_code == 2 and "reaches outside the 768x512 canvas" in bad.output
    assert not (tmp_path / "bad.png").exists()
    np.testing.assert_equal(Image.open(out).size, (768, 512))
    synced = invoke(*tiny_args(tiny_sd_dir, tmp_path / "synced.png"), "--regions", str(path), "--level-sync")
    assert synced.exit_code == 2 and "--level-sync cannot be used with regional prompts yet" in synced.output


def test_regions_come_inline_with_masks_as_data_urls_where_files_cannot_be_named(tmp_path):
    import base64
    import io

    from gigadiff.errors import GigadiffError
    from gigadiff.regions import parse_regions

    buffer = io.BytesIO()
    Image.new("L", (32, 32), 255).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    regions = parse_regions([{"mask": url, "prompt": "a lake"}], folder=None).regions
    check_regions(regions, 256, 256)
    assert region_weight(regions[0], 256, 256, 8, 0).min() == 1
    with pytest.raises(GigadiffError, match="masks must be given as data:image"):
        parse_regions([{"mask": "lake.png", "prompt": "a lake"}], folder=None)
    with pytest.raises(GigadiffError, match="not valid base64"):
        parse_regions([{"mask": "data:image/png;base64,@@@", "prompt": "a lake"}], folder=None)
    assert not (tmp_path / "synced.png").exists()
