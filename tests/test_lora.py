"""LoRAs (gigadiff.backends.lora): tiny LoRAs made with peft on the tiny models, saved by the pipelines'
`save_lora_weights` (diffusers' layout) and in kohya's; one tile equal to the diffusers pipeline after its
`load_lora_weights` of the same file, with several LoRAs at their scales too; a LoRA of another family refused,
named, before any weights load."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from gigadiff.api import generate_result, open_backend
from gigadiff.cli import app
from tests.helpers.families import CASES, PROMPT, SIZE, STEPS, pipeline_latents

ATTENTION = ("to_q", "to_k", "to_v")
TARGETS = {"sd": (*ATTENTION, "to_out.0"), "sdxl": (*ATTENTION, "to_out.0"), "flux": (*ATTENTION, "proj_out"),
           "qwen-image": (*ATTENTION, "add_q_proj")}  # fmt: skip
FOLDERS = {"sd": "tiny_sd_dir", "sdxl": "tiny_sdxl_dir", "flux": "tiny_flux_dir", "qwen-image": "tiny_qwen_image_dir"}


def loaded(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_lora(folder, family: str, path, seed: int = 0, rank: int = 4):
    """A LoRA of the model in `folder` with random (non-zero) up and down weights, saved to `path` as the
    family's pipeline saves LoRAs."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = loaded(folder)
    component = "unet" if family in ("sd", "sdxl") else "transformer"
    denoiser = copy.deepcopy(getattr(pipe, component))
    torch.manual_seed(seed)
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS[family]),
                                    init_lora_weights=False))  # fmt: skip
    state = {k: v * 0.3 for k, v in get_peft_model_state_dict(denoiser).items()}
    type(pipe).save_lora_weights(str(path.parent), **{f"{component}_lora_layers": state}, weight_name=path.name)
    return path


def as_kohya(path, out, rank: int = 4):
    """A diffusers-layout SD LoRA rewritten in kohya's layout (lora_unet_..._to_q.lora_down.weight, alphas)."""
    kohya = {}
    for key, tensor in load_file(str(path)).items():
        module, _, kind = key.removeprefix("unet.").partition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor
        kohya[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(kohya, str(out))
    return out


def one_tile(folder, family, **loading):
    case = CASES[family]
    return generate_result(PROMPT, model=open_backend(str(folder), "cpu", **loading), size=f"{SIZE}x{SIZE}",
                           steps=STEPS, seed=3, **case.ours)  # fmt: skip


def pipeline_with(folder, family, got, loras):
    case = CASES[family]
    pipe = loaded(folder)
    names = []
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"a{i}")
        names.append(f"a{i}")
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    theirs = pipeline_latents(pipe, case, "default", got.settings.mu)
    return case.to_canvas(theirs, got)


def close(ours, theirs, family):
    return (ours - theirs).abs().max() <= CASES[family].tolerance * max(1.0, float(theirs.abs().max()))


@pytest.mark.parametrize("family", list(FOLDERS))
def test_a_lora_paints_the_tile_its_pipeline_paints_after_load_lora_weights(family, request, tmp_path):
    folder = request.getfixturevalue(FOLDERS[family])
    path = make_lora(folder, family, tmp_path / "style.safetensors")
    got = one_tile(folder, family, loras=(f"{path}:0.8",))
    assert close(got.latents, pipeline_with(folder, family, got, [(path, 0.8)]), family)
    assert not torch.equal(got.latents, one_tile(folder, family).latents)  # the LoRA changed the picture
    record = got.metadata["model_setup"]["loras"]
    assert record[0]["file"] == "style.safetensors" and record[0]["scale"] == 0.8 and record[0]["fused"] is True
    assert len(record[0]["sha256"]) == 64


def test_two_loras_at_their_scales_equal_the_pipelines_adapters(tiny_flux_dir, tmp_path):
    first = make_lora(tiny_flux_dir, "flux", tmp_path / "a.safetensors", seed=1)
    second = make_lora(tiny_flux_dir, "flux", tmp_path / "b.safetensors", seed=2, rank=2)
    got = one_tile(tiny_flux_dir, "flux", loras=(f"{first}:0.7", f"{second}:-0.4"))
    assert close(got.latents, pipeline_with(tiny_flux_dir, "flux", got, [(first, 0.7), (second, -0.4)]), "flux")


def test_a_kohya_lora_loads_as_its_diffusers_twin(tiny_sd_dir, tmp_path):
    path = make_lora(tiny_sd_dir, "sd", tmp_path / "style.safetensors")
    kohya = as_kohya(path, tmp_path / "style-kohya.safetensors")
    ours = one_tile(tiny_sd_dir, "sd", loras=(str(kohya),)).latents
    assert close(ours, one_tile(tiny_sd_dir, "sd", loras=(str(path),)).latents, "sd")


def forbid_weights(monkeypatch):
    """From now on any weight loading fails the test: refusals come before."""
    import diffusers

    def refused(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refused)


def _refused(folder, *args):
    result = CliRunner().invoke(app, ["generate", "a harbour", "--model", str(folder), "--size", "256x256",
                                      "--device", "cpu", *args])  # fmt: skip
    assert result.exit_code == 2, result.output
    return " ".join(result.output.split())


def test_a_lora_of_another_family_is_refused_before_the_weights(tiny_sd_dir, tiny_flux_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sd_lora = make_lora(tiny_sd_dir, "sd", tmp_path / "sd-style.safetensors")
    forbid_weights(monkeypatch)
    out = _refused(tiny_flux_dir, "--lora", str(sd_lora), "-o", "a.png")
    assert "--lora sd-style.safetensors is not a LoRA of model" in out


def test_models_without_a_lora_loader_and_missing_files_are_refused(tiny_pixart_dir, tiny_sd_dir, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    forbid_weights(monkeypatch)
    lora = tmp_path / "x.safetensors"
    save_file({"unet.a.lora_A.weight": torch.zeros(1, 1)}, str(lora))
    assert "takes no LoRAs" in _refused(tiny_pixart_dir, "--lora", str(lora), "-o", "a.png")
    assert "--lora file absent.safetensors does not exist" in _refused(tiny_sd_dir, "--lora", "absent.safetensors")
    assert "scale 40 must lie in [-10, 10]" in _refused(tiny_sd_dir, "--lora", f"{lora}:40")


def test_the_cli_takes_repeated_loras_and_records_them(tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = make_lora(tiny_sd_dir, "sd", tmp_path / "a.safetensors", seed=1)
    second = make_lora(tiny_sd_dir, "sd", tmp_path / "b.safetensors", seed=2)
    result = CliRunner().invoke(app, ["generate", "a harbour", "--model", str(tiny_sd_dir), "--size", "128x128",
                                      "--steps", "1", "--device", "cpu", "--lora", f"{first}:0.5", "--lora",
                                      str(second), "-o", "a.png", "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "a.json").read_text())
    assert [(r["file"], r["scale"]) for r in meta["model_setup"]["loras"]] == [("a.safetensors", 0.5),
                                                                              ("b.safetensors", 1.0)]  # fmt: skip
    assert meta["request"]["lora"] == [f"{first}:0.5", str(second)]
    report = CliRunner().invoke(app, ["metrics", "a.png"])
    assert report.exit_code == 0, report.output
    assert "made with: model " in report.output and "(fp32, offload none)" in report.output
    assert "LoRAs a.safetensors x0.5, b.safetensors x1" in report.output
