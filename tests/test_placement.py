"""Offloaded weights (gigadiff.backends.placement): the same image as with every weight on the device, computed on
the pipeline's execution device (under sequential offloading the denoiser holds `meta` tensors, so a canvas put
on `denoiser.device` could not run at all), the VAE brought whole to the device for its phase, and `auto`'s
choice from the weights' sizes and the free memory.

A run on the CPU never offloads (the weights are in host memory already), so these tests place a pipeline with
diffusers' hooks themselves and pass it in, as a caller with an offloaded pipeline of their own does; the hooks'
execution device is the CPU."""

from __future__ import annotations

import pytest
import torch

from gigadiff.api import generate_result, open_backend, result_image
from gigadiff.backends.placement import Residency, Work, auto_offload, offloading, place, placement
from gigadiff.vae.tiling import VaeTiling

GB = 2**30
RUN = {"prompt": "a lighthouse", "size": "384x256", "tile": 256, "overlap": 64, "steps": 2, "seed": 5}


def offloaded(folder, mode: str):
    """The pipeline in `folder` under `mode`'s hooks, executing on the CPU. (diffusers names the CPU "cpu:0", on
    which accelerate 1.16's layer hooks turn parameters into plain tensors on the way back to `meta`; the hooks
    are given the plain "cpu" a CUDA run's "cuda:0" corresponds to.)"""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    place(pipe, torch.device("cpu"), mode)
    for component in pipe.components.values():
        for module in component.modules() if isinstance(component, torch.nn.Module) else ():
            hook = getattr(module, "_hf_hook", None)
            if getattr(hook, "execution_device", None) == torch.device("cpu:0"):
                hook.execution_device = torch.device("cpu")
    return open_backend(pipe)


@pytest.fixture(scope="module")
def reference(tiny_sd_dir):
    return generate_result(model=open_backend(str(tiny_sd_dir), "cpu"), **RUN).latents


@pytest.mark.parametrize("mode", ["model", "group", "sequential"])
def test_an_offloaded_run_paints_the_image_of_a_run_on_the_device(mode, tiny_sd_dir, reference):
    backend = offloaded(tiny_sd_dir, mode)
    assert offloading(backend.pipe) == mode
    assert backend.device.type == "cpu"
    if mode == "sequential":  # really offloaded: the UNet's weights are not where it computes
        assert next(backend.pipe.unet.parameters()).device.type == "meta"
    result = generate_result(model=backend, **RUN)
    assert torch.equal(result.latents, reference)
    assert result_image(result).size == (384, 256)  # the VAE phase ran under the offload hooks


def test_a_flux_run_under_sequential_offload_equals_the_run_on_the_device(tiny_flux_dir):
    run = {**RUN, "prompt": "a harbour", "size": "256x256"}
    plain = generate_result(model=open_backend(str(tiny_flux_dir), "cpu"), **run)
    hooked = generate_result(model=offloaded(tiny_flux_dir, "sequential"), **run)
    assert torch.equal(hooked.latents, plain.latents)
    assert hooked.backend.info.fingerprint == plain.backend.info.fingerprint  # read from the host copies


def test_model_offload_takes_the_denoiser_off_the_device_before_the_vae_runs(tiny_sd_dir, monkeypatch):
    backend = offloaded(tiny_sd_dir, "model")
    taken_off: list[str] = []
    for hook in backend.pipe._all_hooks:
        name = type(hook.model).__name__
        monkeypatch.setattr(hook, "offload", lambda name=name: taken_off.append(name))
    backend.codec.decode(torch.zeros(1, 4, 8, 8), VaeTiling())
    assert "UNet2DConditionModel" in taken_off
    assert "AutoencoderKL" not in taken_off


def test_the_text_encoders_are_not_parked_by_hand_under_offload_hooks(tiny_sd_dir):
    backend = offloaded(tiny_sd_dir, "model")
    backend.park_text_encoders("cpu")
    assert backend.park_device is None


def test_a_run_on_the_cpu_never_offloads():
    assert placement("sequential", None, torch.device("cpu")) == "none"
    assert placement("auto", None, torch.device("cpu")) == "none"


def held(sizes: dict[str, float]) -> Residency:
    weights = {name: int(size * GB) for name, size in sizes.items()}
    blocks = {name: (size // 40, size // 20) for name, size in weights.items()}
    return Residency(weights, "unet" if "unet" in weights else "transformer", blocks, {n: 0 for n in weights})


@pytest.mark.parametrize(
    ("sizes", "free", "mode"),
    [
        ({"text_encoder": 1, "unet": 5, "vae": 0.25}, 24, "none"),
        ({"text_encoder": 9.5, "text_encoder_2": 0.25, "transformer": 12, "vae": 0.25}, 16, "model"),
        ({"text_encoder": 9.5, "transformer": 23, "vae": 0.25}, 24, "group"),
        ({"text_encoder": 9.5, "transformer": 20.6, "vae": 0}, 24, "model"),
        ({"text_encoder": 9.5, "transformer": 20.61, "vae": 0}, 24, "group"),
    ],
    ids=["SDXL fits", "FLUX fp8 in turn", "FLUX bf16 by blocks", "at the margin", "past the margin"],
)
def test_auto_offloads_the_least_whose_every_phase_fits(sizes, free, mode):
    """One rule for `--offload auto` (planned or not): the first of none, model, group whose phases' peaks,
    weights and work together (here 1 GB of activations while denoising), fit 90% of the free memory."""
    assert auto_offload(held(sizes), Work(denoise=GB), free * GB) == mode


def test_an_unknown_offload_mode_is_refused_before_loading(tiny_sd_dir):
    from typer.testing import CliRunner

    from gigadiff.cli import app

    result = CliRunner().invoke(app, ["generate", "x", "--model", str(tiny_sd_dir), "--offload", "disk"])
    assert result.exit_code == 2
    assert "--offload" in result.output and "sequential" in result.output
