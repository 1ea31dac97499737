"""Shared test fixtures: where the real checkpoints, clips and photos are."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The real-server helpers hold assertions too; let pytest rewrite them wherever they are imported.
pytest.register_assert_rewrite("helpers")

REPO = Path(__file__).resolve().parent.parent
# Real checkpoints and clips live beside the checkout (never committed); EDGED_SHARED overrides.
SHARED = Path(os.environ.get("EDGED_SHARED", REPO.parent / "shared"))


@pytest.fixture(autouse=True)
def _no_ambient_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests name their mirror explicitly: an EDGED_MIRROR from the shell (``./dev`` sets one)
    must not turn a download test into a mirror read."""
    monkeypatch.delenv("EDGED_MIRROR", raising=False)


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    """The mirror folder of real pretrained checkpoints (../shared/weights)."""
    path = SHARED / "weights"
    assert path.is_dir(), f"real checkpoints not found at {path} (set EDGED_SHARED)"
    return path


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """Real video clips (../shared/samples)."""
    path = SHARED / "samples"
    assert path.is_dir(), f"sample clips not found at {path} (set EDGED_SHARED)"
    return path


@pytest.fixture(scope="session")
def bikes_clip(samples_dir: Path) -> Path:
    """bikes.mp4: 640x272, 25 fps, 10 s street scene (cyclist, people, car)."""
    return samples_dir / "bikes.mp4"


def _models_code_digest() -> str:
    """A digest of everything that shapes a converted model, so the cache never goes stale."""
    import hashlib
    import importlib.metadata

    digest = hashlib.sha256()
    # Conversion (int8 included) runs code from both packages, on these libraries.
    for path in sorted([*REPO.glob("models/**/*.py"), *REPO.glob("edged/**/*.py")]):
        digest.update(path.read_bytes())
    for package in ("torch", "onnx", "onnxruntime", "numpy", "opencv-python-headless"):
        digest.update(f"{package}=={importlib.metadata.version(package)}".encode())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def converted_model(weights_dir: Path):
    """``converted_model(name) -> Path``: a catalog model converted from the real checkpoint.

    Conversions are cached outside the checkout, keyed by the converter's source code, so a
    second run on the same machine is fast and a changed converter is never served stale files.
    """
    from models.convert import convert_catalog_model

    cache = Path(os.environ.get("EDGED_TEST_CACHE", Path.home() / ".cache" / "edged-tests"))
    cache = cache / _models_code_digest()
    cache.mkdir(parents=True, exist_ok=True)

    def get(name: str, **options) -> Path:
        suffix = "".join(f"-{k}={v}" for k, v in sorted(options.items()))
        path = cache / f"{name}{suffix}.onnx"
        if not path.exists():
            convert_catalog_model(name, path, mirror=weights_dir, **options)
        return path

    return get


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped test is not a passing one: any skip fails the run."""
    if _skipped and exitstatus == 0:
        print(f"\n{len(_skipped)} test(s) skipped; every test must run: {', '.join(_skipped)}")
        session.exitstatus = 1
