"""Where data sets live, and the one way they are fetched.

    root = data_root(cfg.data_dir)                     # --data-dir, $DL_LABS_DATA, ~/.cache/...
    with fetching("imdb", root):                       # a timeout, one line on failure, no litter
        download(IMDB_URL, root / "aclImdb_v1.tar.gz", checksum=IMDB_SHA256)

``fetching`` wraps every download (ours and torchvision's): sockets time out, a failure becomes
one ``DataUnavailable`` line naming the data set, where it looked and the two ways on, and
folders the attempt created but left empty are removed again, so a failed offline run leaves
nothing on disk. ``download`` streams one file, checks the publisher's checksum and renames it
into place only when it matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from common.errors import DataError, DataUnavailable, LabError, one_line

DOWNLOAD_TIMEOUT_S = 30
WAYS_ON = ("pass --data-dir PATH to a folder that has it, "
           "or run with --smoke to use its synthetic twin")
DAMAGED = ("the files are damaged: delete them to download again "
           "(or pass --data-dir PATH to a good copy, or --smoke)")


def data_root(data_dir: str | Path | None = None) -> Path:
    """Where real data sets live: the argument, else $DL_LABS_DATA, else a cache folder."""
    where, text = ("--data-dir", data_dir) if data_dir else (
        "$DL_LABS_DATA", os.environ.get("DL_LABS_DATA"))
    if not text:
        return Path.home() / ".cache" / "dl-labs" / "data"
    try:
        root = Path(text).expanduser()
    except RuntimeError:  # "~nosuchuser/x"
        raise DataUnavailable(
            f"{where} {text}: no such user's home folder; pass a plain path") from None
    if root.exists() and not root.is_dir():
        raise DataUnavailable(
            f"{where} {text} is a file; it must name the folder that holds the data sets")
    return root


def cache_root() -> Path:
    """Where decoded copies go (the data root may be read-only): $DL_LABS_CACHE or ~/.cache."""
    return Path(os.environ.get("DL_LABS_CACHE") or Path.home() / ".cache" / "dl-labs" / "cache")


def checked_root(name: str, data_dir: str | Path | None) -> Path:
    """The data root; an explicit ``--data-dir`` must exist: a typo should not quietly start a
    download into a new folder (and it is never created)."""
    if data_dir:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            problem = "is not a folder" if path.exists() else "does not exist (nothing was created)"
            raise DataUnavailable(f"{name}: --data-dir {data_dir} {problem}; {WAYS_ON}")
    return data_root(data_dir)


def missing(name: str, root: Path, reason: str) -> DataUnavailable:
    return DataUnavailable(
        f"{name} is not in {root} and could not be downloaded ({reason}). "
        f"Put it there or pass --data-dir PATH to a folder that has it, "
        f"or run with --smoke to use its synthetic twin."
    )


def damaged(name: str, what: str, where: Path | str, remedy: str = DAMAGED) -> DataError:
    return DataError(f"{name}: {what} (in {where}); {remedy}")


def _new_folders(root: Path) -> tuple[Path | None, set[Path]]:
    """What exists before a download: the topmost missing folder of ``root`` (None if it
    exists) and the entries already in it."""
    top = None
    for folder in (root, *root.parents):
        if folder.exists():
            break
        top = folder
    return top, (set(root.iterdir()) if top is None and root.is_dir() else set())


def _remove_empty_new_folders(root: Path, before: tuple[Path | None, set[Path]]) -> None:
    """After a failed download, remove the folders it created if they hold no file (a partly
    downloaded file is kept)."""
    top, entries = before
    created = [top] if top is not None else (
        [p for p in root.iterdir() if p not in entries] if root.is_dir() else [])
    for folder in created:
        if folder.is_dir() and not folder.is_symlink() and all(
                p.is_dir() and not p.is_symlink() for p in folder.rglob("*")):
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def fetching(name: str, root: Path) -> Iterator[None]:
    """Around a download into ``root``: a socket timeout; any failure (no network, a timeout, an
    HTTP error, a wrong checksum, a read-only folder) becomes one ``DataUnavailable`` line, and
    the folders it created and left empty are removed. A ``LabError`` raised inside (e.g. a
    damaged file named by the caller) passes through as it is."""
    before = _new_folders(root)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        root.mkdir(parents=True, exist_ok=True)
        print(f"downloading {name} to {root} (once) ...", flush=True)
        yield
    except LabError:
        _remove_empty_new_folders(root, before)
        raise
    except Exception as e:  # URLError, timeouts, HTTP errors, OSError of a read-only folder
        _remove_empty_new_folders(root, before)
        raise missing(name, root, one_line(e)) from None
    finally:
        socket.setdefaulttimeout(previous)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file, read in 1 MiB blocks (the archives are tens of MB)."""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, target: Path, checksum: str = "", algorithm: str = "sha256") -> Path:
    """Stream ``url`` to ``target`` (through ``target.part``), keeping it only if its checksum
    (the publisher's, when there is one) matches. Call it inside ``fetching``."""
    part = target.with_name(target.name + ".part")
    try:
        with (urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response,
              open(part, "wb") as f):
            while block := response.read(1 << 20):
                f.write(block)
        if checksum and file_digest(part, algorithm) != checksum:
            raise OSError(f"the download's {algorithm} is not {checksum}")
        part.replace(target)
    finally:
        part.unlink(missing_ok=True)
    return target
