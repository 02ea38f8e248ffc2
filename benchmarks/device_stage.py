"""Bring a file larger than one device call can carry onto the device machine, in parts.

A device call carries at most 64 MiB of working tree, and CIFAR-10 (``cifar10.npz``, 176 MiB)
does not fit. Ignored folders left on a warm machine by earlier calls stay there, so the file
goes in parts, one call each, and the last call joins them:

    python -m benchmarks.device_stage split ~/data/cifar10/cifar10.npz .devcifar
    # prints one run(...) per part; each carries .devcifar/<part> and the manifest, and runs
    #   python3 -m benchmarks.device_stage join .devcifar
    # which reports the parts still missing, or joins them into .devcifar/cifar10.npz once
    # every part is there (SHA-256 of each part and of the whole checked; parts then removed).

The machine goes back after about 30 s idle and a fresh one starts bare: make the calls back
to back (``benchmarks/device_checks.sh`` joins the parts itself when it finds them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

__all__ = ["split", "join", "main"]

_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _manifest_path(folder: Path, name: str) -> Path:
    return folder / f"{name}.manifest.json"


def split(src: Path, folder: Path, part_mib: int = 44) -> list[Path]:
    """Writes ``src`` as ``folder/NAME.partNN`` files of ``part_mib`` MiB and a manifest.

    Returns:
        The part paths, in order (the manifest is ``folder/NAME.manifest.json``).
    """
    if part_mib <= 0:
        raise ValueError(f"part_mib must be positive, got {part_mib}.")
    folder.mkdir(parents=True, exist_ok=True)
    size, parts, limit = src.stat().st_size, [], part_mib << 20
    with open(src, "rb") as f:
        for k in range(max(1, -(-size // limit))):
            part = folder / f"{src.name}.part{k:02d}"
            part.write_bytes(f.read(limit))
            parts.append(part)
    manifest = {
        "name": src.name,
        "size": size,
        "sha256": _sha256(src),
        "parts": [{"name": p.name, "size": p.stat().st_size, "sha256": _sha256(p)} for p in parts],
    }
    _manifest_path(folder, src.name).write_text(json.dumps(manifest, indent=2) + "\n")
    return parts


def join(folder: Path, name: str | None = None) -> tuple[Path | None, list[str]]:
    """Joins the parts listed in ``folder``'s manifest once all are present and intact.

    Args:
        folder: The folder holding the manifest and the parts carried so far.
        name: The joined file's name; the only manifest in ``folder`` when omitted.

    Returns:
        ``(path, [])`` once the whole file is there (already joined, or joined now), else
        ``(None, missing)`` with the names of the parts still to carry.

    Raises:
        ValueError: No (or more than one) manifest, a part that is corrupt, or a joined
            file whose SHA-256 differs from the manifest's (the parts are kept).
    """
    if name is None:
        found = sorted(folder.glob("*.manifest.json"))
        if len(found) != 1:
            raise ValueError(f"{folder}: expected one *.manifest.json, found {len(found)}.")
        name = found[0].name.removesuffix(".manifest.json")
    manifest = json.loads(_manifest_path(folder, name).read_text())
    out = folder / manifest["name"]
    if (
        out.exists()
        and out.stat().st_size == manifest["size"]
        and _sha256(out) == manifest["sha256"]
    ):
        return out, []
    missing = [p["name"] for p in manifest["parts"] if not (folder / p["name"]).exists()]
    if missing:
        return None, missing
    for p in manifest["parts"]:
        if _sha256(folder / p["name"]) != p["sha256"]:
            raise ValueError(f"{folder / p['name']}: corrupt (SHA-256 differs); carry it again.")
    tmp = out.with_name(out.name + ".joining")
    with open(tmp, "wb") as f:
        for p in manifest["parts"]:
            f.write((folder / p["name"]).read_bytes())
    if _sha256(tmp) != manifest["sha256"]:
        tmp.unlink()
        raise ValueError(f"{out}: the joined file's SHA-256 differs from the manifest's.")
    tmp.replace(out)
    for p in manifest["parts"]:
        (folder / p["name"]).unlink()
    return out, []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="write SRC as parts and a manifest into FOLDER")
    s.add_argument("src", type=Path)
    s.add_argument("folder", type=Path)
    s.add_argument("--part-mib", type=int, default=44, help="part size (default 44 MiB)")
    j = sub.add_parser("join", help="join FOLDER's parts once all are there")
    j.add_argument("folder", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "split":
        parts = split(args.src, args.folder, args.part_mib)
        manifest = _manifest_path(args.folder, args.src.name)
        print(f"{len(parts)} parts in {args.folder}; one device call each, back to back:")
        for p in parts:
            print(
                f'  run(command="python3 -m benchmarks.device_stage join {args.folder}", '
                f'carry=["{p}", "{manifest}"])'
            )
        return 0
    try:
        out, missing = join(args.folder)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"joined: {out}" if out else f"parts still to carry: {' '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
