"""Shared fixtures: tiny SD and SDXL pipelines saved to disk and loaded back like hub models."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    from gigadiff.testing import save_tiny, tiny_sd_pipeline

    return save_tiny(tiny_sd_pipeline(seed=0), tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd_v_dir(tmp_path_factory):
    from gigadiff.testing import save_tiny, tiny_sd_pipeline

    path = tmp_path_factory.mktemp("models") / "tiny-sd-v"
    return save_tiny(tiny_sd_pipeline(seed=1, prediction_type="v_prediction"), path)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from gigadiff.testing import save_tiny, tiny_sdxl_pipeline

    return save_tiny(tiny_sdxl_pipeline(seed=0), tmp_path_factory.mktemp("models") / "tiny-sdxl")


def load(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def sd_pipe(tiny_sd_dir):
    return load(tiny_sd_dir)


@pytest.fixture(scope="session")
def sdxl_pipe(tiny_sdxl_dir):
    return load(tiny_sdxl_dir)


@pytest.fixture(scope="session")
def sd_backend(tiny_sd_dir):

    from gigadiff.backends.loading import load_backend

    return load_backend(str(tiny_sd_dir), "cpu")


@pytest.fixture(scope="session")
def sdxl_backend(tiny_sdxl_dir):

    from gigadiff.backends.loading import load_backend

    return load_backend(str(tiny_sdxl_dir), "cpu")
