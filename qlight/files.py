"""Files that a crash cannot leave half-written, and loading that cannot run code from a file."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import socket
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from qlight.errors import QlightError

SAFE_GLOBALS_ENV = "QLIGHT_SAFE_GLOBALS"
LOCK = ".qlight.lock"  # held by exclusive_dir in the folder it guards
# What a zip archive (a .pt, .ckpt or .pt2) may declare unpacked, checked before any member is read: a
# few KB of deflated zeros can declare gigabytes. torch stores tensors uncompressed, so they unpack to
# about the file's size; a .pt2's JSON (MobileNetV2's graph: 0.8 MB) may be stored or deflated.
MAX_JSON_MEMBER = 64 << 20
MAX_EXPANSION, EXPANSION_SLACK = 2, 16 << 20


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place: readers see
    the old file or the new one, never a part (a crash leaves at most a stray ``.tmp`` file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise QlightError(f"cannot write {path}: {err.strerror or err}") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _allowed_globals() -> list[Any]:
    # Globals the user vouched for by name (module.Name, comma separated), after trusting the file.
    allowed = []
    for name in filter(None, (n.strip() for n in os.environ.get(SAFE_GLOBALS_ENV, "").split(","))):
        module, _, attr = name.rpartition(".")
        try:
            allowed.append(getattr(__import__(module or "builtins", fromlist=[attr]), attr))
        except (ImportError, AttributeError, ValueError):
            raise QlightError(f"{SAFE_GLOBALS_ENV} names {name!r}, which cannot be imported") from None
    return allowed


def check_unpacked_sizes(archive: zipfile.ZipFile, path: Path) -> None:
    """Refuse a zip bomb: a JSON member that declares more than :data:`MAX_JSON_MEMBER` bytes, or other
    members that declare more than ``MAX_EXPANSION`` times the file plus ``EXPANSION_SLACK``."""
    members = archive.infolist()
    for member in members:
        if member.filename.endswith(".json") and member.file_size > MAX_JSON_MEMBER:
            raise QlightError(
                f"{path} declares {member.file_size:,} bytes uncompressed for {member.filename} (a JSON member "
                f"holds at most {MAX_JSON_MEMBER:,}); qlight refuses it"
            )
    total = sum(m.file_size for m in members if not m.filename.endswith(".json"))
    limit = MAX_EXPANSION * path.stat().st_size + EXPANSION_SLACK
    if total > limit:
        raise QlightError(
            f"{path} declares {total:,} bytes uncompressed, more than a file of its size holds ({limit:,}); "
            "qlight refuses it"
        )


def load_torch_file(path: str | Path, what: str = "file", map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain data only, so a crafted file cannot run
    code. Any other global must be allowed by name in ``$QLIGHT_SAFE_GLOBALS``; every failure is a
    one-line :class:`QlightError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise QlightError(
            f"{what} {path} is a folder, not a file" if path.is_dir() else f"{what} {path} does not exist"
        )
    try:
        if zipfile.is_zipfile(path):  # torch's current format; its legacy format is an uncompressed pickle
            with zipfile.ZipFile(path) as archive:
                check_unpacked_sizes(archive, path)
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(err))
        if unsafe:
            raise QlightError(
                f"{what} {path} holds Python objects beyond tensors and plain data ({unsafe.group(1)}), which "
                f"qlight does not unpickle; if you trust the file, allow it: {SAFE_GLOBALS_ENV}={unsafe.group(1)}"
            ) from None
        raise QlightError(f"{what} {path} is not a PyTorch file or is corrupt") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, zipfile.BadZipFile):
        raise QlightError(f"{what} {path} is not a PyTorch file or is truncated") from None


def _create_lock(lock: Path, owner: str) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as err:
        raise QlightError(f"cannot write into {lock.parent}: {err.strerror or err}") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()} {owner}")
    return True


def _lock_holder(lock: Path) -> str | None:
    """The ``host pid owner`` line of ``lock`` (its first 200 bytes), ``None`` once it is released. It is
    never read through a symlink, nor when it is not a regular file: that is not a lock qlight wrote."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError:
        fd = None
    try:
        if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
            kind = "a symlink" if lock.is_symlink() else "a folder" if lock.is_dir() else "not a regular file"
            raise QlightError(f"{lock} is {kind}, not a lock that qlight wrote: delete it if no run is writing there")
        return " ".join(os.read(fd, 200).decode(errors="replace").split())
    finally:
        if fd is not None:
            os.close(fd)


def _holder_is_gone(lock: Path) -> bool:
    holder = _lock_holder(lock)
    if holder is None:  # released meanwhile
        return True
    host, pid, *_ = holder.split() + ["", ""]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@contextlib.contextmanager
def exclusive_dir(directory: str | Path, owner: str) -> Iterator[Path]:
    """Hold ``directory/.qlight.lock`` (``LOCK``) while writing into ``directory``, so that a second run gets a
    one-line error instead of interleaving its files with this one's. A lock whose process is gone
    (killed) is taken over."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise QlightError(f"cannot create {directory}: {err.strerror or err}") from None
    lock = directory / LOCK
    if not _create_lock(lock, owner):
        if _holder_is_gone(lock):
            lock.unlink(missing_ok=True)
        if not _create_lock(lock, owner):
            raise QlightError(
                f"{directory} is being written by another run ({_lock_holder(lock)}): choose another "
                f"output directory, or delete {lock} if that run is gone"
            )
    try:
        yield directory
    finally:
        lock.unlink(missing_ok=True)
