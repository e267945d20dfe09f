"""Tile-parallel runs over processes (torchrun, gloo on CPU): same image at any world size; faults end the job."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gigadiff.executors.distributed import calls, share, units
from gigadiff.io.writers import read_latent

HELPER = Path(__file__).parent / "helpers" / "faulty_rank.py"
pytestmark = pytest.mark.slow


def torchrun(n: int, args: list[str], env: dict[str, str] | None = None, script: Path | None = None, timeout=240):
    target = [str(script)] if script else ["-m", "gigadiff"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *target, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)


def gen_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "a harbour", "--model", str(model), "--size", "768x384", "--steps", "3", "--seed", "8",
            "--tile", "256", "--overlap", "64", "--scheduler", "dpmpp_2m", "-q", "-o", str(out),
            "--save-latent", str(out.with_suffix(".safetensors")), *extra]  # fmt: skip


def test_shares_are_even_cover_every_tile_and_give_every_rank_work():
    for n in range(0, 40):
        for world in (1, 2, 3, 5):
            for bs in (1, 3, 4):
                for split in (False, True):
                    work = units(n, split)
                    shares = [[work[i] for i in share(len(work), r, world)] for r in range(world)]
                    done = sorted((u.tile, -1 if u.branch is None else u.branch) for sh in shares for u in sh)
                    branches = (0, 1) if split else (-1,)
                    assert done == sorted((i, b) for i in range(n) for b in branches)
                    sizes = [len(sh) for sh in shares]
                    assert max(sizes) - min(sizes) <= 1
                    if len(work) >= world:
                        assert min(sizes) >= 1  # every rank works whenever there are as many units as ranks
                    for sh in shares:
                        made = calls(sh, bs)
                        assert all(0 < len(tiles) <= bs for _, tiles in made)
                        assert sorted(i for _, tiles in made for i in tiles) == sorted(u.tile for u in sh)


@pytest.fixture(scope="module")
def latents_of(tiny_sd_dir, tmp_path_factory):
    """One launch per (processes, options), shared by the tests below: 0 processes is a plain `gigadiff` run,
    2 is `gigadiff --processes 2` (which starts torchrun itself), others torchrun started by hand."""
    made: dict[tuple[int, tuple[str, ...]], tuple[torch.Tensor, str]] = {}
    folder = tmp_path_factory.mktemp("launches")

    def latents(n: int, *extra: str) -> tuple[torch.Tensor, str]:
        key = (n, extra)
        if key not in made:
            out = folder / f"run{len(made)}.png"
            if n in (0, 2):
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                processes = ["--processes", "2"] if n == 2 else []
                proc = subprocess.run([sys.executable, "-m", "gigadiff", *gen_args(tiny_sd_dir, out, *extra),
                                       *processes], capture_output=True, text=True, env=env, timeout=240)  # fmt: skip
            else:
                proc = torchrun(n, gen_args(tiny_sd_dir, out, *extra))
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert not [p for p in folder.iterdir() if p.name.startswith(".gigadiff-run")], "a launch left files"
            made[key] = read_latent(out.with_suffix(".safetensors"))[0], proc.stderr
        return made[key]

    return latents


def test_world_sizes_1_2_3_give_bit_identical_latents(latents_of):
    """One process (a plain run, as torchrun with one process runs it), `--processes 2` and torchrun with 3."""
    one, _ = latents_of(0, "--profile")
    two, log = latents_of(2, "--profile")
    assert "MB exchanged" in log and log.count("\n   1 ") >= 1
    assert torch.equal(one, two) and torch.equal(one, latents_of(3, "--profile")[0])


def test_cfg_split_gives_the_same_image_at_every_world_size(latents_of):
    two, three = latents_of(2, "--cfg-split")[0], latents_of(3, "--cfg-split")[0]
    assert torch.equal(two, three)
    # guidance split into separate calls only changes float rounding against the joint batch
    joint = latents_of(2, "--profile")[0]
    assert (two - joint).abs().max() <= 1e-5 * joint.abs().max()


def test_cfg_split_needs_torchrun_and_guidance_refused_before_any_work(tiny_sd_dir, tmp_path):
    from typer.testing import CliRunner

    from gigadiff.cli import app

    result = CliRunner().invoke(app, gen_args(tiny_sd_dir, tmp_path / "o.png", "--cfg-split"))
    assert result.exit_code == 2 and "--cfg-split shares guidance passes between processes" in result.output
    result = CliRunner().invoke(app, gen_args(tiny_sd_dir, tmp_path / "g.png", "--cfg-split", "--guidance", "1"))
    assert result.exit_code == 2 and "this run makes one pass per tile" in result.output


def test_level_consensus_gives_the_same_image_in_one_process_and_two(latents_of):
    """The level probe tile is one more unit of work shared out over the ranks."""
    assert torch.equal(latents_of(0, "--level-sync")[0], latents_of(2, "--level-sync")[0])


def test_a_killed_rank_ends_the_job_without_output_and_keeps_the_checkpoint(tiny_sd_dir, tmp_path):
    out = tmp_path / "killed.png"
    ckpt = tmp_path / "killed.ckpt.safetensors"
    env = {"GIGADIFF_TEST_FAULT": "kill", "GIGADIFF_TEST_FAULT_RANK": "1", "GIGADIFF_TEST_FAULT_AFTER": "2"}
    args = gen_args(tiny_sd_dir, out, "--checkpoint-every", "1", "--checkpoint", str(ckpt), "--rank-timeout", "20")
    proc = torchrun(2, args, env, script=HELPER)
    assert proc.returncode != 0
    assert "rank" in proc.stderr and ("1 (local_rank: 1)" in proc.stderr or "rank 1" in proc.stderr)
    assert not out.exists() and not out.with_suffix(".safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name], "temporary files left behind"
    from gigadiff.checkpoint import load_checkpoint

    assert load_checkpoint(ckpt).step >= 1


def test_a_hung_rank_ends_the_job_within_the_timeout_naming_it(tiny_sd_dir, tmp_path):
    out = tmp_path / "hung.png"
    env = {"GIGADIFF_TEST_FAULT": "hang", "GIGADIFF_TEST_FAULT_RANK": "1", "GIGADIFF_TEST_FAULT_AFTER": "1"}
    started = time.monotonic()
    proc = torchrun(2, gen_args(tiny_sd_dir, out, "--rank-timeout", "8"), env, script=HELPER, timeout=180)
    assert proc.returncode != 0
    assert "rank 1 stopped answering" in proc.stderr, proc.stderr[-3000:]
    assert time.monotonic() - started < 150
    assert not out.exists()


@pytest.mark.parametrize("timeout", ["0", "-5"])
def test_rank_timeout_must_be_positive(tiny_sd_dir, tmp_path, timeout):
    from typer.testing import CliRunner

    from gigadiff.cli import app

    result = CliRunner().invoke(app, gen_args(tiny_sd_dir, tmp_path / "o.png", "--rank-timeout", timeout))
    assert result.exit_code == 2 and "--rank-timeout must be positive" in result.output


def test_terrain_onnx_backend_runs_distributed_with_the_same_result(tmp_path):
    pytest.importorskip("terrain_diffusion")
    maps = []
    for n in (1, 2):
        out = tmp_path / f"t{n}.tif"
        args = ["generate", "--model", "terrain", "--size", "256x192", "--overlap", "32", "--steps", "2",
                "--seed", "3", "-q", "--difficulty", "40", "-o", str(out)]  # fmt: skip
        proc = torchrun(n, args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        from gigadiff.io.heightmap import read_heightmap

        maps.append(read_heightmap(out)[0])
    assert (maps[0] == maps[1]).all()
