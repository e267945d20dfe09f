"""Finding models and their families: presets, folders, single-file checkpoints, missing and damaged models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from gigadiff.backends.device import resolve_device, resolve_dtype
from gigadiff.backends.registry import FAMILIES, family_of, find_model, load_backend, presets
from gigadiff.backends.source import ModelSource, cached_snapshot, locate, safetensors_keys
from gigadiff.errors import GigadiffError


def test_loaded_folder_reports_its_family_and_native_size(sd_backend, sdxl_backend):
    assert sd_backend.info.family == "sd" and sdxl_backend.info.family == "sdxl"
    assert sd_backend.info.native_size == 512 and sd_backend.info.vae_scale_factor == 8
    assert sd_backend.info.latent_channels == 4
    assert (sd_backend.info.default_steps, sd_backend.info.default_guidance) == (30, 7.5)
    assert sdxl_backend.info.default_guidance == 5.0
    assert sd_backend.info.fingerprint and sd_backend.info.fingerprint != sdxl_backend.info.fingerprint


def test_a_guidance_distilled_flux_is_told_from_its_config(tiny_flux_schnell_dir):
    """Every family's folder is found in tests/test_families.py; schnell's config (no embedded guidance) gives it
    no guidance and schnell's 4 steps."""
    info = find_model(str(tiny_flux_schnell_dir))[2]
    assert (info.family, info.guidance_kind, info.default_steps) == ("flux", "none", 4)


def test_presets_name_their_family_and_defaults():
    table = presets()
    for name, family in {"sd15": "sd", "sdxl-turbo": "sdxl", "flux-dev": "flux", "flux-schnell": "flux",
                         "flux-krea": "flux", "flux2-dev": "flux2", "flux2-klein": "flux2-klein",
                         "z-image-turbo": "z-image"}.items():  # fmt: skip
        assert table[name][0].name == family
    assert (table["flux-schnell"][1].steps, table["flux-schnell"][1].guidance) == (4, 0.0)
    assert table["z-image-turbo"][1].steps == 9
    assert table["sdxl-turbo"][1].native_size == 512
    assert len({f.name for f in FAMILIES}) == len(FAMILIES)


