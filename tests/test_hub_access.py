"""Hub models as a user without network, or without a login, meets them: one line and exit 2 in a second or two,
checks that need only a preset's family before any hub access, and a preset fetched from a hub and run.

Each case runs `gigadiff` in a fresh process with an empty Hugging Face cache, HF_HUB_OFFLINE unset and the hub
endpoint pointed at localhost: a port that refuses connections (no network) or a fake hub serving a tiny model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gigadiff.errors import GigadiffError
from gigadiff.serve.config import ServeConfig
from gigadiff.serve.jobs import validate
from tests.helpers.fake_hub import fake_hub, refusing_endpoint

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def gigadiff(tmp_path: Path, endpoint: str, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    clean.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=endpoint, **env)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gigadiff", *args], env=clean, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    return proc, time.perf_counter() - start


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ("sd15", f"cannot load model sd15 ({SD15}): it is not in the local Hugging Face cache"),
        ("nobody/no-such-model", "cannot load model nobody/no-such-model: it is not in the local Hugging Face cache"),
        ("flux-dev", "It is a gated model: accept its licence on its hub page and log in (`hf auth login`"),
    ],
)
def test_without_network_a_hub_model_is_one_line_and_exit_2_at_once(tmp_path, model, says):
    proc, seconds = gigadiff(tmp_path, refusing_endpoint(), "generate", "a cat", "--model", model,
                             "-o", str(tmp_path / "o.png"))  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Retry" not in proc.stderr, proc.stderr
    assert says in lines[0] and "cannot be reached (Connection refused)" in lines[0]
    assert "HF_HOME" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0] and "--model /path/to" in lines[0]
    assert seconds < 3, f"{seconds:.1f} s: the hub library's retries are not cut short"
    assert not (tmp_path / "o.png").exists()


def test_a_bad_size_for_an_uncached_preset_is_refused_before_any_hub_access(tiny_sd_dir, tmp_path):
    with fake_hub({SD15: tiny_sd_dir}) as hub:
        proc, _ = gigadiff(tmp_path, hub.url, "generate", "x", "--size", "100x100", "-o", str(tmp_path / "o.png"))
        assert proc.returncode == 2 and "--size: width 100 is not a multiple of 8" in proc.stderr, proc.stderr
        proc, _ = gigadiff(tmp_path, hub.url, "generate", "x", "--model", "flux-dev", "--scheduler", "ddim")
        assert proc.returncode == 2 and "model 'flux-dev' is a flow-matching model" in proc.stderr, proc.stderr
        proc, _ = gigadiff(tmp_path, hub.url, "generate", "x", "-o", "/proc/x.png")
        assert proc.returncode == 2 and "folder /proc takes no new file" in proc.stderr, proc.stderr
    assert hub.requests == []


def test_a_gated_model_without_a_login_says_how_to_log_in(tiny_sd_dir, tmp_path):
    with fake_hub({"owner/gated": tiny_sd_dir}, gated={"owner/gated"}) as hub:
        proc, _ = gigadiff(tmp_path, hub.url, "generate", "x", "--model", "owner/gated", "-o", str(tmp_path / "o.png"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "it is a gated model this machine is not logged in for" in lines[0]
    assert "Log in with `hf auth login` (or set HF_TOKEN)" in lines[0]


@pytest.mark.slow
def test_a_preset_not_in_the_cache_is_fetched_from_the_hub_and_then_runs_offline(tiny_sd_dir, tmp_path):
    args = ["generate", "a barn", "--size", "384x256", "--steps", "2", "--tile", "256", "--overlap", "64",
            "--seed", "3", "--quiet"]  # fmt: skip
    with fake_hub({SD15: tiny_sd_dir}) as hub:
        proc, _ = gigadiff(tmp_path, hub.url, *args, "-o", str(tmp_path / "hub.png"))
        assert proc.returncode == 0, proc.stderr
    fetched = [r for r in hub.requests if r.startswith("GET") and "/resolve/" in r]
    assert fetched[0].endswith("/model_index.json"), "the config files come first, for the checks"
    assert any(r.endswith("unet/diffusion_pytorch_model.safetensors") for r in fetched)
    proc, _ = gigadiff(tmp_path, refusing_endpoint(), *args, "-o", str(tmp_path / "cached.png"), HF_HUB_OFFLINE="1")
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "hub.png") as fetched_image, Image.open(tmp_path / "cached.png") as cached_image:
        assert np.array_equal(np.asarray(fetched_image), np.asarray(cached_image))


def test_the_service_gives_advice_a_server_operator_can_follow(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for models, folder_advice in [(tmp_path, "in the server's models folder and name it"), (None, "--models FOLDER")]:
        with pytest.raises(GigadiffError) as e:
            validate({"prompt": "x", "model": "sdxl"}, ServeConfig(data=tmp_path / "data", models=models))
        text = str(e.value)
        assert "cannot load model sdxl" in text and "The server cannot fetch it" in text and folder_advice in text
        assert "hf download stabilityai/stable-diffusion-xl-base-1.0" in text and "/path/to" not in text
        assert str(tmp_path) not in text, "a client never sees the server's paths"
