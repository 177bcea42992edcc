"""Files in and out, safely: every output is written to a temporary file beside it and renamed over
it (a crash or Ctrl-C never leaves a half-written file), with the mode the umask gives (as a new
file from `open(path, "w")` would), and every path problem is a one-line `DiffMambaError` naming the path.

- `write_atomic(path, text_or_bytes)` / `write_atomic(path, write=fn)`: the one writer of output files
  (`--json`, `--out`, reports, checkpoints).
- `check_writable(path, what)`: refuse an output path that cannot be written, before any work.
- `path_problem(path, want)`: why a path is not the file / directory wanted ("does not exist", "is a
  symlink loop", "is a directory, not a file", ...), or None.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path
from typing import Callable, Optional, Union

from .errors import DiffMambaError

__all__ = ["write_atomic", "check_writable", "path_problem"]


def path_problem(path: Union[str, Path], want: str = "file") -> Optional[str]:
    """None when `path` is an existing (readable) file (want="file") or directory (want="dir");
    otherwise what is wrong with it, as a phrase to put after the path."""
    path = Path(path)
    noun = "directory" if want == "dir" else "file"
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symlink loop (a link that points back to itself)"
        if e.errno == errno.ENOENT:
            if os.path.islink(path):
                return f"is a broken symlink (to {os.readlink(path)}, which does not exist)"
            return f"no such {noun}"
        if e.errno == errno.ENOTDIR:
            return f"no such {noun} (a part of the path is a file, not a directory)"
        if e.errno == errno.ENAMETOOLONG:
            return "the path is too long"
        return f"cannot be accessed ({e.strerror or e})"
    except ValueError as e:  # an embedded NUL byte
        return f"is not a valid path ({e})"
    if want == "dir" and not stat.S_ISDIR(st.st_mode):
        return "is a file, not a directory"
    if want == "file" and stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file"
    if not os.access(path, os.R_OK | (os.X_OK if want == "dir" else 0)):
        return "cannot be read (permission denied)"
    return None


def _nearest_existing(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if os.path.lexists(parent):
            return parent
    return Path(".")


def check_writable(path: Union[str, Path], what: str = "output") -> Path:
    """Raise a one-line DiffMambaError when `path` cannot be written as a file: it is a directory, a
    part of it is a file, its directory cannot be written, or it is a symlink loop. Returns the path."""
    path = Path(path).expanduser()
    label = f"{what} {path}" if what else str(path)
    if str(path) in ("", "."):
        raise DiffMambaError(f"{what}: an empty path; give a file name")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DiffMambaError(f"{label}: is a symlink loop") from None
        if e.errno == errno.ENOTDIR:
            raise DiffMambaError(f"{label}: cannot be created: a part of the path is a file, not a directory") from None
        raise DiffMambaError(f"{label}: cannot be written ({e.strerror or e})") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise DiffMambaError(f"{label}: is a directory; give a file name")
        if not stat.S_ISREG(st.st_mode):  # a device or pipe (/dev/stdout): written in place
            if not os.access(path, os.W_OK):
                raise DiffMambaError(f"{label}: cannot be written (permission denied)")
            return path
    parent = _nearest_existing(path.resolve().parent if st is not None else path.parent)
    if not parent.is_dir():
        raise DiffMambaError(f"{label}: cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DiffMambaError(f"{label}: cannot be written: the directory {parent} is not writable")
    probe = parent / f".write-test-{secrets.token_hex(4)}"
    try:  # what access() cannot tell (root, /proc, a read-only mount): create and remove an empty file
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise DiffMambaError(f"{label}: cannot be written: no new file can be created in {parent} ({e.strerror or e})") from None
    return path


def _umask() -> int:
    """The process umask: read from /proc on Linux (no change of process state), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Union[str, Path], data: Union[str, bytes, None] = None, *,
                 write: Optional[Callable[[Path], None]] = None, what: str = "") -> Path:
    """Write `data` (text as UTF-8, or bytes), or call `write(tmp_path)`, to a temporary file beside
    `path`, then rename it over `path`. The file gets the umask's mode (0666 & ~umask), as a new
    file from `open(path, "w")` would, never the 0600 of a temp file. A symlink is followed (its target is
    replaced); a device or pipe (/dev/stdout) is written in place. Parent directories are created.
    Any failure is a one-line DiffMambaError naming the path (what: e.g. "--json", put before it);
    no temporary file is left behind. Returns the path."""
    if (data is None) == (write is None):
        raise TypeError("write_atomic takes data or write=, not both")
    from .distributed import is_main

    if not is_main():  # under torchrun only rank 0 writes (every rank holds the same result)
        return Path(path).expanduser()
    target = Path(path).expanduser()
    label = f"{what} {target}" if what else str(target)
    check_writable(target, what)
    if os.path.islink(target):
        target = Path(os.path.realpath(target))
    try:
        st = os.stat(target)
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):  # /dev/stdout, /dev/full, a FIFO: no rename
        try:
            if write is not None:
                write(target)
            else:
                with open(target, "wb") as f:
                    f.write(data.encode("utf-8") if isinstance(data, str) else data)
        except OSError as e:
            raise DiffMambaError(f"{label}: cannot be written ({e.strerror or e})") from None
        return Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DiffMambaError(f"{label}: cannot create its directory ({e.strerror or e})") from None
    mode = 0o666 & ~_umask()
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise DiffMambaError(f"{label}: cannot be written: no new file can be created in {target.parent} "
                             f"({e.strerror or e})") from None
    try:
        try:
            if data is not None:
                payload = data.encode("utf-8") if isinstance(data, str) else data
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        if write is not None:
            write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as e:
        raise DiffMambaError(f"{label}: cannot be written ({e.strerror or e})") from None
    finally:
        if os.path.lexists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return Path(path)