def test_a_cached_preset_is_described_from_the_hub_cache_layout(tiny_flux_dir, tmp_path, monkeypatch):
    """The cache layout huggingface_hub writes: models--owner--name/refs/main and snapshots/<revision>/."""
    import shutil

    repo = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-schnell"
    shutil.copytree(tiny_flux_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert cached_snapshot("black-forest-labs/FLUX.1-schnell") == repo / "snapshots" / "abc123"
    source, family, info = find_model("flux-schnell")
    assert (source.kind, family.name, info.default_steps, info.default_guidance) == ("preset", "flux", 4, 0.0)


def test_single_files_are_told_apart_by_their_tensor_names(tmp_path):
    """Each family's own names are checked in tests/test_families.py; a prefixed file and a stranger here."""

    def family_of_file(keys):
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.safetensors"
        save_file({k: torch.zeros(1) for k in keys}, str(path))
        return family_of(locate(str(path), (), {})).name

    assert family_of_file(["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]) == "flux"  # ComfyUI's prefix
    with pytest.raises(GigadiffError, match="match no model family"):
        family_of_file(["something.else"])


def test_a_damaged_single_file_is_a_clear_error_before_loading(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(GigadiffError, match=r"is not a readable \.safetensors file"):
        safetensors_keys(bad)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(b"\xff" * 8)
    with pytest.raises(GigadiffError, match="damaged or not safetensors"):
        find_model(str(truncated))


def test_single_file_without_config_fails_clearly(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(ckpt))
    with pytest.raises(GigadiffError, match=r"cannot load checkpoint .* as StableDiffusionPipeline"):
        load_backend(str(ckpt), "cpu")
    with pytest.raises(GigadiffError, match="does not exist"):
        load_backend(str(tmp_path / "absent.safetensors"), "cpu")


def test_a_pipeline_of_no_known_family_is_refused(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, **blocks)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(GigadiffError, match=r"is a DDPMPipeline; gigadiff has no model family for it"):
        load_backend(pipe)
    folder = tmp_path / "ddpm"
    pipe.save_pretrained(folder)
    with pytest.raises(GigadiffError, match=r"DDPMPipeline; gigadiff has no model family for it \(it runs: "):
        find_model(str(folder))


def test_a_folder_with_a_broken_model_index_is_named(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text("{")
    with pytest.raises(GigadiffError, match="is not valid JSON"):
        find_model(str(tmp_path / "m"))
    (tmp_path / "m" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert find_model(str(tmp_path / "m"))[1].name == "flux"


def test_an_object_source_reads_the_pipelines_configs(flux_pipe):
    from gigadiff.backends.source import object_source

    source = object_source(flux_pipe)
    assert isinstance(source, ModelSource) and source.pipeline_class == "FluxPipeline"
    assert source.config("transformer")["guidance_embeds"] is True
    assert source.scheduler_config()["use_dynamic_shifting"] is True


def test_devices_and_dtypes():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(GigadiffError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(GigadiffError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))
    assert resolve_dtype("auto", torch.device("cpu"), "bf16") == torch.float32


@pytest.mark.parametrize(
    ("device", "preferred", "risk", "bf16", "chosen"),
    [
        ("cpu", "bf16", "", True, "fp32"),  # bf16 kernels are slow on the CPU, fp16 ones missing
        ("cpu", "fp16", "", True, "fp32"),
        ("cuda", "fp16", "", True, "fp16"),  # SD, SDXL: as their pipelines run
        ("cuda", "bf16", "overflows", True, "bf16"),  # FLUX, Qwen-Image, SD3
        ("cuda", "bf16", "overflows", False, "fp32"),  # a GPU without bf16: never fp16 for those
        ("cuda", "bf16", "", False, "fp16"),  # PixArt, SANA, Z-Image there
        ("cuda", "fp32", "", True, "fp32"),  # the terrain model's ONNX graph
        ("mps", "fp16", "", True, "fp16"),
    ],
)
def test_auto_dtype_is_what_the_models_pipeline_runs_in_where_the_device_has_it(device, preferred, risk, bf16,
                                                                                   chosen):  # fmt: skip
    from gigadiff.backends.device import auto_dtype

    assert auto_dtype(device, preferred, risk, bf16) == chosen


def test_the_families_declare_their_gpu_dtype_and_fp16_risk():
    from gigadiff.backends.registry import FAMILIES

    declared = {f.name: (f.gpu_dtype, bool(f.fp16_risk)) for f in FAMILIES}
    assert declared["sd"] == declared["sdxl"] == ("fp16", False)
    for name in ("flux", "flux2", "flux2-klein", "qwen-image", "sd3"):
        assert declared[name] == ("bf16", True), name
    assert declared["terrain-consistency"] == ("fp32", False)


def test_text_encoders_wait_off_the_device_while_the_denoiser_runs(tiny_flux_dir):
    """A backend whose text encoders park elsewhere (the host, on a GPU) has them there at every denoiser call,
    and the same image: here they park on the meta device, which keeps no weights, so the run also shows that
    nothing encodes after the prompts were encoded once."""
    from gigadiff.api import generate_result, open_backend

    kw = {"size": "512x256", "steps": 2, "seed": 4, "tile": 256, "overlap": 64, "coherence": "none"}
    plain = generate_result("a red lighthouse", model=open_backend(str(tiny_flux_dir), device="cpu"), **kw)
    backend = open_backend(str(tiny_flux_dir), device="cpu")
    assert len(backend.text_encoders()) == 2  # CLIP and T5
    backend.park_device = "meta"
    seen, forward = [], backend.denoiser.forward

    def spy(*args, **kwargs):
        seen.append({next(m.parameters()).device.type for m in backend.text_encoders()})
        return forward(*args, **kwargs)

    backend.denoiser.forward = spy
    parked = generate_result("a red lighthouse", model=backend, **kw)
    assert seen and all(devices == {"meta"} for devices in seen)
    assert torch.equal(parked.latents, plain.latents)
