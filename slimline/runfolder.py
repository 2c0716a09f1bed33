"""The run folder's life: refuse what isn't ours, build it hidden, publish it atomically, and clean
up after runs that died.

A run is built in a hidden sibling of ``--out`` (``.<name>.partial-XXXX``) and renamed into place at
the very end, so a failed or interrupted run never leaves something that looks finished. Rules that
keep a user's files safe:

- ``--force`` replaces only a folder that slimline wrote (a valid ``manifest.json``, and no file the
  manifest doesn't list) or an empty one. The working directory, the home folder and their
  ancestors are never replaced.
- Publishing holds an exclusive lock on the parent folder (``flock`` on the directory itself, so no
  lock file is left behind) and renames with ``RENAME_NOREPLACE``. A folder that appeared at
  ``--out`` while the run was computing, or a run that replaced the one ``--force`` agreed to
  replace, is never overwritten: the new run is published beside it under a free name instead, and
  the command says so.
- Every hidden folder slimline makes (staging, scratch, a replaced run set aside) holds an owner file
  (pid, process start time, boot id). The next run removes those whose owner has died, restoring a
  set-aside run if its replacement never arrived. Folders without an owner file are never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slimline.errors import OutputError

OWNER = ".slimline-owner.json"
MANIFEST = "manifest.json"
REPORT_FILES = ("report.json", "report.md", "report.png", "report.html")


# -- who owns a hidden folder ------------------------------------------------------------------------


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # fields after the command name; 22 is the 20th of them


def owner_record() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "start": _start_ticks(pid), "boot": _boot_id(), "host": socket.gethostname()}


def mark_owned(folder: Path) -> None:
    (folder / OWNER).write_text(json.dumps(owner_record()))


def owner_is_dead(folder: Path) -> bool:
    """True only when the folder's owner file proves its process is gone (never for a folder without one)."""
    try:
        owner = json.loads((folder / OWNER).read_text())
        pid, start, boot, host = int(owner["pid"]), owner.get("start"), owner.get("boot", ""), owner.get("host")
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname():
        return False  # a shared file system: another machine's process, whose state we can't see
    if boot and boot != _boot_id():
        return True
    if not Path("/proc").is_dir():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    current = _start_ticks(pid)
    return current is None or (start is not None and current != start)


def make_hidden_dir(parent: Path, prefix: str) -> Path:
    """A new owned folder under ``parent``, with the permissions the user's umask gives new folders
    (``mkdtemp`` alone makes it 0700, and that mode would stick to the published run)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    mark_owned(path)
    return path


def make_staging(out: Path) -> Path:
    """The hidden folder a run is built in, beside ``out`` (a clear error where it can't be made)."""
    try:
        return make_hidden_dir(out.resolve().parent, f".{out.name}.partial-")
    except OSError as err:
        raise OutputError(
            f"--out {out}: can't create a folder in {out.resolve().parent} ({err.strerror}). Choose a writable folder."
        ) from None


def make_scratch() -> Path:
    """The run's scratch folder in the system temp dir (owned, so a killed run's is removed later)."""
    path = Path(tempfile.mkdtemp(prefix="slimline-"))
    mark_owned(path)
    return path


# -- cleaning up after dead runs ---------------------------------------------------------------------


def sweep_stale(parent: Path) -> list[str]:
    """Remove the hidden folders of dead slimline runs in ``parent`` (staging, set-aside old runs) and in
    the temp dir (scratch). Returns what it did, one line each. Folders without an owner file, or
    whose owner is alive or unknown, are left alone."""
    done: list[str] = []
    candidates: list[Path] = []
    with contextlib.suppress(OSError):
        candidates += [p for p in parent.iterdir() if p.name.startswith(".") and (".partial-" in p.name or ".old-" in p.name)]
    with contextlib.suppress(OSError):
        candidates += [p for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith("slimline-")]
    for path in candidates:
        if not path.is_dir() or path.is_symlink() or not owner_is_dead(path):
            continue
        if ".old-" in path.name:
            out = path.with_name(path.name[1:].rsplit(".old-", 1)[0])
            if not os.path.lexists(out):  # its replacement never arrived: put the old run back
                with contextlib.suppress(OSError):
                    (path / OWNER).unlink()
                    rename_noreplace(path, out)
                    done.append(f"restored {out} (a run that died had set it aside)")
                    continue
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed {path} (left by a slimline process that died)")
    return done


# -- what may be replaced ----------------------------------------------------------------------------


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's slimline manifest, or None if there is none or it isn't one."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or "slimline_manifest" not in manifest:
        return None
    return manifest


def slimline_files(folder: Path, manifest: dict[str, Any]) -> set[str]:
    """The files a run folder may hold: its manifest's outputs, the manifest, the reports."""
    outputs = manifest.get("outputs")
    listed = set(outputs) if isinstance(outputs, dict) else set()
    return listed | {MANIFEST, OWNER, *REPORT_FILES}


def foreign_files(folder: Path) -> list[str]:
    """Files in ``folder`` that slimline did not write (all of them if it holds no manifest)."""
    manifest = read_manifest(folder)
    present = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())
    if manifest is None:
        return present
    ours = slimline_files(folder, manifest)
    return [f for f in present if f not in ours]


def protected_paths() -> set[Path]:
    """Folders that --out may never replace: the working directory, the home folder, their ancestors."""
    paths: set[Path] = set()
    for p in (Path.cwd(), Path.home()):
        with contextlib.suppress(OSError, RuntimeError):
            p = p.resolve()
            paths |= {p, *p.parents}
    return paths


