"""The web view in a real headless Chromium, /metrics through prometheus_client's own parser,
/healthz following a real MJPEG source, and the token."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pytest
from helpers.broker import free_port
from prometheus_client.parser import text_string_to_metric_families

from edged.annotate import LINE_COLOUR, ZONE_COLOUR
from edged.config import ConfigError, parse_config
from edged.server import Server

if TYPE_CHECKING:
    from helpers.mjpeg_server import MjpegServer

pytest_plugins = ["helpers.mjpeg_server"]
REPO = Path(__file__).resolve().parent.parent
CHROMIUM = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def daemon(tmp_path: Path, source: Any, model: Path, **http: Any) -> Server:
    config = parse_config({
        "device": "web", "stdout": True, "state_dir": str(tmp_path / "state"),
        "stats_interval": 1, "http": {"port": free_port(), **http},
        "streams": [{"name": "street", "task": "detect", "model": str(model), "fps": 5,
                     "source": source,
                     "zones": {"left": {"polygon": [[0.02, 0.3], [0.45, 0.3], [0.45, 0.98],
                                                    [0.02, 0.98]]}},
                     "lines": {"middle": {"points": [[0.6, 0.05], [0.6, 0.95]]}}}]})
    return Server(config)


@pytest.fixture
def running(tmp_path: Path, bikes_clip: Path, converted_model) -> Iterator[Server]:
    server = daemon(tmp_path, {"uri": str(bikes_clip), "loop": True},
                    converted_model("ssd_mobilenet_v2_coco"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def get(server: Server, path: str, headers: dict[str, str] | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.web.port}{path}",
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def chromium(*args: str, profile: Path) -> str:
    assert shutil.which("chromium"), "chromium is not installed (apt-get install chromium)"
    done = subprocess.run(["chromium", *CHROMIUM, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_page_in_a_real_browser(running: Server, tmp_path: Path) -> None:
    assert running.streams["street"].pipeline.wait_opened(10) == "streaming"
    time.sleep(2)  # a few processed frames
    url = f"http://127.0.0.1:{running.web.port}/"
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", url, profile=tmp_path / "p1")
    section = re.search(r'<section class="stream" data-stream="street" data-state="(\w+)" '
                        r'data-processed="(\d+)"', dom)
    assert section, dom[:2000]
    status = json.loads(get(running, "/api/status")[2])
    assert section.group(1) == status["streams"]["street"]["state"] == "streaming"
    assert 0 < int(section.group(2)) <= status["streams"]["street"]["processed"]
    # The live preview loaded as an image of the source's own size.
    image = re.search(r'<img alt="live preview" src="/streams/street/mjpeg" '
                      r'data-natural-width="(\d+)" data-natural-height="(\d+)"', dom)
    assert image and image.groups() == ("640", "272"), dom[:2000]
    assert "detect / ssd_mobilenet_v2_coco" in dom and "edged web" in dom

    # The preview shows the overlay: zones and lines drawn over the frame.
    status_code, headers, jpeg = get(running, "/streams/street/snapshot.jpg")
    assert status_code == 200 and headers["Content-Type"] == "image/jpeg"
    picture = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape == (272, 640, 3)
    for colour in (ZONE_COLOUR, LINE_COLOUR):
        close = np.abs(picture.astype(int) - colour.astype(int)).sum(axis=2) < 60
        assert close.sum() > 100, colour

    # The screenshot docs/web.md shows (EDGED_WRITE_DOCS=1 keeps this run's).
    screenshot = tmp_path / "web.png"
    chromium("--window-size=1000,620", "--virtual-time-budget=4000",
             f"--screenshot={screenshot}", url, profile=tmp_path / "p2")
    shot = cv2.imread(str(screenshot))
    assert shot is not None and shot.shape[:2] == (620, 1000)
    assert shot[100:380, 26:686].std() > 20, "the preview area is blank"
    if os.environ.get("EDGED_WRITE_DOCS"):
        shutil.copy(screenshot, REPO / "docs" / "web.png")


def test_metrics_parse_with_prometheus_client(running: Server) -> None:
    assert running.streams["street"].pipeline.wait_opened(10) == "streaming"
    time.sleep(1.5)
    status, headers, body = get(running, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    frames = families["edged_frames"].samples
    assert frames[0].labels == {"stream": "street"} and frames[0].value > 0
    buckets = [s for s in families["edged_inference_seconds"].samples
               if s.name.endswith("_bucket")]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value >= 1
    assert all(a.value <= b.value for a, b in zip(buckets, buckets[1:], strict=False))
    assert {"edged_outbox_messages", "edged_stream_streaming", "edged_temperature_celsius",
            "process_resident_memory_bytes"} <= set(families)


def test_healthz_follows_the_source(tmp_path: Path, make_mjpeg_server: Any,
                                    converted_model) -> None:
    frame = cv2.imencode(".jpg", np.full((120, 160, 3), 90, np.uint8))[1].tobytes()
    noisy = cv2.imencode(".jpg", np.full((120, 160, 3), 95, np.uint8))[1].tobytes()
    camera: MjpegServer = make_mjpeg_server([frame, noisy])
    server = daemon(tmp_path, {"uri": camera.url, "read_timeout": 1, "reconnect_max": 1},
                    converted_model("ssd_mobilenet_v2_coco"))
    server.start()
    try:
        assert server.streams["street"].pipeline.wait_opened(10) == "streaming"
        code, _, body = get(server, "/healthz")
        assert code == 200 and json.loads(body) == {"healthy": True, "reasons": []}
        camera.stop()
        deadline = time.monotonic() + 15
        while (code := get(server, "/healthz")[0]) == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        code, _, body = get(server, "/healthz")
        assert code == 503 and json.loads(body)["reasons"][0].startswith(
            "stream street: reconnecting"), body
        camera.start()
        deadline = time.monotonic() + 20
        while get(server, "/healthz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert get(server, "/healthz")[0] == 200
    finally:
        server.stop()


def test_a_token_guards_every_page(tmp_path: Path, bikes_clip: Path, converted_model,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGED_TEST_TOKEN", "s3cret-token")
    server = daemon(tmp_path, str(bikes_clip), converted_model("ssd_mobilenet_v2_coco"),
                    token_env="EDGED_TEST_TOKEN")
    server.start()
    try:
        basic = base64.b64encode(b"anyone:s3cret-token").decode()
        for path in ("/", "/api/status", "/metrics", "/healthz", "/streams/street/mjpeg"):
            for headers in ({}, {"Authorization": "Bearer wrong"},
                            {"Authorization": "Basic " + base64.b64encode(b"a:b").decode()}):
                code, answer, body = get(server, path, headers)
                assert (code, body) == (401, b""), (path, headers)
                assert answer["WWW-Authenticate"].startswith("Basic")
        assert get(server, "/api/status", {"Authorization": "Bearer s3cret-token"})[0] == 200
        assert get(server, "/api/status", {"Authorization": f"Basic {basic}"})[0] == 200
    finally:
        server.stop()


def test_other_addresses_need_a_token() -> None:
    base = {"stdout": True, "streams": [{"name": "s", "task": "detect", "source": "0"}]}
    with pytest.raises(ConfigError, match=r"http\.address: '0\.0\.0\.0' is reachable from "
                                          r"other machines: give token_env or token_file"):
        parse_config({**base, "http": {"address": "0.0.0.0"}})
    with pytest.raises(ConfigError, match=r"http\.token: not allowed in the file"):
        parse_config({**base, "http": {"token": "x"}})
    assert parse_config({**base, "http": {}}).http.address == "127.0.0.1"
