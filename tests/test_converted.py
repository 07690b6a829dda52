"""The converted-model cache: a manifest checked on load, damaged copies rebuilt, stale staging removed,
a truncated GGUF and a bad KVC_CACHE refused in one line before any work."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kvc import converted, models
from kvc.converted import MANIFEST, WHOLE_BELOW
from kvc.policies.errors import KvcError


def fake_conversion(folder: Path) -> None:
    """What a conversion leaves: a config, a tokenizer file and weights big enough to be sampled."""
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text('{"vocab": {}}')
    save_file({"weight": torch.arange(WHOLE_BELOW // 4 + 1000, dtype=torch.float32)}, str(folder / "model.safetensors"))
    converted.write_manifest(folder)


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "converted"
    path.mkdir()
    fake_conversion(path)
    return path


def overwrite(path: Path, offset: int, data: bytes, keep_time: bool = False) -> None:
    status = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)
    if keep_time:
        os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))


def test_a_whole_folder_passes(folder):
    assert converted.problem(folder) is None


@pytest.mark.parametrize("damage, expected", [
    (lambda f: os.truncate(f / "model.safetensors", WHOLE_BELOW // 2), "model.safetensors has"),
    (lambda f: overwrite(f / "model.safetensors", WHOLE_BELOW // 3, b"\xff" * 64), "changed since it was converted"),
    (lambda f: overwrite(f / "model.safetensors", 200, b"\x7f" * 64, keep_time=True), "changed since it was converted"),
    (lambda f: overwrite(f / "config.json", 2, b"X", keep_time=True), "config.json changed"),
    (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    (lambda f: (f / MANIFEST).write_text("[1, 2"), "unreadable"),
])
def test_damage_is_found(folder, damage, expected):
    damage(folder)
    assert expected in converted.problem(folder)


def test_a_folder_from_before_manifests_is_checked_then_adopted(folder):
    (folder / MANIFEST).unlink()
    assert converted.problem(folder) is None and (folder / MANIFEST).is_file()
    (folder / MANIFEST).unlink()
    os.truncate(folder / "model.safetensors", WHOLE_BELOW)
    assert "truncated" in converted.problem(folder)


def test_a_copied_folder_is_rehashed_once_then_fast(folder):
    os.utime(folder / "model.safetensors", ns=(0, 0))
    assert converted.problem(folder) is None
    recorded = json.loads((folder / MANIFEST).read_text())["files"]["model.safetensors"]["mtime_ns"]
    assert recorded == 0


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """KVC_CACHE in tmp_path, and a stand-in for the 30-second GGUF conversion that counts its calls."""
    monkeypatch.setenv("KVC_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(gguf, folder):
        calls.append(folder)
        fake_conversion(folder)

    monkeypatch.setattr(models, "_convert", convert)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    return gguf, calls


def test_a_damaged_conversion_is_rebuilt_and_said_so(cache, caplog):
    gguf, calls = cache
    target = models.converted_gguf_dir(gguf)
    assert models.converted_gguf_dir(gguf) == target and len(calls) == 1
    os.truncate(target / "model.safetensors", 1000)
    with caplog.at_level(logging.WARNING, logger="kvc"):
        assert models.converted_gguf_dir(gguf) == target
    assert len(calls) == 2 and converted.problem(target) is None
    assert f"the converted model in {target} is damaged" in caplog.text and "converting it again" in caplog.text
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_an_interrupted_conversion_leaves_no_staging_and_a_killed_ones_is_removed(cache, monkeypatch):
    from kvc.interrupts import Interrupted

    gguf, calls = cache
    models_folder = models.cache_folder("models")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    killed = models_folder / f".tiny-0.{child.pid}-0badf00d.kvc-tmp"  # as SIGKILL mid-conversion leaves it
    (killed / "sub").mkdir(parents=True)

    def interrupted(gguf, folder):
        (folder / "model.safetensors").write_bytes(bytes(1000))
        raise Interrupted()

    monkeypatch.setattr(models, "_convert", interrupted)
    with pytest.raises(Interrupted):
        models.converted_gguf_dir(gguf)
    assert list(models_folder.iterdir()) == []  # the killed one went before, this one on the way out


def test_a_truncated_gguf_is_refused_before_converting(tmp_path, monkeypatch):
    monkeypatch.setenv("KVC_CACHE", str(tmp_path / "cache"))
    whole = Path(models.resolve(None).location)
    cut = tmp_path / "cut.gguf"
    with open(whole, "rb") as source:
        cut.write_bytes(source.read(whole.stat().st_size // 2))
    with pytest.raises(KvcError, match="cut.gguf: .*truncated"):
        models.load(str(cut))
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == []


@pytest.mark.parametrize("value, message", [
    ("", "KVC_CACHE is set but empty"),
    ("{file}", "that is a file, not a folder"),
    ("{file}/sub", "cannot create the kvc cache folder"),
])
def test_a_bad_kvc_cache_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, value, message):
    from kvc.cli import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("KVC_CACHE", value.format(file=afile))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["generate", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
