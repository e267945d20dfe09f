"""The memory plan (gigadiff.runs.plan): weights counted exactly from the config files, activations traced on
`meta` as live tensors, phases that follow the offload mode, a table without loading weights, and a refusal that
names what would fit."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from gigadiff.api import open_backend
from gigadiff.backends.footprint import traced_peak
from gigadiff.backends.placement import Phase, Residency, Work, phase_peaks
from gigadiff.cli import app
from gigadiff.errors import GigadiffError
from gigadiff.options import RunRequest
from gigadiff.runs.plan import GB, MemoryPlan, plan_run, refuse_if_unfit
from gigadiff.runs.resolve import resolve
from tests.helpers.families import CASES


def planned(folder, **fields):
    request = RunRequest(prompt="a harbour", model=str(folder), size="512x256", steps=2, device="cpu", **fields)
    return plan_run(resolve(request, writes=False))


@pytest.mark.parametrize("model", ["tiny_flux_dir", "tiny_sdxl_dir", "tiny_qwen_image_dir"])
def test_the_planned_weights_are_the_bytes_the_loaded_modules_hold(model, request):
    folder = request.getfixturevalue(model)
    plan = planned(folder)
    pipe = open_backend(str(folder), "cpu").pipe
    held = {name: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
            for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}  # fmt: skip
    assert plan.weights == held


def test_quantized_text_encoders_are_planned_at_a_byte_per_linear_weight(tiny_flux_dir):
    """`--quantize-text int8`: each encoder's linear layers shrink to a byte per weight and a scale per row (fp32
    here); embeddings and norms stay, as transformers' quantizers leave them; the denoiser and VAE are untouched."""
    plain, int8 = planned(tiny_flux_dir), planned(tiny_flux_dir, quantize_text="int8")
    assert int8.weights["transformer"] == plain.weights["transformer"] and int8.weights["vae"] == plain.weights["vae"]
    pipe = open_backend(str(tiny_flux_dir), "cpu").pipe
    for name in ("text_encoder", "text_encoder_2"):
        linears = [m.weight for m in pipe.components[name].modules() if isinstance(m, torch.nn.Linear)]
        saved = sum(w.numel() * 3 - w.shape[0] * 4 for w in linears)
        assert linears and plain.weights[name] - int8.weights[name] == saved


def test_int8_quantization_plans_a_byte_per_linear_weight_and_a_scale_per_row(tiny_flux_dir):
    plain, int8 = planned(tiny_flux_dir), planned(tiny_flux_dir, quantize="int8")
    assert int8.weights["vae"] == plain.weights["vae"]
    assert 0.25 * plain.weights["transformer"] < int8.weights["transformer"] < 0.5 * plain.weights["transformer"]


def test_live_bytes_count_what_is_held_at_once_not_what_was_made():
    def run():
        a = torch.empty(1000, device="meta")  # 4000 bytes
        b = a * 2  # 8000 live
        del a
        c = b + 1  # 8000 live again (a was dropped)
        return c.view(10, 100)  # a view holds no new bytes

    assert traced_peak(run) == 8000


