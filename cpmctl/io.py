"""Atomic writes: outputs go to a temporary name beside the target and are renamed into place, so an interrupted
run never leaves a half-written file or directory.

Temp names are `.NAME.PID.XXXX.tmp` (PID: the writing process), so `sweep(path)` can remove the leftovers of a
killed writer and keep those of a live one. A directory never replaces an existing one unless the caller says so
(`replace=True`, after the output policy in cpmctl/outputs.py allowed it); the swap is one atomic exchange where
the file system supports it, and the old directory is removed last. Every file written through these helpers
honours the umask (mkstemp makes 0600, and so does safetensors' save_file)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from cpmctl import CpmctlError

# Write errors that are the environment's fault: one line for the user, never a traceback.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path) -> None:
    """Files 0666 and directories 0777 minus the umask, recursively (writers like save_file make 0600)."""
    path, mask = Path(path), _umask()
    if path.is_dir() and not path.is_symlink():
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
    elif path.is_file():
        os.chmod(path, 0o666 & ~mask)


def temp_prefix(path: str | Path) -> str:
    return f".{Path(path).name}.{os.getpid()}."


def make_temp(path: str | Path, directory: bool = False, suffix: str = ".tmp") -> Path:
    """A new temp file (or directory) beside `path`, named for this process, with the umask's permissions. What
    killed writers of `path` left beside it goes first (sweep), so a file rewritten by a resumed run (a loss curve, a
    checkpoint pointer) does not keep its killed predecessor's temp for good."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=suffix, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    honour_umask(tmp)
    return tmp


def remove(path: str | Path) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def free_bytes(path: str | Path) -> int | None:
    place = Path(path)
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        return shutil.disk_usage(place if place.is_dir() else place.parent).free
    except OSError:
        return None


def disk_full_error(e: BaseException, path: str | Path, what: str = "", free: int | None = None,
                    needed: int | None = None) -> CpmctlError | None:
    """A one-line CpmctlError when `e` is the device running out of space while writing `path`, else None.
    torch.save and safetensors report a full disk in their own exception types: then the message or the free
    space (`free`, measured before the partial temp was removed) decides."""
    text = str(e)
    full = (isinstance(e, OSError) and e.errno in DISK_FULL) or "No space left" in text or "os error 28" in text
    if not full and isinstance(e, Exception) and not isinstance(e, (CpmctlError, OSError)):
        full = free is not None and free < (1 << 20)
    if not full:
        return None
    need = f"; more than {needed / 1e6:.1f} MB are needed" if needed and needed >= 100_000 else ""
    return CpmctlError(f"{path}: disk full while writing {what or 'it'} (no space left on the device{need}); "
                       "nothing partial was left; free some space and rerun")


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside `path` for a writer that takes a filename; renamed into place on success."""
    path = Path(path)
    tmp = make_temp(path)
    try:
        yield tmp
        honour_umask(tmp)  # the writer may have replaced the file (safetensors writes 0600)
        os.replace(tmp, path)
    except BaseException as e:
        free = free_bytes(tmp)
        remove(tmp)
        full = disk_full_error(e, path, free=free) if isinstance(e, Exception) else None
        if full is not None:
            raise full from None
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", **kwargs):
    """Open a temp file beside `path`; on success it replaces `path`, on error it is removed."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where it is not supported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def commit_dir(tmp: str | Path, path: str | Path) -> Path:
    """Put the finished directory `tmp` at `path`; an existing `path` is swapped out and removed last."""
    tmp, path = Path(tmp), Path(path)
    honour_umask(tmp)
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return path
    if _exchange(tmp, path):
        remove(tmp)  # now the old output
        return path
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    os.replace(path, old)  # a kill here leaves `old`; sweep() puts it back
    os.replace(tmp, path)
    remove(old)
    return path


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


@contextlib.contextmanager
def atomic_dir(path: str | Path, replace: bool = False):
    """Yield a temp directory beside `path`; on success it takes the place of `path`. An existing `path` (other
    than an empty directory) is replaced only with `replace=True`, and removed only after the new one is in place."""
    path = Path(path)
    if os.path.lexists(path) and not replace and not _is_empty_dir(path):
        raise CpmctlError(f"{path}: exists; not replacing it")
    tmp = make_temp(path, directory=True)
    try:
        yield tmp
        commit_dir(tmp, path)
    except BaseException as e:
        free, written = free_bytes(tmp), _size(tmp)
        remove(tmp)
        full = disk_full_error(e, path, free=free, needed=written) if isinstance(e, Exception) else None
        if full is not None:
            raise full from None
        raise


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_OURS = re.compile(r"(\d+)\.[^.]+(?:\.spool)?\.tmp")  # after ".NAME.": PID.random[.spool].tmp
_LEGACY = re.compile(r"[a-z0-9_]{8}\.tmp")  # PID-less temp names of older versions
_OLD = re.compile(r"(\d+)\.old")  # an existing output swapped aside by commit_dir


def sweep(path: str | Path) -> list[Path]:
    """Remove what killed writers of `path` left beside it: `.NAME.PID.*.tmp` of processes that are gone (and
    PID-less `.NAME.XXXXXXXX.tmp` of older versions); a `.NAME.PID.old` left by a swap cut short is put back when
    `path` is missing, else removed. Returns what was removed."""
    path = Path(path)
    parent, prefix = path.parent, f".{path.name}."
    if not path.name or not parent.is_dir():
        return []
    removed = []
    for entry in parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        rest = entry.name[len(prefix):]
        ours, old = _OURS.fullmatch(rest), _OLD.fullmatch(rest)
        pid = ours or old
        if pid is not None and _alive(int(pid.group(1))):
            continue
        if old is not None and not os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.replace(entry, path)
                continue
        if ours or old or _LEGACY.fullmatch(rest):
            remove(entry)
            removed.append(entry)
    return removed
