"""Model loading: presets, folders, single-file checkpoints, and what happens when a model is missing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from gigadiff.backends.device import resolve_device, resolve_dtype
from gigadiff.backends.loading import _is_sdxl_checkpoint, backend_for_pipeline, load_backend
from gigadiff.errors import GigadiffError


def test_loaded_folder_reports_its_family_and_native_size(sd_backend, sdxl_backend):
    assert sd_backend.info.family == "sd" and sdxl_backend.info.family == "sdxl"
    assert sd_backend.info.native_size == 512 and sd_backend.info.vae_scale_factor == 8
    assert sd_backend.info.latent_channels == 4
    assert (sd_backend.info.default_steps, sd_backend.info.default_guidance) == (30, 7.5)
    assert sdxl_backend.info.default_guidance == 5.0


def test_preset_defaults_apply(monkeypatch, sd_pipe):
    import gigadiff.backends.loading as loading

    monkeypatch.setattr(loading, "_load_pretrained", lambda source, dtype, model: sd_pipe)
    backend = load_backend("sdxl-turbo", "cpu")
    assert (backend.info.default_steps, backend.info.default_guidance, backend.info.native_size) == (4, 0.0, 512)


def test_sdxl_checkpoints_are_told_apart(tmp_path):
    xl, sd = tmp_path / "xl.safetensors", tmp_path / "sd.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, str(xl))
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(sd))
    assert _is_sdxl_checkpoint(xl) and not _is_sdxl_checkpoint(sd)


def test_single_file_without_config_fails_clearly(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(ckpt))
    with pytest.raises(GigadiffError, match=r"cannot load checkpoint .* as StableDiffusionPipeline"):
        load_backend(str(ckpt), "cpu")
    with pytest.raises(GigadiffError, match="does not exist"):
        load_backend(str(tmp_path / "absent.safetensors"), "cpu")


def test_a_pipeline_without_unet_and_vae_is_refused():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, **blocks)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(GigadiffError, match=r"DDPMPipeline.*Stable Diffusion 1\.x/2\.x and SDXL"):
        backend_for_pipeline(pipe)


def test_devices_and_dtypes():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(GigadiffError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(GigadiffError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))
