"""Checkpoint and resume: an interrupted run, resumed, equals the uninterrupted one; bad checkpoints are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gigadiff.api import run_generation
from gigadiff.checkpoint import load_checkpoint, save_checkpoint
from gigadiff.cli import app
from gigadiff.errors import GigadiffError
from gigadiff.io.writers import read_latent
from gigadiff.recipes.txt2img import CheckpointPolicy
from gigadiff.settings import GenerationSettings

runner = CliRunner()


class StopAfter:
    """A listener that interrupts the run after step `step` (0-based), like Ctrl-C would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_start(self, *args):
        pass

    def on_tiles_done(self, count):
        pass

    def on_step_end(self, step, latents):
        if step == self.step:
            raise KeyboardInterrupt


def settings(scheduler: str) -> GenerationSettings:
    return GenerationSettings("a barn", width=768, height=384, steps=5, seed=6, tile=256, overlap=64,
                              scheduler=scheduler)  # fmt: skip


def interrupted(backend, model: str, s: GenerationSettings, path: Path, outputs: dict | None = None) -> None:
    policy = CheckpointPolicy(path, 2, model, outputs or {"output": str(path.with_suffix(".png"))})
    with pytest.raises(KeyboardInterrupt):
        run_generation(s, backend, listener=StopAfter(2), checkpoints=policy)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", "unipc", "euler_a"])
def test_resumed_run_equals_the_uninterrupted_one(sd_backend, tiny_sd_dir, tmp_path, scheduler):
    s = settings(scheduler)
    full = run_generation(s, sd_backend).latents
    path = tmp_path / "run.ckpt.safetensors"
    interrupted(sd_backend, str(tiny_sd_dir), s, path)
    ckpt = load_checkpoint(path)
    assert ckpt.step == 2 and ckpt.settings.scheduler == scheduler
    resumed = run_generation(ckpt.settings, sd_backend, resume=ckpt).latents
    assert torch.equal(resumed, full)


def test_cli_resume_writes_the_recorded_outputs_and_removes_the_checkpoint(sd_backend, tiny_sd_dir, tmp_path):
    out = tmp_path / "barn.png"
    s = settings("dpmpp_2m")
    path = tmp_path / "barn.checkpoint.safetensors"
    recorded = {"output": str(out), "save_latent": str(tmp_path / "barn.safetensors"), "checkpoint_every": 2}
    interrupted(sd_backend, str(tiny_sd_dir), s, path, recorded)
    assert not out.exists()
    result = runner.invoke(app, ["resume", str(path), "-q"])
    assert result.exit_code == 0, result.output
    latent, meta = read_latent(tmp_path / "barn.safetensors")
    assert torch.equal(latent, run_generation(s, sd_backend).latents)
    assert meta["scheduler"] == "dpmpp_2m" and out.is_file() and not path.exists()


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
    good = tmp_path / "good.safetensors"
    interrupted(sd_backend, str(tiny_sd_dir), settings("ddim"), good)
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
    save_checkpoint(other, type(ckpt)(**{**ckpt.__dict__, "model": str(tiny_sdxl_dir)}))
    result = runner.invoke(app, ["resume", str(other), "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "refusing to resume on another model" in result.output
    assert not (tmp_path / "x.png").exists()
