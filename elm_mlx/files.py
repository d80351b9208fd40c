"""Opening what a model folder names, and writing what the user keeps.

A folder from the internet can hold a FIFO where a file belongs (opening it
would block forever), names that climb out of the folder, files we may not
read, bytes that are not UTF-8. Every read of a named file goes through
`regular_file`/`read_text`, so each of these is one ElmError naming the path.
Every write of something the user keeps goes through `atomic_write_text`: a
temporary file beside the target, renamed over it only when complete, so a
full disk never truncates the previous version."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path, PurePosixPath

from .errors import ElmError, quoted


def describe_os_error(e: OSError) -> str:
    """strerror plus what to do for the errors a user can act on."""
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{reason}: the disk is full (or out of inodes / over quota); free space or choose another place"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"{reason}: check the permissions of the file and of its folders"
    return reason


def regular_file(path: Path, what: str = "file") -> Path:
    """`path` if it is a regular file (symlinks followed, as the Hugging Face cache
    uses them); else an ElmError naming it. Never opens anything."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ElmError(f"{path}: no such {what}") from None
    except OSError as e:
        raise ElmError(f"{path}: cannot read it ({describe_os_error(e)})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
            "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
            "not a regular file"
        raise ElmError(f"{path}: expected a {what} (a regular file), found {kind}")
    return path


def read_bytes(path: Path, what: str = "file", limit: int | None = None) -> bytes:
    regular_file(path, what)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1 if limit is not None else -1)
    except OSError as e:
        raise ElmError(f"{path}: cannot read it ({describe_os_error(e)})") from None
    if limit is not None and len(data) > limit:
        raise ElmError(f"{path}: larger than the {limit >> 20} MiB a {what} can be")
    return data


def read_text(path: Path, what: str = "file", limit: int | None = None) -> str:
    """A regular file's text, strictly UTF-8; each failure one ElmError naming the path."""
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ElmError(f"{path}: not UTF-8 text (byte {quoted(data[e.start:e.start + 1])} at offset {e.start}, "
                       f"line {line}); expected a UTF-8 {what}") from None


def member_name(folder: Path, name, source: str) -> Path:
    """folder/name for a file name read from a file in `folder` (a shard in an
    index): a relative path that stays inside the folder, else an ElmError."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ElmError(f"{source}: {quoted(name)} is not a file name")
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in parts or "\\" in name:
        raise ElmError(f"{source} names {quoted(name)}, which is outside {folder}; "
                       "a checkpoint's files must be inside its folder")
    return folder / name


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to `path` through a temporary file in the same folder and a rename:
    readers (and a later crash or full disk) see the old file or the new one, never half."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write(path: Path, write) -> None:
    """atomic_write_text for any content: `write(binary file)` fills the temporary file.
    The file gets the permissions a plain open() would (mkstemp's are owner-only)."""
    path = Path(path)
    folder = path.parent
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise ElmError(f"cannot write {path}: {describe_os_error(e)}") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise ElmError(f"cannot write {path}: {describe_os_error(e)}") from None
        raise
