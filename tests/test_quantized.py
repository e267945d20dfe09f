"""Quantized denoisers (gigadiff.backends.quantized): a GGUF file beside a diffusers model and on-the-fly int8
weights paint one tile as the diffusers pipeline does given the same quantized transformer; the metadata says
what ran; what cannot run is refused with its reason before any weights load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from gigadiff.api import generate_result, open_backend
from gigadiff.cli import app
from gigadiff.options import RunRequest
from tests.helpers.families import CASES, PROMPT, SIZE, STEPS, pipeline_latents

FLUX = CASES["flux"]


def write_gguf(transformer, path, quant_type: str) -> None:
    """The transformer's weights in a GGUF file, as llama.cpp's tools write one: 2-D weights whose rows fill whole
    blocks in `quant_type`, the rest (norms, biases, odd shapes) in F32. Its tensor names are diffusers' own,
    which diffusers loads without converting (real files carry the original names, which it converts)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[quant_type]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    writer = gguf.GGUFWriter(str(path), "flux")
    for name, tensor in transformer.state_dict().items():
        data = tensor.float().numpy()
        if data.ndim == 2 and data.shape[-1] % block == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def diffusers_pipeline(folder, **transformer_kwargs):
    """FluxPipeline from `folder` with its transformer loaded by diffusers as `transformer_kwargs` say."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    source = transformer_kwargs.pop("file", None)
    if source is not None:
        transformer = FluxTransformer2DModel.from_single_file(source, config=str(folder), subfolder="transformer",
                                                              **transformer_kwargs)  # fmt: skip
    else:
        transformer = FluxTransformer2DModel.from_pretrained(str(folder), subfolder="transformer", **transformer_kwargs)
    pipe = FluxPipeline.from_pretrained(str(folder), transformer=transformer, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def one_tile(backend):
    return generate_result(PROMPT, model=backend, size=f"{SIZE}x{SIZE}", steps=STEPS, seed=3, **FLUX.ours)


@pytest.mark.parametrize("quant_type", ["Q8_0", "Q4_0"])
def test_a_gguf_transformer_paints_the_tile_its_diffusers_pipeline_paints(quant_type, tiny_flux_dir, tmp_path):
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    path = tmp_path / f"flux-{quant_type}.gguf"
    write_gguf(FluxTransformer2DModel.from_pretrained(str(tiny_flux_dir), subfolder="transformer"), path, quant_type)
    got = one_tile(open_backend(str(tiny_flux_dir), "cpu", transformer=str(path)))
    pipe = diffusers_pipeline(tiny_flux_dir, file=str(path),
                              quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))  # fmt: skip
    theirs = FLUX.to_canvas(pipeline_latents(pipe, FLUX, "default", got.settings.mu), got)
    assert (got.latents - theirs).abs().max() <= FLUX.tolerance * max(1.0, float(theirs.abs().max()))
    plain = one_tile(open_backend(str(tiny_flux_dir), "cpu"))
    assert not torch.equal(got.latents, plain.latents)  # the quantized weights really ran
    weights = got.metadata["model_setup"]
    assert weights["quantization"] == "gguf" and quant_type in weights["quantized_types"]
    assert weights["transformer"] == path.name and len(weights["transformer_digest"]) == 16


def test_int8_weights_paint_the_tile_the_pipeline_paints_with_the_same_int8_transformer(tiny_flux_dir):
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    got = one_tile(open_backend(str(tiny_flux_dir), "cpu", quantize="int8"))
    pipe = diffusers_pipeline(
        tiny_flux_dir, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), dtype=torch.float32
    )  # torchao would pick bf16
    theirs = FLUX.to_canvas(pipeline_latents(pipe, FLUX, "default", got.settings.mu), got)
    assert (got.latents - theirs).abs().max() <= FLUX.tolerance * max(1.0, float(theirs.abs().max()))
    plain = one_tile(open_backend(str(tiny_flux_dir), "cpu"))
    assert not torch.equal(got.latents, plain.latents)
    assert got.metadata["model_setup"]["quantization"] == "torchao"
    assert got.metadata["model_setup"]["quant_type"] == "Int8WeightOnlyConfig"


def test_int8_text_encoders_paint_the_tile_the_pipeline_paints_with_the_same_int8_encoders(tiny_flux_dir):
    """`--quantize-text int8`: the text encoders quantized by transformers' torchao config as they load, equal to
    FluxPipeline given the same quantized encoders; the denoiser stays as it is."""
    from diffusers import FluxPipeline
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import CLIPTextModel, T5EncoderModel, TorchAoConfig

    got = one_tile(open_backend(str(tiny_flux_dir), "cpu", quantize_text="int8"))
    config = TorchAoConfig(Int8WeightOnlyConfig())
    encoders = {name: cls.from_pretrained(str(tiny_flux_dir), subfolder=name, quantization_config=config,
                                          dtype=torch.float32)
                for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", T5EncoderModel))}  # fmt: skip
    pipe = FluxPipeline.from_pretrained(str(tiny_flux_dir), **encoders, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = FLUX.to_canvas(pipeline_latents(pipe, FLUX, "default", got.settings.mu), got)
    assert (got.latents - theirs).abs().max() <= FLUX.tolerance * max(1.0, float(theirs.abs().max()))
    plain = one_tile(open_backend(str(tiny_flux_dir), "cpu"))
    assert not torch.equal(got.latents, plain.latents)  # the encoders' rounding reaches the picture
    setup = got.metadata["model_setup"]
    assert setup["text_encoders_quantized"] == "int8" and "quantization" not in setup  # the denoiser is plain


def _refused(*args: str, prompt: tuple[str, ...] = ("a harbour",)) -> str:
    result = CliRunner().invoke(app, ["generate", *prompt, *args])
    assert result.exit_code == 2, result.output
    return result.output


@pytest.fixture
def no_weights(monkeypatch):
    """Any weight loading fails the test: refusals come before."""
    import diffusers

    def loaded(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", loaded)
    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "from_single_file", loaded)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--quantize", "nf4", "--device", "cpu"), "--quantize nf4 needs a CUDA GPU"),
        (("--quantize", "fp8", "--device", "cpu"), "--quantize fp8 needs a CUDA GPU"),
        (("--quantize", "nf4"), "--quantize nf4 uses bitsandbytes' CUDA kernels"),
        (("--quantize", "fp8"), "--quantize fp8 needs a GPU with fp8 arithmetic"),
        (("--quantize-text", "nf4", "--device", "cpu"), "--quantize-text nf4 needs a CUDA GPU"),
        (("--quantize-text", "nf4"), "--quantize-text nf4 uses bitsandbytes' CUDA kernels"),
        (("--transformer", "flux.bin"), "--transformer 'flux.bin' must be a .gguf or .safetensors file"),
        (("--transformer", "absent.gguf"), "--transformer file absent.gguf does not exist"),
    ],
)
def test_what_cannot_run_here_is_refused_before_any_weights_load(args, message, tiny_flux_dir, tmp_path, no_weights,
                                                                 monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    out = " ".join(_refused("--model", str(tiny_flux_dir), "--size", "256x256", *args).split())
    assert message in out


def write_header_gguf(path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A GGUF file holding zero tensors of `shapes` (torch order) under these names: what the model is read from."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "model")
    for name, shape in shapes.items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


FLUX1 = {"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "img_in.weight": (3072, 64)}
GGUF_FILES = {
    "flux-dev": {**FLUX1, "guidance_in.in_layer.bias": (3072,)},
    "flux-schnell": FLUX1,
    "sd35-large": {"joint_blocks.0.context_block.adaLN_modulation.1.bias": (14592,),
                   "joint_blocks.37.x_block.mlp.fc1.weight": (9728, 2432)},
    "z-image-turbo": {"layers.0.adaLN_modulation.0.weight": (15360, 256)},
}  # fmt: skip


@pytest.mark.parametrize("preset", list(GGUF_FILES))
def test_a_gguf_given_as_the_model_runs_with_the_rest_of_the_model_it_belongs_to(preset, tmp_path):
    """The file's tensor names and shapes (its header: these files hold zeros) say which model it is, as diffusers
    reads single files: `--model x.gguf` is `--model PRESET --transformer x.gguf`."""
    from gigadiff.runs.resolve import with_gguf_model

    path = tmp_path / f"{preset}-Q8_0.gguf"
    write_header_gguf(path, GGUF_FILES[preset])
    request = with_gguf_model(RunRequest(prompt="a harbour", model=str(path)))
    assert (request.model, request.transformer) == (preset, str(path))


def test_a_gguf_model_runs_as_its_transformer_beside_that_model(tiny_flux_dir, tmp_path, monkeypatch):
    """Through the command line: the same image as `--model FOLDER --transformer x.gguf` (the file's model is the
    tiny folder here, standing for the hub model a real file names)."""
    from diffusers import FluxTransformer2DModel

    from gigadiff.runs import resolve

    path = tmp_path / "flux-Q8_0.gguf"
    write_gguf(FluxTransformer2DModel.from_pretrained(str(tiny_flux_dir), subfolder="transformer"), path, "Q8_0")
    monkeypatch.setattr(resolve, "gguf_model", lambda file: str(tiny_flux_dir) if file == path else None)
    monkeypatch.chdir(tmp_path)
    run = ["generate", PROMPT, "--size", "256x256", "--steps", "1", "--seed", "3", "--device", "cpu", "--quiet"]
    by_transformer = ["--model", str(tiny_flux_dir), "--transformer", str(path)]
    for name, model in (("by-model.png", ["--model", str(path)]), ("by-transformer.png", by_transformer)):
        result = CliRunner().invoke(app, [*run, *model, "-o", name])
        assert result.exit_code == 0, result.output
    by_model, by_transformer = (np.asarray(Image.open(tmp_path / n)) for n in ("by-model.png", "by-transformer.png"))
    np.testing.assert_array_equal(by_model, by_transformer)
    assert by_model.std() > 0


@pytest.mark.parametrize(
    ("write", "extra", "message"),
    [
        ("diffusers", (), "its tensors do not say which model it belongs to"),
        ("bytes", (), "is not a readable GGUF file"),
        ("absent", (), "absent.gguf does not exist"),
        ("flux", ("--transformer", "other.gguf"), "is a GGUF transformer and --transformer another: give one"),
    ],
)
def test_a_gguf_model_that_cannot_run_is_refused_saying_why(write, extra, message, tiny_flux_dir, tmp_path,
                                                           monkeypatch):  # fmt: skip
    from diffusers import FluxTransformer2DModel

    monkeypatch.chdir(tmp_path)
    path = tmp_path / ("absent.gguf" if write == "absent" else "model.gguf")
    if write == "diffusers":  # diffusers' own tensor names: no single-file model type
        write_gguf(FluxTransformer2DModel.from_pretrained(str(tiny_flux_dir), subfolder="transformer"), path, "Q8_0")
    elif write == "bytes":
        path.write_bytes(b"GGUF")
    elif write == "flux":
        write_header_gguf(path, GGUF_FILES["flux-dev"])
        write_header_gguf(tmp_path / "other.gguf", GGUF_FILES["flux-dev"])
    out = " ".join(_refused("--model", str(path), *extra).split())
    assert message in out


def test_a_gguf_is_not_quantized_again(tiny_flux_dir, tmp_path):
    path = tmp_path / "flux.gguf"
    path.write_bytes(b"GGUF")
    out = " ".join(_refused("--model", str(tiny_flux_dir), "--transformer", str(path), "--quantize", "int8").split())
    assert "a GGUF file is quantized already: drop --quantize" in out


def test_the_terrain_model_takes_no_diffusers_weight_options():
    out = " ".join(_refused("--model", "terrain", "--quantize", "int8", "--offload", "model", prompt=()).split())
    assert "is not a diffusers model: --quantize, --offload do not apply to it" in out


def test_the_metadata_records_dtype_and_offloading_of_plain_weights(tiny_flux_dir, tmp_path):
    result = generate_result(PROMPT, model=str(tiny_flux_dir), device="cpu", size="256x256", steps=1, seed=1,
                             output=str(tmp_path / "a.png"))  # fmt: skip
    sidecar = json.loads((tmp_path / "a.json").read_text())
    assert sidecar["model_setup"] == {"dtype": "fp32", "offload": "none"} == result.metadata["model_setup"]
