"""Checkpoint and resume: an interrupted run, resumed, equals the uninterrupted one; bad checkpoints are refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gigadiff.api import generate_result, resume_result
from gigadiff.checkpoint import load_checkpoint, save_checkpoint
from gigadiff.cli import app
from gigadiff.errors import GigadiffError
from gigadiff.io.writers import read_latent
from gigadiff.options import RunRequest
from gigadiff.runs.execute import execute
from gigadiff.runs.resolve import resolve

runner = CliRunner()


class StopAfter:
    """A listener that interrupts the run after step `step` (0-based) of its `stage`-th schedule, like Ctrl-C."""

    def __init__(self, step: int, stage: int = 0):
        self.step, self.stage, self.seen = step, stage, -1

    def on_step_start(self, step, total, tiles, first_step=0):
        if step == 0:
            self.seen += 1

    def on_tiles_done(self, count):
        pass

    def on_step_end(self, step, latents):
        if step == self.step and self.seen == self.stage:
            raise KeyboardInterrupt


BARN = {"prompt": "a barn", "size": "768x384", "steps": 5, "seed": 6, "tile": 256, "overlap": 64}


def interrupted(backend, path: Path, **fields) -> None:
    """A run of `fields` on `backend` stopped after its step 2, with a checkpoint every 2 steps at `path`."""
    with pytest.raises(KeyboardInterrupt):
        generate_result(model=backend, listener=StopAfter(2), checkpoint_every=2, checkpoint=str(path), **fields)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", "unipc", "euler_a"])
def test_resumed_run_equals_the_uninterrupted_one(sd_backend, tmp_path, scheduler):
    full = generate_result(model=sd_backend, scheduler=scheduler, **BARN).latents
    path = tmp_path / "run.ckpt.safetensors"
    interrupted(sd_backend, path, scheduler=scheduler, **BARN)
    ckpt = load_checkpoint(path)
    assert (ckpt.step, ckpt.stage) == (2, 0) and ckpt.record["scheduler"] == scheduler
    assert torch.equal(resume_result(path, model=sd_backend).latents, full)


@pytest.mark.parametrize("scheduler", ["default", "dpmpp_2m", "heun"])
def test_a_flow_run_resumes_to_the_same_image(flux_backend, tmp_path, scheduler):
    fields = {"prompt": "a barn", "size": "512x256", "steps": 4, "seed": 2, "tile": 256, "overlap": 64,
              "scheduler": scheduler}  # fmt: skip
    full = generate_result(model=flux_backend, **fields).latents
    path = tmp_path / "flow.ckpt.safetensors"
    interrupted(flux_backend, path, **fields)
    resumed = resume_result(path, model=flux_backend)
    assert resumed.settings.mu == pytest.approx(0.5)  # the tile's 256 tokens
    assert torch.equal(resumed.latents, full)


def request(model, out: Path, **changes) -> RunRequest:
    return RunRequest(prompt="a barn", model=str(model), size="768x384", steps=5, seed=6, tile=256, overlap=64,
                      output=str(out), quiet=True, **changes)  # fmt: skip


def test_cli_resume_restores_every_recorded_setting_and_removes_the_checkpoint(sd_backend, tiny_sd_dir, tmp_path):
    out = tmp_path / "barn.png"
    req = request(tiny_sd_dir, out, scheduler="dpmpp_2m", save_latent=str(tmp_path / "barn.safetensors"),
                  checkpoint_every=2, vae_mode="fast", vae_memory=0.25)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        execute(resolve(req), sd_backend, listener=StopAfter(2))
    path = tmp_path / "barn.checkpoint.safetensors"
    assert not out.exists() and path.is_file()
    recorded = load_checkpoint(path).record
    assert (recorded["vae_mode"], recorded["vae_memory"], recorded["tile_batch"]) == ("fast", 0.25, 4)
    result = runner.invoke(app, ["resume", str(path), "-q"])
    assert result.exit_code == 0, result.output
    latent, meta = read_latent(tmp_path / "barn.safetensors")
    full = generate_result(model=sd_backend, scheduler="dpmpp_2m", **BARN).latents
    assert torch.equal(latent, full)
    assert meta["scheduler"] == "dpmpp_2m" and meta["vae_mode"] == "fast" and out.is_file() and not path.exists()
    assert meta["request"]["vae_memory"] == 0.25 and meta["request"]["output"] == str(out)


@pytest.mark.slow
def test_a_progressive_run_interrupted_in_its_second_stage_resumes_inside_it(sd_backend, tiny_sd_dir, tmp_path):
    """1536x1024 on a 512-px model: stages 768x512 and 1536x1024; stopped after step 1 of the second stage."""
    out = tmp_path / "wide.png"
    req = RunRequest(prompt="a valley", model=str(tiny_sd_dir), size="1536x1024", steps=3, seed=4, tile=256,
                     overlap=64, scheduler="dpmpp_2m", coherence="progressive", checkpoint_every=1, output=str(out),
                     save_latent=str(tmp_path / "wide.safetensors"), quiet=True)  # fmt: skip
    run = resolve(req)
    full = execute(run, sd_backend, write=False).result.latents
    with pytest.raises(KeyboardInterrupt):
        execute(run, sd_backend, listener=StopAfter(1, stage=1))
    ckpt = load_checkpoint(tmp_path / "wide.checkpoint.safetensors")
    assert (ckpt.stage, ckpt.step) == (1, 2) and ckpt.reference is not None and ckpt.noise is not None
    result = runner.invoke(app, ["resume", str(tmp_path / "wide.checkpoint.safetensors"), "-q"])
    assert result.exit_code == 0, result.output
    assert torch.equal(read_latent(tmp_path / "wide.safetensors")[0], full)


def test_generate_refuses_to_overwrite_an_existing_checkpoint(tiny_sd_dir, tmp_path):
    ckpt = tmp_path / "o.checkpoint.safetensors"
    ckpt.write_bytes(b"someone's file")
    args = ["generate", "x", "--model", str(tiny_sd_dir), "--size", "256x256", "-o", str(tmp_path / "o.png"),
            "--checkpoint-every", "1", "-q"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "already exists" in result.output and ckpt.read_bytes() == b"someone's file"


def test_bad_checkpoints_are_refused(sd_backend, tiny_sd_dir, tiny_sdxl_dir, tmp_path):
    cases = {}
    cases["missing.safetensors"] = "does not exist"
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00not a checkpoint at all")
    cases["garbage.safetensors"] = "not a readable checkpoint"
    from safetensors.torch import save_file

    save_file({"latent": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    cases["foreign.safetensors"] = "not a gigadiff checkpoint"
    good = tmp_path / "good.checkpoint.safetensors"
    with pytest.raises(KeyboardInterrupt):
        execute(resolve(request(tiny_sd_dir, tmp_path / "good.png", checkpoint_every=2)), sd_backend,
                listener=StopAfter(2))  # fmt: skip
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated.safetensors"] = "not a readable checkpoint"
    for name, message in cases.items():
        with pytest.raises(GigadiffError, match=message):
            load_checkpoint(tmp_path / name)
        result = runner.invoke(app, ["resume", str(tmp_path / name)])
        assert result.exit_code == 2 and message in result.output
    # a checkpoint made with one model, pointed at another, is refused before any compute
    ckpt = load_checkpoint(good)
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, replace(ckpt, record={**ckpt.record, "model": str(tiny_sdxl_dir)}))
    result = runner.invoke(app, ["resume", str(other), "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "refusing to resume on another model" in result.output
    assert not (tmp_path / "x.png").exists()
