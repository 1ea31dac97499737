"""Stream faults: a worker that breaks, a file cut short, and the command and flag values that
used to stop the daemon for good."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.daemon import Daemon

from edged.config import parse_config
from edged.errors import EdgedError
from edged.server import Server


def test_a_broken_worker_fails_its_stream_and_the_daemon_exits_1(
        bikes_clip: Path, converted_model, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """No exception in a stream thread ends the daemon quietly: the stream goes "failed" with
    the reason on its status topic, and the daemon exits non-zero so systemd restarts it."""
    def broken_get(self, timeout: float) -> None:
        raise OverflowError("timestamp out of range for platform time_t")

    monkeypatch.setattr("edged.sources.FrameReader.get", broken_get)
    config = parse_config({"device": "f", "stdout": True, "streams": [{
        "name": "cam", "task": "classify", "model": str(converted_model("mobilenet_v2_imagenet")),
        "source": str(bikes_clip)}]})
    server = Server(config)
    try:
        server.start()
        server.serve()
    finally:
        server.stop()
    assert server._status == 1
    statuses = [json.loads(line)["payload"] for line in capsys.readouterr().out.splitlines()
                if json.loads(line)["topic"] == "edged/f/cam/status"]
    failed = [s for s in statuses if s["state"] == "failed"]
    assert failed and "timestamp out of range" in failed[0]["detail"], statuses


def test_a_file_cut_short_says_so(tmp_path: Path, bikes_clip: Path, converted_model) -> None:
    """A damaged file used to end after 109 of 250 frames without a word."""
    whole = tmp_path / "faststart.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(bikes_clip), "-c", "copy",
                    "-movflags", "+faststart", str(whole)], check=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    daemon = Daemon("run", "--task", "classify", "--source", str(cut), "--fast",
                    "--model", str(converted_model("mobilenet_v2_imagenet")),
                    "--state-dir", str(tmp_path / "state"))
    try:
        assert daemon.wait(120) == 0, daemon.log()
        assert daemon.wait_log(r"WARNING edged\.sources: source .*cut\.mp4: ended after \d+ of "
                               r"250 frames \(the file is cut short or damaged\)", 5), daemon.log()
    finally:
        daemon.close()


@pytest.mark.parametrize("flag", [["--fps", "1e-300"], ["--fps", "inf"], ["--fps", "nan"],
                                  ["--threshold", "nan"]])
def test_flag_values_the_daemon_cannot_run_are_one_line(flag: list[str], tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "edged", "run", "--task", "classify",
                             "--source", "/dev/video0", *flag], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"edged: edged run: {flag[0]}: must be "), result.stderr


@pytest.mark.parametrize(("yaml_value", "key"), [
    (".inf", "open_timeout"), ("1.0e+300", "open_timeout"), (".inf", "read_timeout"),
    (".nan", "reconnect_max"), (".inf", "reconnect_max")])
def test_source_timeouts_are_bounded(tmp_path: Path, yaml_value: str, key: str) -> None:
    """An infinite timeout used to crash the daemon at stop (``Thread.join`` overflow)."""
    path = tmp_path / "edged.yaml"
    path.write_text(f"stdout: true\nstreams:\n  - name: cam\n    task: detect\n    source: "
                    f"{{uri: /dev/video0, {key}: {yaml_value}}}\n")
    with pytest.raises(EdgedError, match=rf"streams\[0\]\.source\.{key}: must be > 0 and "
                                         r"<= 3600"):
        from edged.config import load_config

        load_config(path)
