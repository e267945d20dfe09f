"""`--compile` and `--attention` (gigadiff.backends.speed): the same image as the eager run with the model's own
attention, within the family's tolerance; recorded in the metadata; refused before any weights load where they
cannot apply."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from gigadiff.api import generate_result, open_backend
from gigadiff.cli import app
from tests.helpers.families import CASES, PROMPT

RUN = {"size": "256x256", "steps": 2, "seed": 4, **CASES["flux"].ours}


@pytest.fixture(scope="module")
def eager(tiny_flux_dir):
    return generate_result(PROMPT, model=open_backend(str(tiny_flux_dir), "cpu"), **RUN)


def test_an_attention_backend_paints_the_image_of_the_models_own(tiny_flux_dir, eager):
    backend = open_backend(str(tiny_flux_dir), "cpu", attention="_native_math")
    processors = [m.processor for m in backend.denoiser.modules() if hasattr(m, "processor")]
    assert processors and all(getattr(p._attention_backend, "value", None) == "_native_math" for p in processors)
    got = generate_result(PROMPT, model=backend, **RUN)
    assert (got.latents - eager.latents).abs().max() <= 1e-4 * max(1.0, float(eager.latents.abs().max()))
    assert got.metadata["model_setup"]["attention"] == "_native_math"


@pytest.mark.slow
def test_compiled_blocks_paint_the_image_of_the_eager_model(tiny_flux_dir, eager):
    backend = open_backend(str(tiny_flux_dir), "cpu", compile=True)
    blocks = [m for m in backend.denoiser.modules() if type(m).__name__ in backend.denoiser._repeated_blocks]
    assert blocks and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    got = generate_result(PROMPT, model=backend, **RUN)
    assert (got.latents - eager.latents).abs().max() <= 1e-4 * max(1.0, float(eager.latents.abs().max()))
    assert got.metadata["model_setup"]["compile"] is True


def test_blocks_are_found_where_a_denoiser_declares_none():
    from gigadiff.backends.speed import compile_denoiser

    class Block(torch.nn.Linear):
        pass

    class Denoiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_in = torch.nn.Linear(4, 4)
            self.transformer_blocks = torch.nn.ModuleList([Block(4, 4), Block(4, 4)])

    denoiser = Denoiser()
    assert compile_denoiser(denoiser) == 2
    assert getattr(denoiser.proj_in, "_compiled_call_impl", None) is None


@pytest.fixture
def no_weights(monkeypatch):
    import diffusers

    def loaded(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", loaded)


@pytest.mark.parametrize(
    ("model", "args", "message"),
    [
        ("tiny_sd_dir", ("--attention", "native"), "attention calls PyTorch's directly"),
        ("tiny_flux_dir", ("--attention", "flash"), "--attention flash:"),
        ("tiny_flux_dir", ("--attention", "quantum"), "--attention"),
    ],
    ids=["a UNet", "flash-attn not installed", "unknown"],
)
def test_an_attention_backend_that_cannot_run_is_refused_before_the_weights(model, args, message, request,
                                                                            no_weights, tmp_path):  # fmt: skip
    folder = request.getfixturevalue(model)
    result = CliRunner().invoke(app, ["generate", "x", "--model", str(folder), "--size", "256x256", "--device",
                                      "cpu", "-o", str(tmp_path / "a.png"), *args])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
