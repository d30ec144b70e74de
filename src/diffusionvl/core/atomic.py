"""Atomic writes: a file or folder holds either its previous content or the complete new one, never a mix.

Every writer in the package goes through this module (it imports nothing else from diffusionvl but `errors`, so any
layer may use it). One way to do each thing:
- `write_bytes(path, data)`, `write_text(path, text)` (UTF-8) and `write_json(path, data)` (indent 2, keys in the
  given order, non-ASCII kept as UTF-8, trailing newline): data in memory -> the file `path`.
- `write_file(path, write)`: for writers that want a file name (matplotlib's savefig, safetensors' save_file):
  `write(tmp)` writes the temporary file, whose name ends in the target's suffix so format detection still works.
- `write_folder(path, write)`: `write(tmp)` fills a temporary folder, which then replaces `path` (a folder or a
  file). Callers decide beforehand whether replacing is allowed (`check_target`).
- `replace_folder(src, dst)`: move a complete folder over `dst`, the last step of `write_folder`, for callers that
  assemble a folder in their own temporary place.

Guarantees:
- The temporary entry lives in the target's directory (same filesystem, so the final `os.replace` is atomic) and is
  named `.<name>.tmp-<random>[suffix]`; a folder being replaced is set aside as `.<name>.old-<random>` for the
  instant of the swap. Missing parent folders are created.
- Permissions are those a plain `open(path, "w")` / `os.mkdir(path)` gives (0666 / 0777 minus the umask): the
  temporary entry is created with those modes rather than by mkstemp/mkdtemp (0600 / 0700), so the kernel applies the
  umask and no process-wide umask is read or changed. Inside a folder every entry is reset to them too (some writers
  create owner-only files); a file with an execute bit keeps the folder's execute bits.
- Every file's data is flushed and fsynced before the rename. The directory itself is not fsynced: after a power
  loss the target may still hold its previous version, never a torn one.
- On any failure, KeyboardInterrupt included, the temporary entry is removed, the previous content is still in place,
  and the exception propagates. A successful folder swap deletes the previous content: no `.tmp-` / `.old-` debris.
  Only a hard kill (SIGKILL, power loss) can leave debris, always under those names and never a damaged target.
- A target whose directory cannot be created or written raises a one-line `DiffusionVLError`.
- Concurrent writers of one file: the last rename wins. Folder swaps take two renames (between them `path` briefly
  does not exist), so concurrent writers of one folder must serialize (e.g. the asset cache's lock).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, Callable

from diffusionvl.core.errors import DiffusionVLError

StrPath = str | os.PathLike[str]


def write_bytes(path: StrPath, data: bytes) -> Path:
    """Write `data` to `path` atomically (module docstring)."""
    return write_file(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: StrPath, text: str) -> Path:
    """Write `text` as UTF-8 to `path` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: StrPath, data: Any) -> Path:
    """Write `data` as indented JSON (insertion order, UTF-8, trailing newline) to `path` atomically."""
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_file(path: StrPath, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a new empty file next to `path`, then fsync it and rename it to `path`."""
    path = Path(path)
    tmp, mode = _new_entry(path, folder=False)
    try:
        write(tmp)
        _settle_file(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_folder(path: StrPath, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a new empty folder next to `path`, then fsync its files and swap it in for `path`."""
    path = Path(path)
    tmp, mode = _new_entry(path, folder=True)
    try:
        write(tmp)
        _settle_folder(tmp, mode)
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def replace_folder(src: StrPath, dst: StrPath) -> None:
    """Move the complete folder `src` to `dst`. An existing `dst` (folder, file or link) is set aside first, because
    a rename cannot replace a non-empty folder; it is deleted once `src` is in place, or put back if the move fails."""
    src, dst = Path(src), Path(dst)
    old = _sibling(dst, "old") if os.path.lexists(dst) else None
    swapped = False
    try:
        if old is not None:
            os.replace(dst, old)
        os.replace(src, dst)
        swapped = True
    finally:
        if old is not None and os.path.lexists(old):
            # An interrupt can land between a rename and the next line: `src` gone means the new folder is in place.
            if swapped or not os.path.lexists(src):
                _remove(old)
            else:
                os.replace(old, dst)  # put the previous content back


# ------------------------------------------------------------------------------------------------ internals


def _sibling(path: Path, kind: str, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.{kind}-{secrets.token_hex(4)}{suffix}")


def _new_entry(path: Path, folder: bool) -> tuple[Path, int]:
    """Create an empty temporary file or folder next to `path`; returns it and the mode the kernel gave it, which is
    the mode a plain write gets (umask, or the directory's default ACL, applied)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = _sibling(path, "tmp", "" if folder else path.suffix)
            try:
                if folder:
                    os.mkdir(tmp, 0o777)
                else:
                    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                break
            except FileExistsError:
                continue  # a random name taken: draw another
        try:
            return tmp, stat.S_IMODE(os.lstat(tmp).st_mode)
        except BaseException:  # an interrupt right after the create: leave nothing behind
            _remove(tmp)
            raise
    except OSError as exc:
        raise DiffusionVLError(f"cannot write {path}: {exc.strerror or exc}") from None


def _settle_file(file: StrPath, mode: int) -> None:
    """Restore the plain-write `mode` (a writer may have recreated the file owner-only) and fsync the data."""
    os.chmod(file, mode)
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _settle_folder(folder: Path, mode: int) -> None:
    """Give every entry of `folder` the plain-write permissions implied by the folder's `mode`; fsync every file.
    Links are left alone (chmod would follow them out of the folder)."""
    os.chmod(folder, mode)
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            entry = os.path.join(root, name)
            kind = os.lstat(entry).st_mode
            if stat.S_ISDIR(kind):
                os.chmod(entry, mode)
            elif stat.S_ISREG(kind):
                _settle_file(entry, mode if kind & 0o111 else mode & 0o666)


def _remove(path: Path) -> None:
    """Delete a set-aside entry; a single interrupt during the deletion still finishes it (no debris)."""
    try:
        _delete(path)
    except BaseException:
        _delete(path)
        raise


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_target(path: str | os.PathLike[str], marker: str, overwrite: bool = False) -> None:
    """Refuse (one line) to replace `path` unless it does not exist, is an empty folder, is a folder holding `marker`
    (the same kind of output: a rerun replaces it), or `overwrite` is set."""
    path = Path(path)
    if overwrite or not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not path.is_symlink():
        entries = sorted(p.name for p in path.iterdir())
        if not entries or marker in entries:
            return
        raise DiffusionVLError(f"{path} is a folder with {len(entries)} entries that is not a diffusionvl output "
                               f"(e.g. {entries[0]}): choose another output path, or pass --overwrite to replace it")
    raise DiffusionVLError(f"{path} exists and is not a folder: choose another output path, or pass --overwrite to "
                           "replace it")
