"""Every option is declared once (gigadiff.options) and every front end derives its own view of it: the command
line's commands, resume's options, the API's keywords, the service's job keys, the value checks and the
settings that determine the image."""

from __future__ import annotations

import dataclasses

import pytest

from gigadiff.errors import GigadiffError
from gigadiff.facts import ModelInfo
from gigadiff.options import (
    CLIENT_OPTIONS,
    FIELD_NAMES,
    FIELDS,
    GROUPS,
    IMAGE_OPTIONS,
    OPTIONS,
    RESUME_OPTIONS,
    SERVER_OPTIONS,
    RunRequest,
    check_value,
)
from gigadiff.runs.checks import settings_for
from gigadiff.settings import GenerationSettings

SD = ModelInfo("sd", "sd", latent_channels=4, vae_scale_factor=8, native_size=512)


def click_params(command: str) -> set[str]:
    import typer.main

    from gigadiff.cli import app

    return {p.name for p in typer.main.get_command(app).commands[command].params}


def test_the_command_line_takes_every_option_and_resume_the_resume_options():
    assert click_params("generate") | click_params("upscale") == set(FIELD_NAMES)
    assert click_params("resume") == {"checkpoint", *RESUME_OPTIONS}
    assert {"output", "device", "quiet", "overwrite"} <= set(RESUME_OPTIONS)
    assert not {"model", "size", "seed", "steps", "prompt"} & set(RESUME_OPTIONS)  # what makes the image stays


def test_every_option_has_a_group_of_the_help_and_its_declared_values_are_checked():
    assert {o.group for o in OPTIONS.values()} == set(GROUPS)
    checked = 0
    for name, o in OPTIONS.items():
        bad = ["nope"] if o.choices else []
        bad += [-1e30] if o.minimum is not None or o.above is not None else []
        bad += [1e30] if o.maximum is not None or o.below is not None else []
        bad += [float("nan")] if bad and not o.choices else []
        for value in bad:
            with pytest.raises(GigadiffError) as e:
                check_value(name, value)
            assert e.value.fields == (name,), (name, value)
            checked += 1
    assert checked >= 30


def test_the_service_sets_the_server_options_and_a_job_the_others():
    from gigadiff.serve.config import ServeConfig
    from gigadiff.serve.jobs import job_request

    assert set(CLIENT_OPTIONS) | set(SERVER_OPTIONS) == set(FIELD_NAMES) and not set(CLIENT_OPTIONS) & set(
        SERVER_OPTIONS
    )
    config = ServeConfig(data=__import__("pathlib").Path("/tmp/gigadiff-options-test"))
    for name in SERVER_OPTIONS:
        with pytest.raises(GigadiffError, match=f"option\\(s\\) {name} are set by the server"):
            job_request({name: FIELDS[name].default}, config, config.jobs / "x")


def test_the_settings_are_the_image_options_by_name_with_no_defaults_of_their_own():
    fields = {f.name: f for f in dataclasses.fields(GenerationSettings)}
    assert set(IMAGE_OPTIONS) <= set(fields)
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING for f in fields.values())
    base = settings_for(RunRequest(prompt="x"), SD)[1]
    changes = {"prompt": "y", "negative": "fog", "seed": 9, "steps": 7, "scheduler": "euler", "eta": 0.5,
               "guidance": 3.0, "guidance_rescale": 0.3, "tile": 256, "overlap": 32, "weights": "cosine",
               "shift": False, "level_sync": True, "tile_batch": 2, "tileable": "x"}  # fmt: skip
    for name, value in changes.items():
        got = settings_for(RunRequest(**{"prompt": "x", name: value}), SD)[1]
        assert getattr(got, name) == value != getattr(base, name), name


def test_the_api_takes_the_options_as_keywords_and_names_the_unknown():
    from gigadiff.api import generate

    with pytest.raises(GigadiffError, match=r"unknown option\(s\) colour"):
        generate("x", colour="red")
