"""The service against hostile clients: every request shown to break it, answered 4xx with {"error"} before any
work or allocation, with nothing queued; the guard's decisions read the ASGI scope, not a URL built from Host."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import pytest
from fastapi.testclient import TestClient

from gigadiff.serve.app import create_app
from gigadiff.serve.config import ServeConfig
from gigadiff.serve.guard import BAD_REQUESTS, BAD_REQUESTS_WINDOW_S, RecentFailures, host_name, refusal
from tests.helpers.served import LOCAL


def queued_nothing(api) -> bool:
    return api.get("/api/jobs").json()["jobs"] == []


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels in a few dozen bytes (its pixels are never there)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_the_token_check_reads_the_scope_path_not_a_url_rebuilt_from_the_host(tmp_path, monkeypatch):
    """Starlette before 1.0.1 built request.url from the Host header: `Host: 127.0.0.1:8792/login?` made every
    path look like the open /login. The guard must not care: simulate that URL and ask for the jobs."""
    from starlette.datastructures import URL
    from starlette.requests import Request

    monkeypatch.setattr(Request, "url", property(lambda self: URL("http://127.0.0.1:8792/login?/api/jobs")))
    guarded = TestClient(create_app(ServeConfig(data=tmp_path / "d", token="s3cret")), base_url=LOCAL)
    crafted = {"Host": "127.0.0.1:8792/login?"}
    assert guarded.get("/api/jobs", headers=crafted).status_code == 401
    assert guarded.post("/api/jobs", json={"prompt": "x"}, headers=crafted).status_code == 401
    scope = {"type": "http", "path": "/api/jobs", "method": "GET", "headers": [(b"host", b"127.0.0.1:8792/login?")]}
    assert refusal(scope, ServeConfig(data=tmp_path / "d", token="s3cret"))[0] == 401


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"prompt": "x", "steps": NaN}', "NaN is not a JSON number"),
        (b'{"prompt": "x", "guidance": Infinity}', "Infinity is not a JSON number"),
        (b'{"prompt": "x", "guidance": 1e400}', "1e400 is not a finite number"),
        (b'{"prompt": "x\\ud800"}', "lone surrogate"),
        (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested more than 32 deep"),
        (b'{"seed": ' + b"9" * 5000 + b"}", "Exceeds the limit (4300 digits)"),
        (b'{"prompt": "\xff"}', "not UTF-8"),
    ],
)
def test_malformed_json_gets_400_and_queues_nothing(api, body, says):
    r = api.post("/api/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and says in r.json()["error"], r.text
    assert queued_nothing(api)
    assert api.get("/api/jobs").status_code == 200  # and the listing still answers


def test_unknown_routes_methods_and_bad_queries_answer_with_an_error_object(api):
    for method, path, status in [("GET", "/nope", 404), ("PUT", "/api/jobs", 405), ("GET", "/api/jobs?limit=x", 400),
                                 ("PATCH", "/api/jobs/" + "0" * 32, 405)]:  # fmt: skip
        r = api.request(method, path)
        assert r.status_code == status and set(r.json()) == {"error"}, (method, path, r.text)


@pytest.mark.parametrize(
    ("job", "says"),
    [
        (
            {"size": "65536x65536", "regions": [{"mask": data_url(png_header(8, 8)), "prompt": "x"}]},
            "--size 65536x65536 is above this server's limit of 16384 px a side",
        ),
        (
            {"size": "512x512", "regions": [{"mask": data_url(png_header(65536, 65536)), "prompt": "x"}]},
            "region 1: mask is 65536x65536, above this server's limit of 16384 px a side",
        ),
        ({"init": data_url(png_header(65536, 65536))}, "--init is 65536x65536, above this server's limit"),
        ({"init": data_url(png_header(10000, 10000)), "scale": 2.0}, "times --scale 2 is above this server's limit"),
        ({"regions": [{"box": [0, 0, 1, 1], "prompt": "x"}] * 20000}, "20000 regions; at most 64 are taken"),
        ({"prompt": "x" * 10000}, "--prompt is 10000 characters long; at most 4096 are taken"),
        ({"negative": "x" * 10000}, "--negative is 10000 characters long"),
        ({"regions": [{"box": [0, 0, 1, 1], "prompt": "x" * 5000}]}, "its prompt is 5000 characters"),
        ({"tile": 100000}, "--tile must lie in (0, 8192], got 100000"),
        ({"tile_batch": 100000}, "--tile-batch must be between 1 and 64"),
        ({"vae_memory": 1e9}, "--vae-memory must"),
    ],
)
def test_every_input_is_bounded_before_anything_is_allocated(api, job, says):
    r = api.post("/api/jobs", json={"prompt": "a field", "model": "tiny-sd", **job})
    assert r.status_code == 400 and says in r.json()["error"], r.text[:500]
    assert queued_nothing(api)


def test_cross_origin_writes_and_foreign_host_names_are_refused(api):
    job = {"prompt": "x", "model": "tiny-sd"}
    evil = api.post("/api/jobs", json=job, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "cross-origin" in evil.json()["error"]
    plain = api.post("/api/jobs", content=json.dumps(job), headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415 and "application/json" in plain.json()["error"]
    rebound = api.get("/api/jobs", headers={"Host": "attacker.example"})
    assert rebound.status_code == 421 and "attacker.example" in rebound.json()["error"]
    assert api.delete("/api/jobs/" + "0" * 32, headers={"Origin": "http://evil.example"}).status_code == 403
    assert queued_nothing(api)
    own = api.post("/api/jobs", json=job, headers={"Origin": LOCAL})
    assert own.status_code == 201
    assert host_name("[::1]:8000") == "[::1]" and host_name("LOCALHOST") == "localhost"
    for name in ("localhost:8000", "[::1]:8000", "127.0.0.1"):
        assert api.get("/api/jobs", headers={"Host": name}).status_code == 200, name


def test_answers_carry_the_security_headers(api):
    page, listing = api.get("/"), api.get("/api/jobs")
    for r in (page, listing):
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "<script>" not in api.get("/login").text, "the page's policy runs no inline script"


def test_login_is_bounded_rate_limited_and_its_cookie_expires(tmp_path):
    guarded = TestClient(create_app(ServeConfig(data=tmp_path / "d", token="s3cret")), base_url=LOCAL)

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(100):
            yield b"token=" + b"x" * 1000

    big = guarded.post("/login", content=chunks(), headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert big.status_code == 413
    good = guarded.post("/login", data={"token": "s3cret"}, follow_redirects=False)
    cookie = good.headers["set-cookie"].lower()
    assert good.status_code == 303 and "max-age=604800" in cookie and "samesite=strict" in cookie
    out = guarded.post("/logout", follow_redirects=False)
    assert out.status_code == 303 and 'gigadiff_token=""' in out.headers["set-cookie"]
    for _ in range(5):
        wrong = guarded.post("/login", data={"token": "guess"}, follow_redirects=False)
        assert wrong.headers["location"] == "/login?wrong=1"
    blocked = guarded.post("/login", data={"token": "s3cret"}, follow_redirects=False)
    assert blocked.headers["location"] == "/login?wait=1", "a sixth attempt within the minute is not even tried"


def test_a_hub_shaped_model_name_is_never_read_as_a_path_where_the_server_runs(api, tiny_sd_dir, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tiny").symlink_to(tiny_sd_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    r = api.post("/api/jobs", json={"prompt": "x", "model": "other/tiny"})
    assert r.status_code == 400 and "cannot load model other/tiny" in r.json()["error"], r.text
    assert str(tmp_path) not in r.json()["error"], "errors never show the server's paths"
    assert queued_nothing(api)


def test_a_transformer_file_is_a_file_of_the_models_folder_named_never_a_path(api, config):
    (config.models / "flux-Q8_0.gguf").write_bytes(b"GGUF")
    for name in ("../flux-Q8_0.gguf", "/etc/passwd", str(config.models / "flux-Q8_0.gguf"), "absent.gguf"):
        r = api.post("/api/jobs", json={"prompt": "x", "model": "tiny-sd", "transformer": name})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert "transformer must name a .gguf/.safetensors file of the server's models folder: flux-Q8_0.gguf" in error
        assert str(config.models) not in error
    assert queued_nothing(api)
    r = api.post("/api/jobs", json={"prompt": "x", "model": "tiny-sd", "transformer": "flux-Q8_0.gguf"})
    assert r.status_code == 201, r.text  # found; loading it is the worker's (and fails there: not a real GGUF)


def test_loras_are_files_of_the_models_folder_with_their_scales(api, config):
    import torch
    from safetensors.torch import save_file

    save_file({"unet.x.lora_A.weight": torch.zeros(1, 1)}, str(config.models / "style.safetensors"))
    for item in ("../style.safetensors", str(config.models / "style.safetensors"), "absent.safetensors", 3):
        r = api.post("/api/jobs", json={"prompt": "x", "model": "tiny-sd", "lora": [item]})
        assert r.status_code == 400, r.text
        assert str(config.models) not in r.json()["error"]
    r = api.post("/api/jobs", json={"prompt": "x", "model": "tiny-sd", "lora": ["style.safetensors:0.5"] * 17})
    assert r.status_code == 400 and "at most 16 LoRAs" in r.json()["error"]
    assert queued_nothing(api)
    from gigadiff.serve.jobs import job_request

    request = job_request({"prompt": "x", "model": "tiny-sd", "lora": ["style.safetensors:0.5"]}, config,
                          config.data / "job")  # fmt: skip
    assert request.lora == [f"{config.models / 'style.safetensors'}:0.5"]


def test_a_jobs_controlnet_is_a_models_folder_entry_and_its_image_a_data_url(api, config):
    import base64
    import io

    from PIL import Image

    from gigadiff.serve.jobs import job_request

    (config.models / "canny").mkdir(exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    for item in (f"../canny={url}", f"/etc={url}", "canny=/etc/passwd.png", f"absent={url}"):
        r = api.post("/api/jobs", json={"prompt": "x", "model": "tiny-sd", "control": [item]})
        assert r.status_code == 400, r.text
        assert str(config.models) not in r.json()["error"]
    assert queued_nothing(api)
    request = job_request({"prompt": "x", "model": "tiny-sd", "control": [f"canny={url}:0.5"]}, config,
                          config.data / "job")  # fmt: skip
    assert request.control == [f"{config.models / 'canny'}={config.data / 'job' / 'control0.png'}:0.5:0:1"]
    assert Image.open(config.data / "job" / "control0.png").size == (64, 64)


def test_failures_leave_the_window_in_order_and_each_address_has_its_own():
    now = [0.0]
    failures = RecentFailures(3, 10.0, clock=lambda: now[0])
    for t in (0.0, 1.0, 2.0):
        now[0] = t
        assert failures.wait("a") == 0
        failures.failed("a")
    assert failures.wait("a") == 8.0 and failures.wait("b") == 0  # until the failure of t=0 leaves the window
    now[0] = 10.0
    assert failures.wait("a") == 0
    failures.failed("a")
    assert failures.wait("a") == 1.0  # now the failure of t=1 is the one to wait for


def test_an_address_whose_requests_keep_failing_is_answered_429_before_its_requests_are_read(config):
    app = create_app(config)
    hostile = TestClient(app, base_url=LOCAL, client=("203.0.113.9", 40000))
    honest = TestClient(app, base_url=LOCAL, client=("198.51.100.7", 40000))
    for _ in range(BAD_REQUESTS):
        assert (
            hostile.post(
                "/api/jobs", content=b'{"steps": NaN}', headers={"Content-Type": "application/json"}
            ).status_code
            == 400
        )
    refused = hostile.post("/api/jobs", json={"prompt": "a valid job", "model": "sd15"})
    assert refused.status_code == 429 and set(refused.json()) == {"error"}
    assert refused.json()["error"].startswith("too many failed requests from this address: retry in ")
    assert 1 <= int(refused.headers["retry-after"]) <= BAD_REQUESTS_WINDOW_S
    assert refused.headers["x-frame-options"] == "DENY"
    assert hostile.get("/api/jobs").status_code == 429
    assert honest.get("/api/jobs").status_code == 200 and queued_nothing(honest)
    assert hostile.get("/api/jobs/nothing-here").status_code == 429
    assert honest.get("/api/jobs/nothing-here").status_code == 404  # a 404 is no failure: it counts for nobody
    for _ in range(BAD_REQUESTS * 2):
        assert honest.get("/api/jobs/nothing-here").status_code == 404
