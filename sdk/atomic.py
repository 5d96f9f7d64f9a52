"""Write files and directories so that an interrupted run leaves nothing half-written:
write into a temporary sibling, then rename into place (rename is atomic on one filesystem).

Temporary names are recognisable: `.<final name>.regionkd-tmp-<host>-<pid>-<random><suffix>`
(hidden, with a marker, the host and the process that writes it). `is_temp_name` tells them
apart, so no reader takes one as an input, and `remove_stale_temps` deletes those whose writer
is gone (a process of this host that no longer runs, or older than a day from another host).

Files and directories get the permissions any new file gets (0666 / 0777 minus the umask), not
the 0600 of `tempfile.mkstemp`: a PACS service running as another user must be able to read a
mask. A file that must stay private (a signing key) passes `mode=0o600`.

An OSError while writing (no space left, quota, read-only filesystem) becomes `OutputError`,
whose message names the file being written; it is still an OSError.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

from .errors import OutputError

TEMP_MARKER = ".regionkd-tmp-"
OLD_MARKER = ".regionkd-old-"
#: a temporary name from another host is removed only when older than this (its writer cannot be asked)
FOREIGN_STALE_S = 24 * 3600


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]


def is_temp_name(name: str) -> bool:
    """True for the name of a temporary file or directory a regionkd write leaves when interrupted."""
    return name.startswith(".") and (TEMP_MARKER in name or OLD_MARKER in name)


def _temp_name(final: Path, marker: str, suffix: str) -> Path:
    return final.with_name(f".{final.name}{marker}{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _output_error(final: Path, exc: OSError) -> OutputError:
    err = OutputError(f"cannot write {final}: {exc.strerror or exc}"
                      + (f" ({exc.filename})" if exc.filename and str(exc.filename) != str(final) else ""))
    err.errno, err.strerror, err.filename = exc.errno, exc.strerror, str(final)
    return err


def _make_parent(final: Path) -> None:
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _output_error(final, exc) from exc


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask only sets)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_normal_permissions(path: str | os.PathLike, mode: int = 0o666) -> None:
    """chmod a file another library created (often through mkstemp, 0600) to `mode` minus the umask."""
    os.chmod(path, mode & ~current_umask())


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str | None = None, mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary file path next to `final`; rename it to `final` when the block succeeds,
    delete it when the block raises. `suffix` (default: `final`'s own, e.g. ".nii.gz") ends the
    temporary name, for writers that pick a format from it; pass "" when nothing needs it.
    The file is created with `mode` minus the umask."""
    final = Path(final)
    _make_parent(final)
    suffix = "".join(final.suffixes) if suffix is None else suffix
    for _ in range(100):
        tmp = _temp_name(final, TEMP_MARKER, suffix)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _output_error(final, exc) from exc
        os.close(fd)
        break
    else:  # pragma: no cover - 100 collisions of 32 random bits
        raise OutputError(f"cannot write {final}: no free temporary name")
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OutputError):
            raise
        raise _output_error(final, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(final: str | os.PathLike, data: bytes, mode: int = 0o666) -> None:
    with atomic_path(final, suffix="", mode=mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | os.PathLike, text: str, mode: int = 0o666) -> None:
    atomic_write_bytes(final, text.encode("utf-8"), mode=mode)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False, clean_stale: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `final`; move it into place when the block succeeds.
    An existing `final` is replaced only with `overwrite=True` (and only after success).
    `clean_stale`: first remove the temporaries an interrupted earlier write of `final` left (one
    listing of the parent folder: for writers of one big directory, e.g. a bundle, not of many)."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (pass overwrite to replace it)")
    _make_parent(final)
    if clean_stale:
        remove_stale_temps(final.parent, only_for=final.name)
    tmp = _temp_name(final, TEMP_MARKER, "")
    try:
        os.mkdir(tmp, 0o777)
    except OSError as exc:
        raise _output_error(final, exc) from exc
    try:
        yield tmp
        if final.exists():
            old = _temp_name(final, OLD_MARKER, "")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OutputError):
            raise
        raise _output_error(final, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------- stale temporaries

def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True           # exists, owned by someone else (or we cannot tell: keep it)
    return True


def _parse_temp(name: str):
    """(final name, marker, host tag, pid) of a temporary name, or None."""
    for marker in (TEMP_MARKER, OLD_MARKER):
        head, sep, tail = name.partition(marker)
        if sep and head.startswith("."):
            parts = tail.split("-", 2)
            if len(parts) == 3 and parts[1].isdigit():
                return head[1:], marker, parts[0], int(parts[1])
    return None


def remove_stale_temps(folder: str | os.PathLike, only_for: str | None = None) -> list[Path]:
    """Delete temporary files/directories in `folder` whose writer is gone: a process of this host
    that no longer runs, or a name older than FOREIGN_STALE_S from another host. An interrupted
    directory replacement (the old copy moved aside, the new one not yet in place) is undone: the
    old copy goes back. `only_for` limits it to the temporaries of one final name. Returns what
    was removed or restored; errors (a read-only folder) are ignored: the names are ignored anyway."""
    folder = Path(folder)
    done = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return done
    host = _host_tag()
    for entry in entries:
        parsed = _parse_temp(entry.name)
        if parsed is None:
            continue
        final_name, marker, tag, pid = parsed
        if only_for is not None and final_name != only_for:
            continue
        try:
            age = time.time() - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        stale = (tag == host and not _pid_alive(pid)) or (tag != host and age > FOREIGN_STALE_S)
        if not stale:
            continue
        path = Path(entry.path)
        try:
            if marker == OLD_MARKER and not (folder / final_name).exists():
                os.replace(path, folder / final_name)      # the replacement never finished: restore
            elif entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            done.append(path)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT,):
                continue
    return done
