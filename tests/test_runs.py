"""The run layer: one request type for the CLI and the API, checks before torch is imported, recorded runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from gigadiff.api import generate, generate_result
from gigadiff.errors import GigadiffError
from gigadiff.io.writers import read_latent, read_png_metadata
from gigadiff.options import FIELD_NAMES, RunRequest
from gigadiff.runs.resolve import resolve
from tests.test_cli import invoke

FRESH = """
import sys, time
started = time.perf_counter()
from gigadiff import cli
from gigadiff.cli import main
def leave(code):  # the command line leaves with os._exit; here the modules must be looked at first
    raise SystemExit(code)
cli._exit = leave
sys.argv = ["gigadiff", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    code = e.code
print(f"torch imported: {'torch' in sys.modules}; diffusers imported: {'diffusers' in sys.modules}", file=sys.stderr)
sys.exit(code)
"""


def fresh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FRESH, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["x", "--size", "100x100"], "--size: width 100 is not a multiple of 8"),
        (["x", "--size", "0x512"], "--size: width must be positive"),
        (["x", "--model", "flux-dev", "--scheduler", "ddim"], "model 'flux-dev' is a flow-matching model; choose"),
        (["x", "--model", "flux-dev"], "cannot load model flux-dev (black-forest-labs/FLUX.1-dev)"),
        (["x", "--tile-batch", "0"], "--tile-batch must be between 1 and 64"),
        (["x", "--model", "nobody/nothing"], "not in the local Hugging Face cache"),
    ],
)
def test_errors_before_a_model_loads_do_not_import_torch(args, message, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    proc = fresh("generate", *args, "-o", str(tmp_path / "o.png"))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "torch imported: False; diffusers imported: False" in proc.stderr


def test_model_checks_come_from_its_config_files_before_torch(tiny_flux_dir, tmp_path):
    for args, message in [
        (["--size", "1000x1024"], "width 1000 is not a multiple of 16 (its VAE factor 8 x 2x2 token patches)"),
        (["--scheduler", "ddim"], "--scheduler 'ddim' has no flow-matching form"),
        (["--guidance-rescale", "0.5", "--positions", "diagonal"], "--positions must be one of local, global"),
        (["--tile", "520"], "must be multiples of 16"),
    ]:
        proc = fresh("generate", "x", "--model", str(tiny_flux_dir), "-o", str(tmp_path / "o.png"), *args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "torch imported: False" in proc.stderr


def test_fp16_for_a_model_that_overflows_in_it_is_refused_before_torch_unless_allowed(tiny_flux_dir, tmp_path):
    base = ["generate", "x", "--model", str(tiny_flux_dir), "-o", str(tmp_path / "o.png"), "--dtype", "fp16"]
    proc = fresh(*base)
    assert proc.returncode == 2 and "torch imported: False" in proc.stderr, proc.stderr
    assert "--dtype fp16: FLUX.1's activations overflow fp16" in proc.stderr and "--allow-fp16" in proc.stderr
    allowed = fresh(*base, "--allow-fp16", "--size", "100x100")  # past that check: the next error is the size's
    assert allowed.returncode == 2 and "--size: width 100" in allowed.stderr, allowed.stderr
    terrain = fresh("generate", "--model", "terrain", "--dtype", "bf16", "-o", str(tmp_path / "t.png"))
    assert terrain.returncode == 2 and "model 'terrain' runs in fp32 only" in terrain.stderr


def test_version_and_help_need_no_torch():
    for args in (["--version"], ["--help"], ["generate", "--help"], ["upscale", "--help"]):
        proc = fresh(*args)
        assert proc.returncode == 0 and "torch imported: False" in proc.stderr, proc.stderr


def test_a_damaged_single_file_model_is_refused_with_exit_code_2(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 64)
    result = invoke("generate", "x", "--model", str(bad), "-o", str(tmp_path / "o.png"))
    assert result.exit_code == 2 and "is not a readable .safetensors file" in result.output


def test_every_cli_option_is_a_request_field_and_the_reverse():
    import typer.main

    from gigadiff.cli import app

    click_app = typer.main.get_command(app)
    assert set(click_app.commands) >= {"generate", "upscale", "resume", "metrics"}
    generate_params = {p.name for p in click_app.commands["generate"].params}
    upscale_params = {p.name for p in click_app.commands["upscale"].params}
    assert generate_params | upscale_params == set(FIELD_NAMES)


def test_the_api_and_the_cli_give_the_same_image_and_the_same_errors(tiny_sd_dir, tmp_path):
    out = tmp_path / "cli.png"
    args = ["generate", "a small house", "--model", str(tiny_sd_dir), "--size", "768x512", "--steps", "2", "--seed",
            "5", "--tile", "256", "--overlap", "64", "--scheduler", "euler", "--negative", "fog", "-q", "-o",
            str(out), "--save-latent", str(tmp_path / "cli.safetensors")]  # fmt: skip
    assert invoke(*args).exit_code == 0
    latents = generate("a small house", model=str(tiny_sd_dir), size="768x512", steps=2, seed=5, tile=256,
                       overlap=64, scheduler="euler", negative="fog", output_type="latent")  # fmt: skip
    assert torch.equal(latents, read_latent(tmp_path / "cli.safetensors")[0])
    image = generate("a small house", model=str(tiny_sd_dir), size="768x512", steps=2, seed=5, tile=256, overlap=64,
                     scheduler="euler", negative="fog", output=str(tmp_path / "api.png"))  # fmt: skip
    cli_meta, api_meta = read_png_metadata(out), read_png_metadata(tmp_path / "api.png")
    for key in ("seed", "steps", "tile", "overlap", "scheduler", "settings"):
        assert cli_meta[key] == api_meta[key]
    assert json.loads(image.info["gigadiff"])["settings"] == cli_meta["settings"]  # the returned image's, the CLI's
    assert "Steps: 2, Sampler: euler" in image.info["parameters"]
    assert (api_meta["request"].keys() == cli_meta["request"].keys()) and api_meta["request"]["save_latent"] is None
    for bad, field in [({"tile_batch": 0}, "--tile-batch"), ({"overlap": 300, "tile": 256}, "--overlap")]:
        with pytest.raises(GigadiffError) as api_error:
            generate("x", model=str(tiny_sd_dir), **bad)
        options = [x for k, v in bad.items() for x in (f"--{k.replace('_', '-')}", str(v))]
        cli = invoke("generate", "x", "--model", str(tiny_sd_dir), *options)
        assert cli.exit_code == 2
        assert cli.output.strip() == "error: " + api_error.value.render(lambda f: "--" + f.replace("_", "-"))
        assert field in cli.output and field.lstrip("-").replace("-", "_") in str(api_error.value)


def test_the_api_takes_regions_and_vae_options(tiny_sd_dir):
    result = generate_result("a meadow", model=str(tiny_sd_dir), size="768x512", steps=2, seed=3, tile=256,
                             overlap=64, vae_mode="fast", vae_memory=0.5,
                             regions=[{"box": [0, 0, 0.5, 1], "prompt": "a barn"}])  # fmt: skip
    assert result.vae.mode == "fast" and result.vae.memory_gb == 0.5 and result.settings.regions
    with pytest.raises(GigadiffError, match=r"unknown option\(s\) negative_prompt"):
        generate("x", model=str(tiny_sd_dir), negative_prompt="fog")
    with pytest.raises(GigadiffError, match="tile_batch must be int or null"):
        generate("x", model=str(tiny_sd_dir), tile_batch="four")


def test_a_request_round_trips_through_its_record(tiny_sd_dir, tmp_path):
    run = resolve(RunRequest(prompt="x", model=str(tiny_sd_dir), output=str(tmp_path / "o.png"), size="1024x512"))
    record = run.record()
    assert json.loads(json.dumps(record)) == record
    again = resolve(RunRequest.from_dict(record))
    assert again.settings == run.settings and again.outputs == run.outputs and again.vae == run.vae
    with pytest.raises(GigadiffError, match=r"unknown option\(s\) colour"):
        RunRequest.from_dict({**record, "colour": "red"})


def test_preview_is_a_small_png_rewritten_every_step(tiny_sd_dir, tmp_path):
    preview = tmp_path / "preview.png"
    seen = []

    class Watch:
        def on_step_start(self, *a):
            pass

        def on_tiles_done(self, n):
            pass

        def on_step_end(self, step, latents):
            # the preview writer hears each step before the caller's listener
            seen.append((preview.read_bytes(), preview.stat().st_mtime_ns))

    generate("x", model=str(tiny_sd_dir), size="1024x512", steps=3, seed=1, tile=256, overlap=64,
             preview=str(preview), listener=Watch())  # fmt: skip
    with Image.open(preview) as im:
        assert im.size == (128, 64) and im.mode == "RGB"  # one pixel per latent pixel here
    assert len(seen) == 3 and len({data for data, _ in seen}) == 3  # a new preview after every step
    times = [t for _, t in seen]
    assert times == sorted(times) and len(set(times)) == 3


def test_preview_projection_matches_the_vaes_colours(tiny_sd_dir):
    """The projection is the VAE's own linear response: a flat canvas previews as the decode of that canvas."""
    from gigadiff.api import open_backend
    from gigadiff.vae.tiling import VaeTiling

    backend = open_backend(str(tiny_sd_dir), device="cpu")
    flat = torch.zeros(1, 4, 16, 16)
    flat[:, 1] = 0.5
    decoded = backend.codec.decode(flat, VaeTiling())[..., 32:96, 32:96].mean(dim=(2, 3))[0]
    preview = torch.from_numpy(backend.codec.preview(flat, 64)).float().mean(dim=(0, 1)) / 127.5 - 1
    assert (preview - decoded).abs().max() < 0.05


def test_metrics_rebuilds_the_grids_that_ran(tiny_sd_dir, tmp_path):
    """An img2img run starts late; its metadata says so, and the rebuilt borders are those of its steps."""
    from gigadiff.grids import StepRange, run_grids
    from gigadiff.metrics import grid_borders
    from gigadiff.report import borders_from_metadata

    photo = tmp_path / "p.png"
    Image.effect_noise((768, 512), 40).convert("RGB").save(photo)
    out = tmp_path / "i.png"
    result = generate_result("x", model=str(tiny_sd_dir), init=str(photo), strength=0.5, steps=6, seed=3, tile=256,
                             overlap=64, output=str(out))  # fmt: skip
    assert result.run.steps == StepRange(3, 6)
    meta = read_png_metadata(out)
    expected = grid_borders(run_grids(result.settings, result.backend.info, StepRange(3, 6)), scale=8)
    assert borders_from_metadata(meta) == expected
    assert borders_from_metadata(meta) != grid_borders(run_grids(result.settings, result.backend.info,
                                                                 StepRange(0, 6)), scale=8)  # fmt: skip


def test_metrics_rebuilds_terrains_grids_with_its_rims(tmp_path):
    pytest.importorskip("terrain_diffusion")
    from gigadiff.grids import border_pad, grid_plan
    from gigadiff.metrics import grid_borders
    from gigadiff.report import borders_from_metadata

    out = tmp_path / "t.png"
    result = generate_result(model="terrain", size="512x512", overlap=32, seed=1, output=str(out))
    info = result.backend.info
    plan = grid_plan(result.settings, info)
    assert plan.rim_overlap == 16
    pad, f = border_pad(result.settings, info)[0], info.vae_scale_factor  # the canvas is padded on every side
    assert pad > 0 and plan.height == 512 // f + 2 * pad
    rows, cols = grid_borders([plan.grid(i) for i in range(result.run.steps.count)], scale=f)
    ran = ([r - pad * f for r in rows if 0 < r - pad * f < 512], [c - pad * f for c in cols if 0 < c - pad * f < 512])
    assert borders_from_metadata(json.loads(out.with_suffix(".json").read_text())) == ran


def test_the_cli_answers_a_bad_size_before_torch_could_even_be_imported():
    """In less time than `import torch` alone takes in a fresh process (measured here, side by side; about a
    fifth of it, bench/startup.py)."""
    started = time.perf_counter()
    proc = fresh("generate", "x", "--size", "100x100")
    elapsed = time.perf_counter() - started
    assert proc.returncode == 2 and "not a multiple of 8" in proc.stderr
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    torch_alone = time.perf_counter() - started
    assert elapsed < torch_alone, (elapsed, torch_alone)


@pytest.mark.slow
def test_generate_args_are_the_command_line_of_request_fields():
    from gigadiff.options import generate_args

    args = generate_args({"prompt": "a bay", "size": "512x256", "tile_batch": 2, "shift": False, "level_sync": True,
                          "regions": "farm.json", "seed": None})  # fmt: skip
    assert args == ["generate", "a bay", "--size", "512x256", "--tile-batch", "2", "--no-shift", "--level-sync",
                    "--regions", "farm.json"]  # fmt: skip
    with pytest.raises(ValueError, match="regions: the command line takes this as a file"):
        generate_args({"regions": {"regions": []}})
