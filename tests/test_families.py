"""The contract every registered model family keeps, run on each family's tiny pipeline (tests/helpers/families.py):
found from its config files; one tile equal to its diffusers pipeline (its own scheduler and a multistep solver,
fp32 and bf16); the same image whatever the tile batch and the number of processes; resumed to the same latents;
img2img, regions and tileable output; its refusals before any weights load."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from gigadiff.api import generate_result, open_backend, resume_result
from gigadiff.backends.registry import FAMILIES, family_of, find_model
from gigadiff.backends.source import locate
from gigadiff.cli import app
from tests.helpers.families import CASES, PROMPT, SIZE, STEPS, Case, pipeline_latents

PIPELINES = [name for name, case in CASES.items() if case.build is not None]
_SAVED: dict[str, object] = {}
_LOADED: dict[tuple[str, str], object] = {}


@pytest.fixture
def case(request, tmp_path_factory) -> Case:
    return CASES[request.param]


def folder(name: str, tmp_path_factory) -> object:
    """The family's tiny pipeline saved like a hub model (once per session)."""
    from tests.helpers.tiny import save_tiny

    if name not in _SAVED:
        build = CASES[name].build
        assert build is not None
        _SAVED[name] = save_tiny(build(), tmp_path_factory.mktemp("families") / name)
    return _SAVED[name]


def pipeline(name: str, tmp_path_factory, dtype: str = "fp32") -> object:
    """The saved pipeline loaded back as a user's model loads (once per session and dtype)."""
    from diffusers import DiffusionPipeline

    if (name, dtype) not in _LOADED:
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        pipe = DiffusionPipeline.from_pretrained(folder(name, tmp_path_factory), dtype=torch_dtype,
                                                 local_files_only=True)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        _LOADED[name, dtype] = pipe
    return _LOADED[name, dtype]


def backend(name: str, tmp_path_factory) -> object:
    return open_backend(pipeline(name, tmp_path_factory))


def test_every_registered_family_has_a_contract_case():
    assert {family.name for family in FAMILIES} == set(CASES)


@pytest.mark.parametrize("name", PIPELINES)
def test_a_family_is_found_from_its_config_files(name, tmp_path_factory, tmp_path):
    case = CASES[name]
    _, family, info = find_model(str(folder(name, tmp_path_factory)))
    assert family.name == name
    assert {key: getattr(info, key) for key in case.facts} == case.facts
    if case.single_file_keys:
        path = tmp_path / "model.safetensors"
        save_file({key: torch.zeros(1) for key in case.single_file_keys}, str(path))
        assert family_of(locate(str(path), (), {})).name == name


def _scale(x: torch.Tensor) -> float:
    return max(1.0, float(x.abs().max()))


@pytest.mark.parametrize("scheduler_index", [0, 1], ids=["own scheduler", "multistep"])
@pytest.mark.parametrize("name", PIPELINES)
def test_one_tile_equals_its_pipeline_in_fp32(name, scheduler_index, tmp_path_factory):
    case = CASES[name]
    scheduler = case.schedulers[scheduler_index]
    pipe = pipeline(name, tmp_path_factory)
    got = generate_result(PROMPT, model=pipe, size=f"{SIZE}x{SIZE}", steps=STEPS, seed=3, scheduler=scheduler,
                          **case.ours)  # fmt: skip
    assert got.run.tiles_per_step == 1
    theirs = pipeline_latents(pipe, case, scheduler, got.settings.mu)
    ours = got.backend.codec.to_vae(got.latents) if case.canvas_to_theirs else got.latents
    theirs = theirs if case.canvas_to_theirs else case.to_canvas(theirs, got)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= case.tolerance * _scale(theirs)


@pytest.mark.parametrize("name", PIPELINES)
def test_one_tile_equals_its_pipeline_in_bf16(name, tmp_path_factory):
    """The pipeline in bf16 as the reference: gigadiff in bf16 is at least as close to it as the pipeline's own
    bf16 run is to its fp32 run, times 2 (gigadiff keeps the canvas in fp32 where the pipeline keeps bf16
    latents; both see the same bf16 model)."""
    case = CASES[name]
    pipe16, pipe32 = pipeline(name, tmp_path_factory, "bf16"), pipeline(name, tmp_path_factory)
    got = generate_result(PROMPT, model=pipe16, size=f"{SIZE}x{SIZE}", steps=STEPS, seed=3, **case.ours)
    assert got.backend.dtype == torch.bfloat16
    theirs16 = pipeline_latents(pipe16, case, "default", got.settings.mu)
    theirs32 = pipeline_latents(pipe32, case, "default", got.settings.mu)
    ours = got.backend.codec.to_vae(got.latents) if case.canvas_to_theirs else got.latents
    if not case.canvas_to_theirs:
        theirs16, theirs32 = case.to_canvas(theirs16, got), case.to_canvas(theirs32, got)
    bf16_error = float((theirs16 - theirs32).abs().max())
    assert bf16_error > 0  # bf16 really ran
    assert (ours - theirs16).abs().max() <= max(2 * bf16_error, 1e-3 * _scale(theirs16))


