"""diffusionvl.core.atomic: plain-write permissions, fsync before the rename, no debris and the previous content kept on
any failure (an exception from the writer, KeyboardInterrupt, a failed swap)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Callable, Iterator

import pytest

from diffusionvl.core import atomic
from diffusionvl.core.errors import DiffusionVLError


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _plain_file_mode(folder: Path) -> int:
    with open(folder / "plain.txt", "w") as fh:
        fh.write("x")
    mode = _mode(folder / "plain.txt")
    (folder / "plain.txt").unlink()
    return mode


def _plain_folder_mode(folder: Path) -> int:
    (folder / "plain").mkdir()
    mode = _mode(folder / "plain")
    (folder / "plain").rmdir()
    return mode


FILE_WRITERS: dict[str, Callable[[Path], Path]] = {
    "bytes": lambda p: atomic.write_bytes(p, b"data"),
    "text": lambda p: atomic.write_text(p, "data"),
    "json": lambda p: atomic.write_json(p, {"a": 1}),
    "file": lambda p: atomic.write_file(p, lambda tmp: tmp.write_bytes(b"data")),
}


@pytest.mark.parametrize("writer", FILE_WRITERS)
def test_a_file_gets_the_permissions_of_a_plain_write(tmp_path: Path, umask: int, writer: str) -> None:
    expected = _plain_file_mode(tmp_path)
    assert expected == 0o666 & ~umask
    for target in (tmp_path / "new.bin", tmp_path / "sub" / "new.bin"):  # missing parents are created
        FILE_WRITERS[writer](target)
        assert _mode(target) == expected


def test_a_file_a_writer_recreates_owner_only_still_gets_plain_permissions(tmp_path: Path, umask: int) -> None:
    def owner_only(tmp: Path) -> None:
        tmp.unlink()
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))

    atomic.write_file(tmp_path / "f", owner_only)
    assert _mode(tmp_path / "f") == _plain_file_mode(tmp_path)


def test_a_folder_and_its_entries_get_the_permissions_of_plain_writes(tmp_path: Path, umask: int) -> None:
    def write(tmp: Path) -> None:
        os.close(os.open(tmp / "secret.bin", os.O_WRONLY | os.O_CREAT, 0o600))  # as mkstemp-based writers do
        os.mkdir(tmp / "sub", 0o700)
        (tmp / "sub" / "plain.txt").write_text("x")
        (tmp / "run.sh").write_text("#!/bin/sh\n")
        (tmp / "run.sh").chmod(0o700)
        (tmp / "link").symlink_to(tmp_path / "elsewhere")  # dangling: settling must not follow links

    dst = atomic.write_folder(tmp_path / "model", write)
    folder_mode, file_mode = _plain_folder_mode(tmp_path), _plain_file_mode(tmp_path)
    assert folder_mode == 0o777 & ~umask
    assert _mode(dst) == folder_mode and _mode(dst / "sub") == folder_mode
    assert _mode(dst / "secret.bin") == file_mode and _mode(dst / "sub" / "plain.txt") == file_mode
    assert _mode(dst / "run.sh") == folder_mode  # an executable keeps its execute bits
    assert (dst / "link").is_symlink()


def _listing(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` (names, file contents): equal listings mean nothing was touched or left behind."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


class Boom(Exception):
    pass


FAILURES = [Boom, KeyboardInterrupt]


@pytest.mark.parametrize("error", FAILURES)
def test_a_failing_file_writer_keeps_the_previous_file_and_leaves_no_temp(tmp_path: Path, error: type) -> None:
    target = tmp_path / "result.json"
    target.write_text("previous")
    before = _listing(tmp_path)

    def write(tmp: Path) -> None:
        tmp.write_text("half")
        raise error()

    with pytest.raises(error):
        atomic.write_file(target, write)
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("error", FAILURES)
@pytest.mark.parametrize("step", ["_settle_file", "replace"])
def test_a_failure_after_the_data_is_written_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     error: type, step: str) -> None:
    target = tmp_path / "result.json"
    target.write_text("previous")
    before = _listing(tmp_path)

    def fail(*args: object) -> None:
        raise error()

    monkeypatch.setattr(*(atomic.os, "replace") if step == "replace" else (atomic, step), fail)
    with pytest.raises(error):
        atomic.write_json(target, {"new": True})
    assert _listing(tmp_path) == before


def _previous_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"previous")
    (folder / "sub" / "notes.txt").write_text("keep")
    return folder


@pytest.mark.parametrize("error", FAILURES)
def test_a_failing_folder_writer_keeps_the_previous_folder_and_leaves_no_temp(tmp_path: Path, error: type) -> None:
    folder = _previous_folder(tmp_path)
    before = _listing(tmp_path)

    def write(tmp: Path) -> None:
        (tmp / "weights.bin").write_bytes(b"half")
        raise error()

    with pytest.raises(error):
        atomic.write_folder(folder, write)
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("error", FAILURES)
def test_a_failed_swap_puts_the_previous_folder_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     error: type) -> None:
    folder = _previous_folder(tmp_path)
    before = _listing(tmp_path)
    real_replace = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if ".tmp-" in Path(src).name:  # the new folder moving in: fail after the old one was set aside
            raise error()
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(error):
        atomic.write_folder(folder, lambda tmp: (tmp / "weights.bin").write_bytes(b"new"))
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("rename", ["set_aside", "swap"])
def test_an_interrupt_right_after_a_rename_leaves_one_complete_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      rename: str) -> None:
    folder = _previous_folder(tmp_path)
    before = _listing(tmp_path)
    real_replace = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        real_replace(src, dst)
        hit = ".old-" in Path(dst).name if rename == "set_aside" else ".tmp-" in Path(src).name
        if hit:
            raise KeyboardInterrupt  # lands after the rename happened

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_folder(folder, lambda tmp: (tmp / "weights.bin").write_bytes(b"new"))
    after = _listing(tmp_path)
    assert after == (before if rename == "set_aside" else {"model": None, "model/weights.bin": b"new"})


@pytest.mark.parametrize("previous", ["folder", "file", "none"])
def test_replacing_leaves_only_the_new_folder(tmp_path: Path, previous: str) -> None:
    folder = tmp_path / "model"
    if previous == "folder":
        _previous_folder(tmp_path)
    elif previous == "file":
        folder.write_text("a file where the folder goes")

    def write(tmp: Path) -> None:
        (tmp / "weights.bin").write_bytes(b"new")

    assert atomic.write_folder(folder, write) == folder
    assert _listing(tmp_path) == {"model": None, "model/weights.bin": b"new"}


def test_data_is_fsynced_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic.write_text(tmp_path / "a.txt", "a")
    assert events == ["fsync", "replace"]
    events.clear()
    atomic.write_folder(tmp_path / "f", lambda tmp: [(tmp / n).write_text(n) for n in ("x", "y")])
    assert events == ["fsync", "fsync", "replace"]


def test_json_round_trips_in_order_with_a_trailing_newline(tmp_path: Path) -> None:
    data = {"z": 1, "a": [1.5, None, True], "name": "caf\u00e9 \u2192 \u6f22\u5b57", "nested": {"b": {}, "a": []}}
    path = atomic.write_json(tmp_path / "d.json", data)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == data and list(json.loads(text)) == ["z", "a", "name", "nested"]
    assert text == json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def test_the_temp_file_keeps_the_suffix_so_writers_can_pick_the_format(tmp_path: Path) -> None:
    seen: list[Path] = []
    atomic.write_file(tmp_path / "plot.png", lambda tmp: (seen.append(tmp), tmp.write_bytes(b"png")))
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".plot.png.tmp-") and seen[0].suffix == ".png"
    assert _listing(tmp_path) == {"plot.png": b"png"}


def test_an_unwritable_location_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    for call in (lambda p: atomic.write_text(p, "x"), lambda p: atomic.write_folder(p, lambda tmp: None)):
        with pytest.raises(DiffusionVLError, match="cannot write") as info:
            call(tmp_path / "file" / "out")
        assert "\n" not in str(info.value)
    assert _listing(tmp_path) == {"file": b"not a folder"}