def _listing(files: list[str]) -> str:
    shown = ", ".join(files[:5])
    return shown + (f" and {len(files) - 5} more" if len(files) > 5 else "")


def identity(out: Path) -> str | None:
    """What is at ``out`` now, as a token to compare at publish time: None (nothing), 'empty', or the
    manifest's run stamp."""
    if not os.path.lexists(out):
        return None
    with contextlib.suppress(OSError):
        if out.is_dir() and not any(out.iterdir()):
            return "empty"
    manifest = read_manifest(out) or {}
    return f"run:{manifest.get('run_id')}:{manifest.get('started')}:{manifest.get('finished')}:{manifest.get('command')}"


def check_output(out: Path, force: bool) -> str | None:
    """Refuse, before any compute, an ``--out`` this run may not write. Returns the identity of what
    is there now, which ``publish`` compares against."""
    if os.path.islink(out):
        raise OutputError(f"--out {out}: is a symbolic link. Give the real folder, or a new path.")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: is a file, not a folder. Choose another --out.")
    try:
        resolved = out.resolve()
    except (OSError, RuntimeError) as err:
        raise OutputError(f"--out {out}: can't resolve the path ({err}). Choose another --out.") from None
    if out.exists() and resolved in protected_paths():
        raise OutputError(
            f"--out {out}: is the working directory, the home folder, or a folder above them. slimline never "
            "replaces those. Give a new folder, e.g. --out runs/NAME."
        )
    if out.is_dir():
        try:
            entries = list(out.iterdir())
        except OSError as err:
            raise OutputError(f"--out {out}: can't read the folder ({err.strerror}). Choose another --out.") from None
        if entries and not force:
            what = "a slimline run" if read_manifest(out) else "files"
            raise OutputError(
                f"--out {out}: the folder already holds {what}. Pass --force to replace a slimline run, or choose another --out."
            )
        if entries:
            manifest = read_manifest(out)
            if manifest is None:
                raise OutputError(
                    f"--out {out}: the folder holds files but no slimline manifest.json, so slimline did not write it; "
                    "--force replaces only a folder slimline wrote, or an empty one. Choose another --out."
                )
            foreign = foreign_files(out)
            if foreign:
                raise OutputError(
                    f"--out {out}: the run folder also holds files slimline did not write ({_listing(foreign)}); "
                    "--force won't delete them. Move them out, or choose another --out."
                )
    parent = resolved.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"--out {out}: can't create {parent} ({err.strerror}). Choose a writable folder.") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"--out {out}: can't write in {parent}. Choose a writable folder.")
    return identity(out)


# -- publishing -------------------------------------------------------------------------------------


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError if ``dst`` exists (renameat2 with
    RENAME_NOREPLACE where the kernel and file system have it; a check-then-rename otherwise, which
    the parent-folder lock makes safe against other slimline processes)."""
    fn = None
    with contextlib.suppress(OSError, AttributeError):
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    if fn is not None:
        at_fdcwd, rename_noreplace_flag = -100, 1
        if fn(at_fdcwd, os.fsencode(str(src)), at_fdcwd, os.fsencode(str(dst)), rename_noreplace_flag) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), str(dst))
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (flock on the directory: nothing is written)."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _free_name(out: Path) -> Path:
    for i in range(2, 10_000):
        candidate = out.with_name(f"{out.name}-{i}")
        if not os.path.lexists(candidate):
            return candidate
    raise OutputError(f"--out {out}: no free name beside it. Clean up the folder {out.parent}.")


def remove_run(folder: Path) -> list[str]:
    """Delete a run folder's own files (those its manifest lists), then its empty folders. Returns the
    files it left because slimline did not write them."""
    manifest = read_manifest(folder) or {}
    ours = slimline_files(folder, manifest)
    left = []
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        rel = str(path.relative_to(folder))
        if path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):
                path.rmdir()
        elif rel in ours:
            path.unlink()
        else:
            left.append(rel)
    with contextlib.suppress(OSError):
        folder.rmdir()
    return left


def publish(staging: Path, out: Path, seen: str | None, force: bool) -> tuple[Path, list[str]]:
    """Move the finished run into place. ``seen`` is what ``check_output`` found at ``out``. Returns
    the folder the run now is at, and warnings. Anything at ``out`` other than what ``--force`` agreed
    to replace is kept, and the run goes to a free name beside it."""
    notes: list[str] = []
    (staging / OWNER).unlink(missing_ok=True)
    with locked(out.parent):
        now = identity(out)
        if now is None:
            try:
                rename_noreplace(staging, out)
                return out, notes
            except FileExistsError:
                now = identity(out)
        if now == "empty":
            with contextlib.suppress(OSError):
                out.rmdir()
                rename_noreplace(staging, out)
                return out, notes
        elif now is not None and force and now == seen and not foreign_files(out):
            aside = out.with_name(f".{out.name}.old-{os.getpid()}")
            rename_noreplace(out, aside)
            mark_owned(aside)
            rename_noreplace(staging, out)
            left = remove_run(aside)
            if left:
                notes.append(f"the replaced run's folder {aside} still holds files slimline didn't write: {_listing(left)}")
            return out, notes
        elsewhere = _free_name(out)
        rename_noreplace(staging, elsewhere)
    raise OutputError(
        f"--out {out}: something else was written there while this run was computing, so it was left as it is. "
        f"This run is complete and was published at {elsewhere}."
    )