def test_attention_is_counted_as_a_fused_kernel_without_the_score_matrix():
    q = torch.empty(1, 2, 4096, 64, device="meta")
    peak = traced_peak(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert peak < 4 * 2 * 4096 * 64 * 2  # the output (and its log-sum-exp), not 2 x 4096 x 4096 scores


WEIGHTS = {"text_encoder": 9 * GB, "text_encoder_2": GB // 4, "transformer": 12 * GB, "vae": GB // 4}
BLOCKS = {"text_encoder": (GB // 4, GB // 2), "text_encoder_2": (GB // 64, GB // 16),
          "transformer": (GB // 2, GB), "vae": (0, GB // 4)}  # fmt: skip
LAYERS = {"text_encoder": GB // 8, "text_encoder_2": GB // 64, "transformer": GB // 8, "vae": GB // 64}
HELD = Residency(WEIGHTS, "transformer", BLOCKS, LAYERS)


def test_each_offload_mode_holds_less_on_the_device_than_the_last():
    modes = ("none", "model", "group", "sequential")
    work = Work(GB // 10, GB, GB // 8, lambda resident: GB)
    phases = [phase_peaks(mode, False, HELD, work) for mode in modes]
    peaks = [max(p.device for p in each) for each in phases]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == 4
    model = phase_peaks("model", False, HELD, Work(denoise=GB))
    assert [p.device for p in model] == [9 * GB, 13 * GB, GB // 4]  # one model at a time
    assert all(p.host == sum(WEIGHTS.values()) for p in model)


def test_a_run_that_cannot_fit_is_refused_naming_what_would():
    plan = MemoryPlan("cuda", "bf16", "none", 4, WEIGHTS, 0, 2 * GB, 0, GB,
                      (Phase("encode", 22 * GB, 0), Phase("denoise", 14 * GB, 0), Phase("decode", 13 * GB, 0)),
                      free=16 * GB, alternatives={"--offload model": 15 * GB, "--offload group": 4 * GB})  # fmt: skip
    with pytest.raises(GigadiffError) as refused:
        refuse_if_unfit(plan)
    text = refused.value.render()
    assert "needs 22.0 GB on the cuda at its peak (encode), and 16.0 GB are free" in text
    assert "--offload group (4.0 GB)" in text and "--offload model" not in text  # 15 GB > 90% of 16


def test_gigadiff_plan_prints_the_table_without_loading_weights(tiny_flux_dir, monkeypatch):
    import diffusers

    def loaded(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", loaded)
    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", loaded)
    result = CliRunner().invoke(app, ["plan", "a harbour", "--model", str(tiny_flux_dir), "--size", "1024x512",
                                      "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "memory plan on cpu in fp32" in result.output
    for line in ("weights  transformer", "encode", "denoise", "decode"):
        assert line in result.output


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if case.build is not None])
def test_every_familys_activations_are_traced(name, tmp_path_factory):
    """Each family's own encoding (or, where it reads its data, the shapes it gives) and one denoiser call run on
    `meta`: no family is planned on weights alone."""
    from tests.helpers.tiny import save_tiny

    build = CASES[name].build
    assert build is not None
    folder = save_tiny(build(), tmp_path_factory.mktemp("plans") / name)
    plan = planned(folder, **{k: v for k, v in CASES[name].ours.items() if k in ("guidance", "negative")})
    assert not plan.untraced
    assert plan.activations > 0 and plan.vae_work > 0


def test_a_plan_for_a_gpu_this_machine_lacks_says_whether_it_fits(tiny_flux_dir):
    """`gigadiff plan --gpu-memory GB`: the plan on a CUDA card with that much free, in the dtype the family runs
    in there (bf16 for FLUX), made on a machine without one."""

    def plan(*extra: str):
        return CliRunner().invoke(app, ["plan", "a harbour", "--model", str(tiny_flux_dir), "--size", "1024x512",
                                        *extra])  # fmt: skip

    roomy, tight, wrong = plan("--gpu-memory", "1"), plan("--gpu-memory", "0.01"), plan("--gpu-memory", "0")
    assert roomy.exit_code == 0 and tight.exit_code == 0, roomy.output + tight.output
    assert "memory plan on cuda in bf16" in roomy.output
    assert "of 1.00 GB free: fits" in roomy.output
    assert "of 10.2 MB free: does NOT fit" in tight.output and "alternatives: --offload" in tight.output
    assert wrong.exit_code == 2 and "--gpu-memory must be more than 0" in wrong.output
    nf4 = plan("--gpu-memory", "1", "--quantize", "nf4")  # CUDA-only quantization, planned for the card
    assert nf4.exit_code == 0 and "memory plan on cuda" in nf4.output, nf4.output


def test_the_decode_phase_fits_wherever_the_weights_leave_room_for_the_vae(tiny_flux_dir):
    """The VAE's default budget is half of what is free when decoding starts (gigadiff.vae.budget): the plan counts
    it so, so a run whose resident weights and canvas take 60% of the card still fits its decode (counting half of
    the free memory before loading, as the run does not, would put it at 110%)."""
    from dataclasses import replace

    from gigadiff.runs.plan import footprint

    request = RunRequest(prompt="a harbour", model=str(tiny_flux_dir), size="2048x2048", steps=2, device="cpu")
    fp = footprint(resolve(request, writes=False), "cuda")
    weights = {**fp.held.weights, "transformer": 12 * GB}  # FLUX.1-sized: budgets above the 0.25 GB floor
    fp = replace(fp, held=replace(fp.held, weights=weights))
    resident = weights["transformer"] + weights["vae"] + fp.canvas
    free = int(resident / 0.6)
    fp = replace(fp, whole_decode=free)  # a decode larger than any budget: the budget decides
    plan = fp.plan(free, "none")
    decode = plan.phases[-1]
    assert plan.vae_work == (free - resident) // 2
    assert decode.device == resident + plan.vae_work
    assert plan.fits() and decode.device <= 0.81 * free


def test_a_default_tile_batch_that_does_not_fit_is_lowered_to_a_divisor_that_does(tiny_flux_dir):
    """On a GPU the plan places the run before loading: where the default batch of 4 tiles per call does not fit
    and 2 (a divisor: no call is padded) does, the run takes 2 and says so; a batch the request chose is never
    changed: that run is refused, naming what would fit."""
    from gigadiff.runs.plan import fit, footprint

    def run(**fields):
        request = RunRequest(prompt="a harbour", model=str(tiny_flux_dir), size="1536x1024", tile=512, steps=2,
                             device="cpu", offload="model", vae_memory=0.002, **fields)  # fmt: skip
        return resolve(request, writes=False)

    default = run()
    assert default.settings.tile_batch == 4 and not default.tile_batch_given
    fp = footprint(default, "cuda")
    four, two = (fp.plan(None, "model", batch).phases[1].device for batch in (4, 2))  # denoising's peaks
    assert four > two
    free = int((four + two) / 2 / 0.9)
    assert not fp.plan(free, "model", 4).fits()
    placed, plan = fit(default, "cuda", free)
    assert plan.tile_batch == 2 and plan.fits() and plan.offload == "model"
    assert placed.settings.tile_batch == 2 and placed.request.tile_batch == 2
    assert "tiles run 2 per call (tile_batch 2)" in placed.notes[-1].render()
    with pytest.raises(GigadiffError) as refused:
        fit(run(tile_batch=4), "cuda", free)
    assert "--tile-batch 1" in refused.value.render()
