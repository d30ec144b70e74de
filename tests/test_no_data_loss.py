"""Writing a model never deletes what a user keeps at the output path unless asked (--overwrite), leaves no debris,
and an unwritable output is one line with exit code 2."""

from __future__ import annotations

import pytest

from diffusionvl.cli import main
from diffusionvl.conversion import convert
from diffusionvl.errors import DiffusionVLError


def _convert(dst, *extra):
    return main(["convert", "--tiny", "llama", str(dst), "--block-size", "4", *extra])


def _debris(folder):
    return sorted(p.name for p in folder.iterdir() if ".old-" in p.name or ".tmp-" in p.name)


@pytest.mark.parametrize("make", ["folder_with_notes", "regular_file"])
def test_convert_refuses_a_target_that_is_not_a_model_and_replaces_it_only_with_overwrite(tmp_path, capsys, make):
    dst = tmp_path / "d"
    if make == "folder_with_notes":
        dst.mkdir()
        (dst / "notes.txt").write_text("x")
        kept = dst / "notes.txt"
    else:
        dst.write_text("precious")
        kept = dst
    assert _convert(dst) == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err and "\n" not in err and "Traceback" not in err
    assert kept.read_text() in ("x", "precious")  # untouched
    assert _convert(dst, "--overwrite") == 0
    assert (dst / "diffusionvl.json").is_file() and not (dst / "notes.txt").exists()
    assert _debris(tmp_path) == []


def test_rerunning_into_a_model_folder_or_an_empty_folder_replaces_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _convert(empty) == 0
    assert _convert(empty) == 0  # same kind of output: a rerun replaces it
    assert (empty / "diffusionvl.json").is_file() and _debris(tmp_path) == []


def test_current_directory_and_unwritable_paths_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("keep")
    assert _convert(".") == 2
    assert (tmp_path / "mine.txt").read_text() == "keep"
    assert _convert("/proc/diffusionvl-x") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error:") for line in err), err


def test_python_api_refuses_too(tmp_path):
    src = tmp_path / "src"
    assert _convert(src) == 0
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "a.txt").write_text("a")
    with pytest.raises(DiffusionVLError, match="overwrite"):
        convert(src, dst)
    assert (dst / "a.txt").read_text() == "a"
    convert(src, dst, overwrite=True)
    assert (dst / "diffusionvl.json").is_file()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights_are_one_line(tmp_path, capsys, damage):
    model = tmp_path / "m"
    assert _convert(model) == 0
    capsys.readouterr()  # the conversion's own output
    weights = model / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.write_bytes(b"\x00" * 5000)
    assert main(["generate", "--model", str(model), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read the weights") and "\n" not in err
