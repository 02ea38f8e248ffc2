"""Locating dataset files on disk, verifying their MD5, and downloading them safely.

:func:`fetch` never leaves a partial file behind: it streams into a temporary file in
the destination directory and renames it into place only after the size and MD5 check
pass. The temporary file is deleted on every failure, including ``KeyboardInterrupt``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torchgloro._errors import DatasetError

__all__ = [
    "Resource",
    "fetch",
    "md5_file",
    "verify_md5",
    "locate",
    "missing_hint",
    "known_files",
]

_CHUNK = 1 << 20
DEFAULT_TIMEOUT = 30.0
_MD5_OK: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> md5 already verified

MISSING_HINT = "pass download=True (CLI: --download) or --data-dir DIR"


@dataclass(frozen=True)
class Resource:
    """One downloadable file: its name, published MD5 and mirror URLs (tried in order)."""

    filename: str
    md5: str
    urls: tuple[str, ...]


def md5_file(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def known_files() -> dict[str, tuple[str, str]]:
    """MD5 -> (dataset, file name) of every file a registered dataset downloads.

    Read from the loaders' ``RESOURCES`` at call time, so patched entries count.
    """
    from . import _cifar, _idx, _tiny  # late: those modules import this one

    out: dict[str, tuple[str, str]] = {}
    for ds, roles in _idx.RESOURCES.items():
        for r in roles.values():
            out[r.md5] = (ds, r.filename)
    for ds, v in _cifar.RESOURCES.items():
        out[v.resource.md5] = (ds, v.resource.filename)
    for ds, r in _tiny.RESOURCES.items():
        out[r.md5] = (ds, r.filename)
    return out


def _mismatch_message(path: Path, expected: str, actual: str) -> str:
    known = known_files()
    other, wanted = known.get(actual), known.get(expected)
    if other is None:
        return (
            f"{path}: MD5 mismatch (expected {expected}, got {actual}); the file is corrupt, "
            "truncated or a different file: delete it and download it again"
        )
    ds, fname = other
    want = f"{wanted[0]}'s {wanted[1]}" if wanted else f"the file with MD5 {expected}"
    head = (
        f"{path}: MD5 mismatch: this is a valid copy of {ds}'s {fname} (MD5 {actual}), not {want} "
        f"(MD5 {expected}); do not delete it."
    )
    if wanted is None or wanted[0] == ds:
        return f"{head} Rename it back to {fname}, and put {want} at {path}."
    # Loaders look in ROOT/<dataset>/ before ROOT itself.
    here, other_ds = path.parent, wanted[0]
    same = "keep each dataset in its own folder"
    if fname == wanted[1]:
        same = f"{ds} and {other_ds} use the same file names, so {same}"
    if here.name == ds:  # already in its own folder: ROOT was that folder
        return (
            f"{head} {same}: put {other_ds}'s files in {here.parent / other_ds}/ and pass "
            f"root={here.parent} (the loaders look in ROOT/<dataset>/ first)."
        )
    root = here.parent if here.name == other_ds else here
    return (
        f"{head} {same}: move {ds}'s files to {root / ds}/ and put {other_ds}'s in "
        f"{root / other_ds}/, then pass root={root} (the loaders look in ROOT/<dataset>/ "
        "first)."
    )


def verify_md5(path: Path, expected: str) -> None:
    """Raise :class:`DatasetError` if ``path``'s MD5 is not ``expected`` (memoised per file).

    When the file is another registered dataset's file (MNIST and Fashion-MNIST share
    file names), the message says which one and advises a folder per dataset instead of
    deleting it.
    """
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if _MD5_OK.get(key) == expected:
        return
    actual = md5_file(path)
    if actual != expected:
        raise DatasetError(_mismatch_message(path, expected, actual))
    _MD5_OK[key] = expected


def missing_hint(paths: Sequence[Path]) -> str:
    where = " or ".join(str(p) for p in paths)
    return f"not found: expected {where}; {MISSING_HINT}"


def locate(res: Resource, dirs: Sequence[Path], download: bool, *, check_md5: bool = True) -> Path:
    """Find ``res`` in the first of ``dirs`` that has it, else download it into ``dirs[0]``.

    A found file's MD5 is verified (``check_md5``); a missing file without ``download``
    raises :class:`DatasetError` naming every path looked at.
    """
    candidates = [Path(d) / res.filename for d in dirs]
    for p in candidates:
        if p.is_file():
            if check_md5:
                verify_md5(p, res.md5)
            return p
    if not download:
        raise DatasetError(missing_hint(candidates))
    return fetch(res.urls, candidates[0], res.md5)


class _FetchFailed(Exception):
    pass


def _fetch_once(url: str, dest: Path, md5: str | None, timeout: float, progress: bool) -> None:
    """One attempt: stream ``url`` into a temp file beside ``dest``, check, rename."""
    from tqdm.auto import tqdm

    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5()
        got = 0
        req = urllib.request.Request(url, headers={"User-Agent": "torchgloro"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress
            ) as bar:
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if total is not None and got != total:
            raise _FetchFailed(f"connection closed after {got} of {total} bytes")
        actual = h.hexdigest()
        if md5 is not None and actual != md5:
            raise _FetchFailed(f"MD5 mismatch (expected {md5}, got {actual})")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fetch(
    urls: Sequence[str],
    dest: str | Path,
    md5: str | None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = 1,
    progress: bool = True,
) -> Path:
    """Download the first of ``urls`` that works to ``dest`` and return ``dest``.

    Each URL is tried ``1 + retries`` times. The file only appears at ``dest`` once its
    size matches ``Content-Length`` and its MD5 matches ``md5`` (skipped when ``None``).
    If every attempt fails, raises :class:`DatasetError` naming every URL tried, why,
    and where to put the file by hand. ``KeyboardInterrupt`` propagates at once, with the
    partial file removed.
    """
    dest = Path(dest)
    if not urls:
        raise DatasetError(f"no URL known for {dest.name}; put the file at {dest} by hand")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot create {dest.parent} to download {dest.name}: {e}") from e
    failures: list[str] = []
    for url in urls:
        for attempt in range(1 + max(0, retries)):
            try:
                _fetch_once(url, dest, md5, timeout, progress)
                return dest
            except (_FetchFailed, urllib.error.URLError, OSError, ValueError) as e:
                # http.client.IncompleteRead / RemoteDisconnected are OSError or
                # HTTPException; ValueError covers malformed URLs.
                failures.append(f"  {url} (attempt {attempt + 1}): {e}")
            except Exception as e:  # http.client.HTTPException and friends
                failures.append(f"  {url} (attempt {attempt + 1}): {type(e).__name__}: {e}")
    tried = "\n".join(failures)
    raise DatasetError(
        f"could not download {dest.name}; tried:\n{tried}\n"
        f"Download it by hand from one of the URLs above and put it at {dest}"
        + (f" (MD5 {md5})" if md5 else "")
    )