def _run(name, tmp_path_factory, **fields):
    """A tiled run (512x256 in three 256-px tiles) of the family's model with the case's guidance."""
    defaults = {"prompt": PROMPT, "size": "512x256", "steps": 2, "seed": 2, "tile": 256, "overlap": 64,
                **CASES[name].ours}  # fmt: skip
    return generate_result(model=backend(name, tmp_path_factory), **{**defaults, **fields})


@pytest.mark.parametrize("name", PIPELINES)
def test_the_tile_batch_changes_nothing_but_rounding(name, tmp_path_factory):
    """Same tiles, same fusion order: calls of 1 and of 3 tiles differ only by the kernels' float32 blocking."""
    one, three = (_run(name, tmp_path_factory, tile_batch=n).latents for n in (1, 3))
    assert _run(name, tmp_path_factory, tile_batch=3).run.tiles_per_step == 3
    assert (one - three).abs().max() <= 1e-4 * _scale(one)


@pytest.mark.parametrize("name", PIPELINES)
def test_every_number_of_processes_computes_the_same_predictions(name, tmp_path_factory):
    """Each rank's share of a step (gigadiff.executors.distributed.rank_predictions, what a torchrun rank computes
    before the exchange), put together in rank order, is bit for bit the single process's step, for 1-3 ranks,
    with the passes of classifier-free guidance split between ranks too."""
    from gigadiff.executors.distributed import rank_predictions
    from gigadiff.executors.local import LocalExecutor
    from gigadiff.geometry import GridPlan

    model = backend(name, tmp_path_factory)
    cond = model.condition(PROMPT, CASES[name].ours.get("negative", ""), CASES[name].ours.get("guidance"),
                           (256, 512), {})  # fmt: skip
    unit = model.info.latent_multiple
    f = model.info.vae_scale_factor
    grid = GridPlan(256 // f, 512 // f, tile=256 // f, overlap=64 // f, shifted=False, unit=unit).grid(0)
    canvas = torch.randn(1, model.info.latent_channels, 256 // f, 512 // f, generator=torch.Generator().manual_seed(0))
    t = model.scheduler("default", STEPS, None, 0.5 if model.info.scheduler_kind == "flow" else None).timesteps[0]
    single = torch.cat([b.predictions for b in LocalExecutor(2).predictions(model, canvas, t, cond, grid)])
    for world in (1, 2, 3):
        parts = [rank_predictions(model, canvas, t, cond, grid, 2, rank, world)[1] for rank in range(world)]
        assert torch.equal(torch.cat(parts), single), world
    if model.branches(cond) == 2:
        from gigadiff.executors.distributed import combined

        parts = [rank_predictions(model, canvas, t, cond, grid, 2, rank, 2, split=True)[1] for rank in range(2)]
        split = combined(model, torch.cat(parts), cond, len(grid), True)
        assert (split - single).abs().max() <= 1e-4 * _scale(single)  # passes in calls of their own


@pytest.mark.parametrize("name", PIPELINES)
def test_an_interrupted_run_resumes_to_the_same_latents(name, tmp_path_factory, tmp_path):
    from gigadiff.checkpoint import load_checkpoint
    from tests.test_checkpoint import interrupted

    model = backend(name, tmp_path_factory)
    fields = {"prompt": PROMPT, "size": "512x256", "steps": 4, "seed": 2, "tile": 256, "overlap": 64,
              **CASES[name].ours}  # fmt: skip
    full = generate_result(model=model, **fields).latents
    path = tmp_path / "run.ckpt.safetensors"
    interrupted(model, path, **fields)
    assert load_checkpoint(path).step == 2
    assert torch.equal(resume_result(path, model=model).latents, full)


@pytest.mark.parametrize("name", PIPELINES)
def test_img2img_runs_the_last_steps_of_the_schedule_from_the_image(name, tmp_path_factory, tmp_path):
    from PIL import Image

    photo = tmp_path / "p.png"
    Image.effect_noise((512, 256), 40).convert("RGB").save(photo)
    result = _run(name, tmp_path_factory, init=str(photo), strength=0.5, steps=4)
    assert result.run.steps.first == 2 and result.settings.init == str(photo)
    assert result.latents.shape == _run(name, tmp_path_factory).latents.shape and torch.isfinite(result.latents).all()


@pytest.mark.parametrize("name", PIPELINES)
def test_a_region_over_the_whole_canvas_is_a_run_with_its_prompt(name, tmp_path_factory):
    """The background is then left with its floor weight everywhere, so it is skipped: the same latents."""
    plain = _run(name, tmp_path_factory, prompt="a barn")
    negative = CASES[name].ours.get("negative", "")
    regional = _run(
        name, tmp_path_factory, regions=[{"box": [0, 0, 1, 1], "prompt": "a barn", "negative_prompt": negative}]
    )
    assert torch.equal(regional.latents, plain.latents)
    half = _run(name, tmp_path_factory, regions=[{"box": [0, 0, 0.5, 1], "prompt": "a barn"}]).latents
    assert not torch.equal(half, plain.latents)


@pytest.mark.parametrize("name", PIPELINES)
def test_a_wrapped_canvas_has_no_edges(name, tmp_path_factory):
    """On a ring every window sees what its neighbour saw before the roll: rolling the noise by one window spacing
    rolls the fused prediction (not so on a clamped canvas, checked too)."""
    from gigadiff.executors.local import LocalExecutor
    from gigadiff.geometry import GridPlan
    from gigadiff.sampler import CanvasDenoiser

    if CASES[name].placed:
        pytest.skip(f"{name}: {CASES[name].placed}")
    model = backend(name, tmp_path_factory)
    cond = model.condition(PROMPT, "", CASES[name].ours.get("guidance"), (256, 384), {})
    f, unit = model.info.vae_scale_factor, model.info.latent_multiple
    h, w, tile = 256 // f, 384 // f, 256 // f
    x = torch.randn(1, model.info.latent_channels, h, w, generator=torch.Generator().manual_seed(0))
    t = model.scheduler("default", STEPS, None, 0.5 if model.info.scheduler_kind == "flow" else None).timesteps[1]

    def fused(canvas: torch.Tensor, wrap: tuple[bool, bool]) -> torch.Tensor:
        plan = GridPlan(h, w, tile, overlap=tile // 4, shifted=False, wrap=wrap, unit=unit)  # 2 windows a ring
        grid = plan.grid(0)
        return CanvasDenoiser(model, cond, LocalExecutor(2), plan, "gaussian")(canvas, t, 0, grid, _Quiet())

    spacing = w // 2  # a ring of two windows
    ring = fused(x, (False, True))
    assert (fused(x.roll(spacing, dims=3), (False, True)) - ring.roll(spacing, dims=3)).abs().max() <= 1e-4 * _scale(
        ring
    )
    flat = fused(x, (False, False))
    assert (fused(x.roll(spacing, dims=3), (False, False)) - flat.roll(spacing, dims=3)).abs().max() > 1e-2


class _Quiet:
    def on_tiles_done(self, count: int) -> None:
        pass


@pytest.mark.parametrize("name", list(CASES))
def test_a_familys_refusals_come_before_any_weights(name, tmp_path_factory, tmp_path, monkeypatch):
    """Each refusal is one line, exit code 2, and no weights were read (loading fails the test)."""
    from gigadiff.backends.family import Family

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(Family, "load", no_weights)
    model = "terrain" if CASES[name].build is None else str(folder(name, tmp_path_factory))
    for args, message in CASES[name].refusals:
        result = CliRunner().invoke(app, ["generate", *(["x"] if CASES[name].build else []), "--model", model,
                                          "-o", str(tmp_path / "o.png"), "-q", *args])  # fmt: skip
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert result.output.count("\n") == 1 and result.output.startswith("error: ")


IMG2IMG = [name for name, case in CASES.items() if case.img2img]


@pytest.mark.parametrize("name", IMG2IMG)
def test_img2img_on_one_tile_equals_its_img2img_pipeline(name, tmp_path_factory, tmp_path):
    """The init image encoded (a posterior sample where the pipeline draws one, from the same generator, before
    the noise), noised to the step the pipeline's own strength rule starts at (4 steps at 0.6: the DDPM pipelines
    run 2, the flow ones 3), then the remaining steps."""
    import diffusers
    from PIL import Image

    case = CASES[name]
    photo = tmp_path / "p.png"
    Image.effect_noise((SIZE, SIZE), 60).convert("RGB").save(photo)
    pipe = pipeline(name, tmp_path_factory)
    got = generate_result(PROMPT, model=pipe, init=str(photo), strength=0.6, steps=4, seed=3, **case.ours)
    flow = got.info.scheduler_kind == "flow"
    assert got.run.steps.first == (1 if flow else 2)
    img2img = getattr(diffusers, case.img2img).from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    with Image.open(photo) as image:
        theirs = pipeline_latents(img2img, case, "default", got.settings.mu, steps=4, image=image.convert("RGB"),
                                  strength=0.6)  # fmt: skip
    theirs = case.to_canvas(theirs, got)
    assert (got.latents - theirs).abs().max() <= 1e-3 * _scale(theirs)
