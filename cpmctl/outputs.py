"""The output policy: what a command may write over, and one writer per output (docs/cli.md, "Outputs").

Every command that writes calls one of two functions here before any work starts:

  claim(path, command, ...)    a one-shot output (a file, or a directory written whole): returns an Output whose
                               `directory()` / `file()` / `stamp()` write it atomically and mark it as the
                               command's own.
  run_dir(path, command, ...)  a resumable run directory (pretrain, prune, tune lora, run): returns a RunDir that
                               holds the directory's lock for the run; an own directory is continued in place.

The rules, the same for every command:
  - an output that does not exist, or an empty directory, is free;
  - an existing output written by cpmctl for the same command (the `.cpmctl-output.json` marker inside a
    directory, or the `.NAME.cpmctl-output.json` sidecar of a file whose size, mtime and inode it records; or the
    format's own meta file that an older cpmctl left, via `accept`) is rewritten (one-shot) or continued (run);
  - anything else is refused with one line naming it; `force=True` replaces it, and only once the new output is
    complete: the new one is built in a temp directory beside it and swapped in, the old one removed last;
  - an output that resolves (realpath, or the same inode) to an input, or a replaced directory that holds an
    input, is refused; so are the current directory and its parents, and a place that cannot be written;
  - temp files of a killed run of the same output are removed first (io.sweep).

Locks are fcntl.flock on a lock file keyed on the resolved path (`DIR/.cpmctl.lock`, or `FILE.lock` beside a
file such as a dedup store), so a symlink or a relative path meets the same lock; the holder's PID is written in
it, and a second writer is refused with "in use by PID N".
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from cpmctl import CpmctlError, __version__
from cpmctl.io import atomic_dir, atomic_file, atomic_path, commit_dir, make_temp, remove, sweep

MARKER = ".cpmctl-output.json"
LOCK = ".cpmctl.lock"
FORCE_HELP = "Replace an existing output that this command did not write (only once the new one is complete)."


# ----- markers -------------------------------------------------------------------------------------------------
def sidecar(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}{MARKER}")


def _stat_key(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def owner_of(path: str | Path) -> str | None:
    """The command that wrote `path` according to its marker (a file's only while it is unchanged), else None."""
    path = Path(path)
    try:
        if path.is_dir():
            return json.loads((path / MARKER).read_text(encoding="utf-8")).get("command")
        mark = json.loads(sidecar(path).read_text(encoding="utf-8"))
        return mark.get("command") if mark.get("file") == _stat_key(path) else None
    except (OSError, ValueError, AttributeError):
        return None


def _marker(command: str) -> dict:
    return {"command": command, "cpmctl": __version__, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_marker(directory: str | Path, command: str) -> None:
    # Atomic: a rank that waits for the marker (run_dir) must never read a half-written one.
    with atomic_file(Path(directory) / MARKER, encoding="utf-8") as f:
        f.write(json.dumps(_marker(command)) + "\n")


# ----- checks --------------------------------------------------------------------------------------------------
def _refuse_cwd(path: Path, what: str) -> None:
    real, cwd = os.path.realpath(path), os.path.realpath(os.getcwd())
    if path.name in ("", ".", "..") or real == cwd or cwd.startswith(real.rstrip(os.sep) + os.sep):
        raise CpmctlError(f"{what} {path}: is the current directory or one above it; name a new file or directory")


def _refuse_unwritable(path: Path, what: str, inside: bool) -> None:
    """The nearest existing directory the output is written in must be writable (EROFS counts even for root)."""
    place = path if inside and path.is_dir() else path.parent
    while not os.path.lexists(place) and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise CpmctlError(f"{what} {path}: {place} is a file, not a directory")
    if not os.access(place, os.W_OK | os.X_OK):
        try:
            readonly = bool(os.statvfs(place).f_flag & os.ST_RDONLY)
        except OSError:
            readonly = False
        reason = "read-only file system" if readonly else "permission denied"
        raise CpmctlError(f"{what} {path}: cannot write in {place} ({reason})")


def _refuse_inputs(path: Path, inputs: Iterable, what: str, containing: bool) -> None:
    real = os.path.realpath(path)
    for given in inputs:
        if given is None or not os.path.lexists(given):
            continue
        inp = os.path.realpath(given)
        same = inp == real
        if not same and os.path.exists(path):
            with contextlib.suppress(OSError):
                same = os.path.samefile(given, path)
        if same:
            raise CpmctlError(f"{what} {path}: is also the input {given}; write the output to a new path")
        if containing and inp.startswith(real.rstrip(os.sep) + os.sep):
            raise CpmctlError(f"{what} {path}: holds the input {given}, which replacing it would delete; "
                              "write the output to a new path")


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _refusal(path: Path, what: str, command: str, owner: str | None, kind: str) -> CpmctlError:
    if owner is not None:
        held = f"holds the output of `cpmctl {owner}`, not of `cpmctl {command}`"
    else:
        held = (f"a non-empty directory not written by cpmctl `{command}`" if kind == "dir"
                else f"an existing file not written by cpmctl `{command}`")
    return CpmctlError(f"{what} {path}: {held}; choose a new path, or pass --force to replace it (the old one is "
                       "removed only once the new output is complete)")


# ----- one-shot outputs ----------------------------------------------------------------------------------------
class Output:
    """A checked output of `command`: write it with `directory()`, `file()` or `path_for_writer()` (or stamp a
    directory you build yourself with `stamp(tmp)` before swapping it in)."""

    def __init__(self, path: Path, command: str, kind: str, existed: bool, ours: bool):
        self.path, self.command, self.kind, self.existed, self.ours = path, command, kind, existed, ours

    def stamp(self, directory: str | Path | None = None) -> None:
        """Mark the output as this command's: the marker inside a directory (`directory`: the temp directory about
        to be swapped in), or the sidecar of a file already in place."""
        if self.kind == "dir":
            write_marker(directory if directory is not None else self.path, self.command)
            return
        with atomic_file(sidecar(self.path), encoding="utf-8") as f:
            f.write(json.dumps({**_marker(self.command), "file": _stat_key(self.path)}) + "\n")

    @contextlib.contextmanager
    def directory(self):
        """A temp directory that becomes the output, marked, when the block ends without an error."""
        with atomic_dir(self.path, replace=True) as tmp:
            yield tmp
            self.stamp(tmp)

    @contextlib.contextmanager
    def file(self, mode: str = "w", **kwargs):
        with atomic_file(self.path, mode, **kwargs) as f:
            yield f
        self.stamp()

    @contextlib.contextmanager
    def path_for_writer(self):
        """A temp path for a writer that takes a filename (torch.save, savefig)."""
        with atomic_path(self.path) as tmp:
            yield tmp
        self.stamp()


def claim(path: str | Path, command: str, *, kind: str = "dir", force: bool = False, inputs: Iterable = (),
          what: str = "--out", accept: Callable[[Path], bool] | None = None) -> Output:
    """Check a one-shot output before any work (see the module docstring); `kind` is "dir" or "file"."""
    path = Path(path)
    inputs = list(inputs)
    _refuse_cwd(path, what)
    _refuse_inputs(path, inputs, what, containing=kind == "dir")
    _refuse_unwritable(path, what, inside=False)
    sweep(path)
    if not os.path.lexists(path):
        return Output(path, command, kind, False, False)
    if kind == "file" and path.is_dir():
        raise CpmctlError(f"{what} {path}: is a directory; name a file")
    if kind == "dir" and not path.is_dir():
        raise CpmctlError(f"{what} {path}: exists and is a file; name a directory")
    if kind == "dir" and _is_empty_dir(path):
        return Output(path, command, kind, False, False)
    owner = owner_of(path)
    ours = owner == command or (owner is None and accept is not None and _accepts(accept, path))
    if not ours and not force:
        raise _refusal(path, what, command, owner, kind)
    return Output(path, command, kind, True, ours)


def _accepts(accept: Callable[[Path], bool], path: Path) -> bool:
    try:
        return bool(accept(path))
    except (OSError, ValueError):
        return False


# ----- locks ---------------------------------------------------------------------------------------------------
class Lock:
    """An exclusive flock held until `release()` (or the process ends)."""

    def __init__(self, file: Path, fd: int):
        self.file, self.fd = file, fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def lock(target: str | Path, what: str = "--out", holder: str = "cpmctl", inside: bool = True) -> Lock:
    """Lock `target` (a directory: its `.cpmctl.lock`; a file: `FILE.lock` beside it), keyed on the resolved
    path. A second writer gets a one-line error naming the holder's PID."""
    real = Path(os.path.realpath(target))
    file = real / LOCK if inside else real.with_name(real.name + ".lock")
    fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        who = f"PID {pid}" if pid.isdigit() else "another process"
        raise CpmctlError(f"{what} {target}: in use by {who} (another {holder}); wait for it to finish or stop "
                          f"it (lock {file})") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return Lock(file, fd)


# ----- resumable run directories -------------------------------------------------------------------------------
class RunDir:
    """A locked run directory. `work` is where the run writes: `path` itself, or (replacing with force) a temp
    directory beside it that `commit()` swaps in once the run is complete. `fresh`: nothing to resume in `work`."""

    def __init__(self, path: Path, work: Path, command: str, locks: list[Lock], temp: bool, fresh: bool):
        self.path, self.work, self.command, self.locks, self.temp, self.fresh = path, work, command, locks, temp, fresh
        self._built = work
        self.created = False  # made by this run: removed again if the run fails before writing anything

    def rebase(self, value):
        """`value` (a summary: strings, lists, dicts) with paths under the temp work directory moved to `path`."""
        if isinstance(value, str) and self._built != self.path and value.startswith(str(self._built)):
            return str(self.path) + value[len(str(self._built)):]
        if isinstance(value, dict):
            return {k: self.rebase(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.rebase(v) for v in value]
        return value

    def discarded(self, step: int) -> CpmctlError:
        """The error for a --force run interrupted at `step`: its temp directory goes, the old output stays."""
        return CpmctlError(f"interrupted at step {step}: the --force run is discarded, {self.path} is unchanged",
                           exit_code=130)

    def commit(self) -> Path:
        if self.temp:
            commit_dir(self.work, self.path)
            self.work, self.temp = self.path, False
        return self.path

    def close(self) -> None:
        for held in self.locks:
            held.release()
        self.locks = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and self.temp:
            remove(self.work)  # a forced run that did not finish: the old output stays as it was
        elif exc_type is not None and self.created and {p.name for p in self.work.iterdir()} <= {MARKER, LOCK}:
            remove(self.work)  # failed before writing anything (a bad argument): leave nothing behind
        self.close()
        return False


_CLAIM_WAIT_S = 30.0  # how long a non-writer rank waits for the writer's marker (run_dir)


def run_dir(path: str | Path, command: str, *, force: bool = False, inputs: Iterable = (), what: str = "--out",
            accept: Callable[[Path], bool] | None = None, writer: bool = True) -> RunDir:
    """Check and lock a resumable run directory before any work. `writer=False` (the other ranks of a
    distributed run) checks without locking or writing."""
    path = Path(path)
    _refuse_cwd(path, what)
    _refuse_unwritable(path, what, inside=True)
    if os.path.lexists(path) and not path.is_dir():
        raise CpmctlError(f"{what} {path}: exists and is a file; name a directory")
    if writer:
        sweep(path)
    present = path.is_dir() and not _is_empty_dir(path)
    _refuse_inputs(path, list(inputs), what, containing=force and present)

    def ownership() -> tuple[str | None, bool]:
        owner = owner_of(path) if present else None
        accepted = owner is None and accept is not None and _accepts(accept, path)
        return owner, not present or owner == command or accepted

    owner, ours = ownership()
    # Another rank may see the writer's lock before its marker (it locks, then writes the marker): wait for the
    # marker a moment rather than refuse the directory the writer is creating right now.
    deadline = time.monotonic() + _CLAIM_WAIT_S
    while not writer and not ours and not force and (path / LOCK).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
        owner, ours = ownership()
    if not ours and not force:
        raise _refusal(path, what, command, owner, "dir")
    if not writer:
        return RunDir(path, path, command, [], False, not present)
    holder = f"`cpmctl {command}`"
    if not (present and force):
        created = not os.path.lexists(path)
        path.mkdir(parents=True, exist_ok=True)
        held = lock(path, what, holder)
        if owner_of(path) != command:
            write_marker(path, command)
        rd = RunDir(path, path, command, [held], False, not present)
        rd.created = created
        return rd
    # Replacing: keep a run of the old directory out while the new one is built beside it.
    locks = [lock(path, what, holder)] if (path / LOCK).exists() else []
    try:
        work = make_temp(path, directory=True)
        locks.append(lock(work, what, holder))
        write_marker(work, command)
    except BaseException:
        for held in locks:
            held.release()
        raise
    return RunDir(path, work, command, locks, True, True)


# ----- child processes -----------------------------------------------------------------------------------------
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """In a child process: receive `sig` when the parent dies (Linux PR_SET_PDEATHSIG); if the parent is already
    gone (`parent` given and no longer the parent), now."""
    libc = _libc()
    if libc is not None:
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def stage_preexec(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A subprocess preexec_fn: the child leads its own process group (so its whole tree can be signalled) and
    dies with the parent."""
    parent = os.getpid()
    _libc()  # loaded before the fork

    def preexec() -> None:
        os.setpgid(0, 0)
        die_with_parent(sig, parent)

    return preexec
