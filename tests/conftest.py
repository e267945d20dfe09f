"""Shared fixtures: tiny pipelines of every family saved to disk and loaded back like hub models."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# Ray (serve --ray's tests) on 127.0.0.1 only, never the machine's own interface; read when Ray is imported
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n 2` on two cores: a thread per worker (and per process it starts)
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    from tests.helpers.tiny import save_tiny, tiny_sd_pipeline

    return save_tiny(tiny_sd_pipeline(seed=0), tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd_v_dir(tmp_path_factory):
    from tests.helpers.tiny import save_tiny, tiny_sd_pipeline

    path = tmp_path_factory.mktemp("models") / "tiny-sd-v"
    return save_tiny(tiny_sd_pipeline(seed=1, prediction_type="v_prediction"), path)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from tests.helpers.tiny import save_tiny, tiny_sdxl_pipeline

    return save_tiny(tiny_sdxl_pipeline(seed=0), tmp_path_factory.mktemp("models") / "tiny-sdxl")


def load(folder):
    from tests.helpers.tiny import load_saved

    return load_saved(folder)


@pytest.fixture(scope="session")
def sd_pipe(tiny_sd_dir):
    return load(tiny_sd_dir)


@pytest.fixture(scope="session")
def sdxl_pipe(tiny_sdxl_dir):
    return load(tiny_sdxl_dir)


@pytest.fixture(scope="session")
def sd_backend(tiny_sd_dir):
    from gigadiff.backends.registry import load_backend

    return load_backend(str(tiny_sd_dir), "cpu")


@pytest.fixture(scope="session")
def sdxl_backend(tiny_sdxl_dir):
    from gigadiff.backends.registry import load_backend

    return load_backend(str(tiny_sdxl_dir), "cpu")


def tiny_folder(name, builder, **options):
    """A session fixture: the tiny pipeline `tests.helpers.tiny.<builder>(**options)` saved under `name`."""

    @pytest.fixture(scope="session")
    def folder(tmp_path_factory):
        from tests.helpers import tiny

        return tiny.save_tiny(getattr(tiny, builder)(**options), tmp_path_factory.mktemp("models") / name)

    return folder


tiny_flux_dir = tiny_folder("tiny-flux", "tiny_flux_pipeline")


tiny_flux_schnell_dir = tiny_folder("tiny-flux-schnell", "tiny_flux_pipeline", guidance_embeds=False)


tiny_flux2_dir = tiny_folder("tiny-flux2", "tiny_flux2_pipeline")


tiny_klein_dir = tiny_folder("tiny-klein", "tiny_flux2_klein_pipeline")


tiny_z_image_dir = tiny_folder("tiny-z-image", "tiny_z_image_pipeline")


@pytest.fixture(scope="session")
def flux_pipe(tiny_flux_dir):
    return load(tiny_flux_dir)


@pytest.fixture(scope="session")
def flux_backend(flux_pipe):
    from gigadiff.backends.registry import load_backend

    return load_backend(flux_pipe)


tiny_sd3_dir = tiny_folder("tiny-sd3", "tiny_sd3_pipeline")


tiny_pixart_dir = tiny_folder("tiny-pixart-sigma", "tiny_pixart_sigma_pipeline")

tiny_qwen_image_dir = tiny_folder("tiny-qwen-image", "tiny_qwen_image_pipeline")

tiny_sana_dir = tiny_folder("tiny-sana", "tiny_sana_pipeline")


@pytest.fixture
def config(tiny_sd_dir, tmp_path):
    """A service's configuration: its data in a fresh folder, the tiny SD model in its models folder."""
    from gigadiff.serve.config import ServeConfig

    return ServeConfig(data=tmp_path / "data", models=tiny_sd_dir.parent)


@pytest.fixture
def api(config):
    """That service in process (FastAPI's test client), addressed by a loopback name as a local client would."""
    from fastapi.testclient import TestClient

    from gigadiff.serve.app import create_app
    from tests.helpers.served import LOCAL

    return TestClient(create_app(config), base_url=LOCAL)
