"""The command line end to end on a tiny model saved to disk, and every bad input's message and exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from gigadiff import __version__
from gigadiff.cli import app
from gigadiff.io.writers import read_latent, read_png_metadata

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def tiny_args(model, out, *extra: str) -> list[str]:
    return [
        "generate", "a small house", "--model", str(model), "--size", "768x512", "-o", str(out),
        "--steps", "2", "--seed", "5", "--tile", "256", "--overlap", "64", "--quiet", *extra,
    ]  # fmt: skip


def test_generate_writes_png_with_parameters_sidecar_and_latent(tiny_sd_dir, tmp_path):
    out, latent = tmp_path / "house.png", tmp_path / "house.safetensors"
    result = invoke(*tiny_args(tiny_sd_dir, out, "--negative", "fog", "--scheduler", "euler",
                              "--save-latent", str(latent)))  # fmt: skip
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:
        assert im.size == (768, 512) and im.mode == "RGB"
        assert "Steps: 2, Sampler: euler" in im.text["parameters"]
    meta = read_png_metadata(out)
    assert meta["prompt"] == "a small house" and meta["negative"] == "fog"
    assert (meta["seed"], meta["steps"], meta["scheduler"]) == (5, 2, "euler")
    assert (meta["width"], meta["height"], meta["tile"], meta["overlap"]) == (768, 512, 256, 64)
    assert meta["weights"] == "gaussian" and meta["shift"] is True
    assert meta["gigadiff_version"] == __version__ and meta["model"] == str(tiny_sd_dir)
    assert meta["request"]["dtype"] == "auto" and meta["dtype"] == "fp32", "auto is fp32 on the CPU, recorded so"
    assert json.loads(out.with_suffix(".json").read_text()) == meta
    tensor, latent_meta = read_latent(latent)
    assert tensor.shape == (1, 4, 64, 96) and latent_meta == meta
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask, "outputs get the usual permissions, not mkstemp's 0600"


def test_existing_output_is_never_overwritten_without_flag(tiny_sd_dir, tmp_path):
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    result = invoke(*tiny_args(tiny_sd_dir, out))
    assert result.exit_code == 2
    assert "already exists" in result.output and "--overwrite" in result.output
    assert out.read_bytes() == b"precious"
    result = invoke(*tiny_args(tiny_sd_dir, out, "--overwrite"))
    assert result.exit_code == 0
    with Image.open(out) as im:
        assert im.size == (768, 512)


def test_sdxl_end_to_end(tiny_sdxl_dir, tmp_path):
    out = tmp_path / "xl.png"
    result = invoke(*tiny_args(tiny_sdxl_dir, out, "--weights", "cosine", "--no-shift", "--tile-batch", "3",
                               "--level-sync"))  # fmt: skip
    assert result.exit_code == 0, result.output
    meta = read_png_metadata(out)
    assert meta["model_family"] == "sdxl" and meta["weights"] == "cosine" and meta["shift"] is False
    assert meta["level_sync"] is True


BAD_INPUTS = [
    (["--size", "1000x1001"], "height 1001 is not a multiple of 8"),
    (["--size", "0x512"], "width must be positive"),
    (["--size", "-512x512"], "width must be positive"),
    (["--size", "512x70000"], "larger than the supported maximum"),
    (["--size", "big"], "not of the form WIDTHxHEIGHT"),
    (["--tile", "256", "--overlap", "256"], "--overlap (256px) must be smaller than the --tile (256px)"),
    (["--tile", "260"], "must be multiples of 8"),
    (["--scheduler", "warp"], "unknown --scheduler 'warp'"),
    (["--weights", "triangle"], "--weights must be one of uniform, gaussian, cosine, linear, got 'triangle'"),
    (["--steps", "0"], "steps must be between 1 and 1000"),
    (["--tile-batch", "0"], "--tile-batch must be between 1 and 64"),
    (["--dtype", "fp16", "--device", "cpu"], "fp16 is not supported on the CPU"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--eta", "2"], "eta must lie in [0, 1]"),
    (["--sigmas", "80,x"], "must be comma-separated numbers"),
    (["--save-latent", "latent.bin"], "must end in .safetensors"),
    (["--guidance-rescale", "1.5"], "--guidance-rescale must lie in [0, 1]"),
    (["-o", ""], "--output is empty; give a file name ending in .png, .tif or .tiff"),
    (["-o", ".png"], "--output .png has a suffix but no file name"),
    (["-o", "/proc/x.png"], "cannot write /proc/x.png: folder /proc takes no new file"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_INPUTS)
def test_bad_input_is_refused_with_exit_code_2(tiny_sd_dir, tmp_path, extra, message):
    args = ["generate", "x", "--model", str(tiny_sd_dir), "-o", str(tmp_path / "o.png"), "--quiet"]
    result = invoke(*args, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "o.png").exists()


def test_help_lists_options_in_their_groups_with_value_placeholders_and_bare_flags():
    from gigadiff.options import GROUPS

    for command in ("generate", "upscale", "resume", "metrics", "serve"):
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "160"}).output
        assert "<bool>" not in text and "--help" in text, command
    text = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "160"}).output
    panels = [line.split("─ ", 1)[1].split(" ─", 1)[0] for line in text.splitlines() if line.startswith("╭─ ")]
    assert panels == ["Arguments", "Options", *(g[0].upper() + g[1:] for g in GROUPS)]
    for shown in ("--size  ", "WxH|N", "--quiet", "--output", "FILE", "--shift", "--no-shift", "auto|exact|fast"):
        assert shown in text, shown


def test_missing_model_fails_at_once_naming_it(tmp_path):
    result = invoke("generate", "x", "--model", "nobody/no-such-model", "-o", str(tmp_path / "o.png"))
    assert result.exit_code == 2
    assert "nobody/no-such-model" in result.output and "not in the local Hugging Face cache" in result.output
    result = invoke("generate", "x", "--model", "sdxl", "-o", str(tmp_path / "o.png"))
    assert result.exit_code == 2
    assert "sdxl (stabilityai/stable-diffusion-xl-base-1.0)" in result.output
    result = invoke("generate", "x", "--model", str(tmp_path / "nothing-here"), "-o", str(tmp_path / "o.png"))
    assert result.exit_code == 2 and "does not exist" in result.output
    result = invoke("generate", "x", "--model", "mystery", "-o", str(tmp_path / "o.png"))
    assert result.exit_code == 2 and "unknown model 'mystery'" in result.output


def test_not_a_diffusers_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke("generate", "x", "--model", str(tmp_path / "empty"), "-o", str(tmp_path / "o.png"))
    assert result.exit_code == 2 and "has no model_index.json" in result.output


def test_unwritable_output(tiny_sd_dir, tmp_path):
    result = invoke(*tiny_args(tiny_sd_dir, tmp_path / "missing" / "o.png"))
    assert result.exit_code == 2 and "does not exist" in result.output
    result = invoke(*tiny_args(tiny_sd_dir, tmp_path / "o.jpg"))
    assert result.exit_code == 2 and "must end in .png" in result.output


def test_tiff_output_holds_the_same_pixels_as_png_with_metadata(tiny_sd_dir, tmp_path):
    import json

    import numpy as np
    import tifffile
    from PIL import Image

    assert invoke(*tiny_args(tiny_sd_dir, tmp_path / "o.tif")).exit_code == 0
    assert invoke(*tiny_args(tiny_sd_dir, tmp_path / "p.png")).exit_code == 0
    with tifffile.TiffFile(tmp_path / "o.tif") as tif:
        page = tif.pages[0]
        assert tif.is_bigtiff and page.is_tiled
        meta = json.loads(page.description)
        pixels = page.asarray()
    assert np.array_equal(pixels, np.asarray(Image.open(tmp_path / "p.png")))
    assert meta["seed"] == json.loads((tmp_path / "o.json").read_text())["seed"]


def test_unwritable_folder(tiny_sd_dir, tmp_path, monkeypatch):
    """Permission bits do not bind root, so the access check itself is made to answer 'no'."""
    import gigadiff.io.files as files

    monkeypatch.setattr(files.os, "access", lambda path, mode: False)
    result = invoke(*tiny_args(tiny_sd_dir, tmp_path / "o.png"))
    assert result.exit_code == 2 and f"folder {tmp_path} is not writable" in result.output


def test_version_and_module_entry_point():
    assert invoke("--version").output.strip() == f"gigadiff {__version__}"
    proc = subprocess.run([sys.executable, "-m", "gigadiff", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"gigadiff {__version__}"
    proc = subprocess.run(
        [sys.executable, "-m", "gigadiff", "generate", "x", "--size", "7x7"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "error:" in proc.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--vae-mode", "quick"], "--vae-mode must be one of auto, exact, fast"),
        (["--vae-memory", "0"], "--vae-memory must lie in (0, 4096], got 0"),
        (["--vae-mode", "fast", "--vae-memory", "0.000001"], "too small for fast tiled VAE"),
        (["--vae-mode", "exact", "--vae-memory", "0.000001"], "too small for this VAE"),
    ],
)
def test_impossible_vae_settings_fail_before_generation(tiny_sd_dir, tmp_path, extra, message):
    result = invoke(*tiny_args(tiny_sd_dir, tmp_path / "o.png", *extra))
    assert result.exit_code == 2 and message in result.output
    assert not list(tmp_path.iterdir())


def test_small_things_a_new_user_meets(tiny_sd_dir, tmp_path):
    """A folder given to metrics, edge continuity on an image not made to tile, the steps an upscale runs, a
    VAE budget too small for a useful tile, and which VAE mode ran."""
    folder = invoke("metrics", str(tmp_path))
    assert folder.exit_code == 2 and f"image {tmp_path} is a folder, not a file" in folder.output
    out = tmp_path / "plain.png"
    result = subprocess.run([sys.executable, "-m", "gigadiff", *tiny_args(tiny_sd_dir, out)[:-1]],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0 and "VAE fast" in result.stderr, result.stderr
    report = invoke("metrics", str(out))
    assert "not made tileable: its opposite edges are not meant to meet" in report.output
    assert "10+: a visible seam" not in report.output
    tiny = invoke(*tiny_args(tiny_sd_dir, tmp_path / "tiny.png"), "--vae-memory", "0.0001")
    assert tiny.exit_code == 2 and "too small for fast tiled VAE: a useful tile" in tiny.output
    assert "give at least" in tiny.output


def test_progress_shows_the_steps_a_late_start_runs_and_every_phase():
    from rich.console import Console

    from gigadiff.progress import RichProgress

    progress = RichProgress(Console(file=open(os.devnull, "w")))  # noqa: SIM115
    progress.loading("sd15")
    assert progress.progress.tasks[0].description == "loading sd15" and progress.progress.tasks[0].total is None
    progress.loaded()
    progress.on_step_start(7, 10, 4, first_step=7)  # an upscale: the last 3 of 10 steps
    task = progress.progress.tasks[0]
    assert task.description == "step 1/3" and task.total == 12
    progress.on_phase("decoding (VAE fast)", 9)
    progress.on_advance(3)
    task = progress.progress.tasks[0]
    assert (task.description, task.total, task.completed) == ("decoding (VAE fast)", 9, 3)
    progress.on_phase("stage 2/3", None)
    progress.on_step_start(0, 4, 6)
    assert progress.progress.tasks[0].description == "stage 2/3 step 1/4"
    assert progress.progress.tasks[0].fields["unit"] == "tiles of 4 steps" and progress.progress.tasks[0].total == 24


def test_progress_shows_no_count_of_an_earlier_phase_and_the_summary_names_every_file(tmp_path):
    from rich.console import Console

    from gigadiff.progress import RichProgress

    console = Console(file=open(os.devnull, "w"), width=120, force_terminal=False)  # noqa: SIM115
    progress = RichProgress(console)
    progress.on_phase("decoding (VAE fast)", 293)
    progress.on_advance(293)
    progress.on_phase("writing heightmap and relief", None)
    (task,) = progress.progress.tasks
    assert task.total is None and task.completed == 0
    with console.capture() as captured:
        console.print(progress.progress.make_tasks_table(progress.progress.tasks))
    line = captured.get()
    assert "writing heightmap and relief" in line and "/293" not in line and "0/" not in line
    out = tmp_path / "map.png"
    result = invoke("generate", "--model", "terrain", "--size", "128x128", "--seed", "1", "-o", str(out))
    assert result.exit_code == 0, result.output
    summary = result.output.strip().splitlines()[-1]
    assert summary.startswith(f"wrote {out}, {tmp_path / 'map.json'}, {tmp_path / 'map.relief.png'} (128x128, seed 1, "
                              "1 step, ")  # fmt: skip
