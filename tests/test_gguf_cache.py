"""A GGUF's metadata converted once per machine (gguf_cache): what comes back equals what
transformers parses from the GGUF itself, and the cache survives crashes, races,
corruption, replaced files and an unwritable root."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerd.inference.model import gguf_cache
from peerd.inference.model.source import load_config, load_tokenizer, resolve
from tests.test_inference_model import needs_smollm2

TEXTS = ["Hello, world!", "  def f(x):\n\treturn x ** 2  # ünïcödé ✓", "12 + 30 = 42.",
         "<|im_start|>user\nhi<|im_end|>", ""]


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("PEERD_CACHE_DIR", str(tmp_path / "cache"))
    gguf_cache._converted.cache_clear()
    gguf_cache.tensor_table.cache_clear()
    yield tmp_path / "cache"
    gguf_cache._converted.cache_clear()
    gguf_cache.tensor_table.cache_clear()


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Conversion by a stand-in that writes a minimal entry and records each call: the
    cache's bookkeeping, without seconds of parsing."""
    calls: list[Path] = []

    def convert(path: Path, into: Path) -> None:
        calls.append(path)
        (into / "config.json").write_text(json.dumps({"source": path.name}))
        (into / gguf_cache.TENSORS).write_text(json.dumps(
            {"format": gguf_cache.FORMAT, "source": gguf_cache.source_record(path),
             "architecture": "llama", "tensors": {}}))

    monkeypatch.setattr(gguf_cache, "_convert", convert)
    return calls


def _gguf(tmp_path: Path, name: str = "m.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(b"GGUF" + bytes(60))
    return path


@needs_smollm2
def test_a_conversion_loads_as_transformers_parses_the_gguf() -> None:
    """In the suite's own cache (the conversion, seconds, is shared with every test that
    loads SmolLM2)."""
    from transformers import AutoConfig, AutoTokenizer

    source = resolve("smollm2")
    config = load_config(source)
    entry = gguf_cache.converted(source.gguf_path)
    assert entry.parent == gguf_cache.cache_root() / "gguf"
    assert entry.name.startswith("SmolLM2-135M-Instruct.Q4_1-")

    want = AutoConfig.from_pretrained(str(source.path), gguf_file=source.gguf_file)
    skip = {"_name_or_path", "transformers_version"}
    assert ({k: v for k, v in config.to_dict().items() if k not in skip}
            == {k: v for k, v in want.to_dict().items() if k not in skip})

    mine = load_tokenizer(source)
    theirs = AutoTokenizer.from_pretrained(str(source.path), gguf_file=source.gguf_file)
    assert mine.chat_template == theirs.chat_template
    assert (mine.eos_token_id, mine.bos_token_id, mine.pad_token_id) == (
        theirs.eos_token_id, theirs.bos_token_id, theirs.pad_token_id)
    assert mine.all_special_tokens == theirs.all_special_tokens
    chat = [{"role": "user", "content": TEXTS[1]}]
    texts = [*TEXTS, theirs.apply_chat_template(chat, add_generation_prompt=True,
                                                tokenize=False)]
    assert mine.apply_chat_template(chat, add_generation_prompt=True,
                                    tokenize=False) == texts[-1]
    for text in texts:
        ids = theirs(text, add_special_tokens=False)["input_ids"]
        assert mine(text, add_special_tokens=False)["input_ids"] == ids, text
        assert mine.decode(ids) == theirs.decode(ids)

    # the tensor table: gguf-py's reader, tensor for tensor (data compared as bytes)
    import numpy as np
    from gguf import GGUFReader

    architecture, table = gguf_cache.tensor_table(str(source.gguf_path))
    reader = GGUFReader(str(source.gguf_path))
    assert architecture == "llama" and set(table) == {t.name for t in reader.tensors}
    for t in reader.tensors:
        assert table[t.name].tensor_type == t.tensor_type, t.name
        assert table[t.name].data.shape == t.data.shape, t.name
        assert np.array_equal(table[t.name].data, t.data), t.name


def test_a_file_is_converted_once_then_again_when_it_changes(
        root: Path, tmp_path: Path, fake_convert: list[Path]) -> None:
    path = _gguf(tmp_path)
    assert not gguf_cache.is_converted(path)
    entry = gguf_cache.converted(path)
    assert entry.parent == root / "gguf" and fake_convert == [path]
    assert gguf_cache.is_converted(path)
    gguf_cache._converted.cache_clear()  # another process: the entry on disk serves it
    assert gguf_cache.converted(path) == entry and fake_convert == [path]
    assert not [p for p in entry.parent.iterdir() if p != entry]  # no work dir left

    (tmp_path / "elsewhere").mkdir()  # the same file name in another directory
    other = gguf_cache.converted(_gguf(tmp_path / "elsewhere"))
    assert other != entry and len(fake_convert) == 2

    stat = path.stat()  # the file replaced: a new modification time
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert not gguf_cache.is_converted(path)
    gguf_cache._converted.cache_clear()
    renewed = gguf_cache.converted(path)
    assert renewed != entry and len(fake_convert) == 3
    # the path's older entry went; the other path's stayed
    assert sorted(p.name for p in root.joinpath("gguf").iterdir()) == sorted(
        [renewed.name, other.name])


def test_two_library_versions_keep_an_entry_each(root: Path, tmp_path: Path,
                                                 fake_convert: list[Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    path = _gguf(tmp_path)
    entry = gguf_cache.converted(path)
    monkeypatch.setattr(transformers, "__version__", "0.0.0-another-environment")
    gguf_cache._converted.cache_clear()
    assert not gguf_cache.is_converted(path)
    another = gguf_cache.converted(path)
    assert another != entry and len(fake_convert) == 2
    assert entry.is_dir() and another.is_dir()  # neither converts over the other


def test_an_entry_left_incomplete_or_unreadable_is_converted_again(
        root: Path, tmp_path: Path, fake_convert: list[Path]) -> None:
    path = _gguf(tmp_path)
    entry = gguf_cache.converted(path)
    (entry / gguf_cache.TENSORS).unlink()  # a crash before the last file: incomplete
    gguf_cache._converted.cache_clear()
    assert gguf_cache.converted(path) == entry and len(fake_convert) == 2
    assert (entry / gguf_cache.TENSORS).is_file()

    (entry / "config.json").write_text("{ not json")  # a disk fault, a hand edit
    config = gguf_cache.load(path, lambda e: json.loads((e / "config.json").read_text()))
    assert config == {"source": "m.gguf"} and len(fake_convert) == 3


def test_a_race_keeps_one_whole_entry(root: Path, tmp_path: Path,
                                      fake_convert: list[Path],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = _gguf(tmp_path)
    convert = gguf_cache._convert

    def racing(p: Path, into: Path) -> None:  # another process finishes first
        monkeypatch.setattr(gguf_cache, "_convert", convert)
        winner = gguf_cache._converted.__wrapped__(str(p.resolve()))
        (winner / "config.json").write_text(json.dumps({"winner": True}))
        convert(p, into)

    monkeypatch.setattr(gguf_cache, "_convert", racing)
    entry = gguf_cache.converted(path)
    assert json.loads((entry / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # the loser's is gone


def test_an_unwritable_root_converts_for_this_process(
        root: Path, tmp_path: Path, fake_convert: list[Path],
        caplog: pytest.LogCaptureFixture) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    root.write_text("a file where the cache directory should be")
    path = _gguf(tmp_path)
    entry = gguf_cache.converted(path)
    assert entry.is_dir() and not entry.is_relative_to(root)
    assert (entry / gguf_cache.TENSORS).is_file() and fake_convert == [path]
    assert "PEERD_CACHE_DIR" in caplog.text


def test_the_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    monkeypatch.setenv("PEERD_CACHE_DIR", str(tmp_path / "mine"))
    assert gguf_cache.cache_root() == tmp_path / "mine"
    monkeypatch.delenv("PEERD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache.cache_root() == tmp_path / "xdg" / "peerd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert gguf_cache.cache_root() == tmp_path / ".cache" / "peerd"


def test_peerd_cache_lists_and_clears_entries(root: Path, tmp_path: Path,
                                              fake_convert: list[Path]) -> None:
    from click.testing import CliRunner

    from peerd.cli import main

    run = CliRunner().invoke
    r = run(main, ["cache", "list"])
    assert r.exit_code == 0 and "is empty" in r.output
    a, b, c = (_gguf(tmp_path, f"{n}.gguf") for n in "abc")
    kept = {p: gguf_cache.converted(p).name for p in (a, b, c)}
    os.utime(b, ns=(1, 1))  # changed since: its entry is outdated
    c.unlink()  # gone: its entry is orphaned
    (root / "gguf" / "d-0-1").mkdir()  # a conversion killed before it was whole
    # a's file as it is, converted by an environment with another transformers version
    other = root / "gguf" / kept[a].replace(kept[a].split("-")[-2], "0" * 8)
    shutil.copytree(root / "gguf" / kept[a], other)
    (root / "gguf" / ".e-0-1.x").mkdir()  # a conversion under way
    r = run(main, ["cache", "list", "--json"])
    assert r.exit_code == 0, r.output
    listed = json.loads(r.stdout)
    assert listed["root"] == str(root) and listed["bytes"] > 0
    states = {e["name"]: e["state"] for e in listed["entries"]}
    assert states == {kept[a]: "current", kept[b]: "outdated", kept[c]: "orphaned",
                      "d-0-1": "partial", ".e-0-1.x": "converting",
                      other.name: "other-libraries"}
    assert {e["source"] for e in listed["entries"]} == {str(a), str(b), str(c), None}
    r = run(main, ["cache", "list"])
    assert r.exit_code == 0 and "3 no load will read again" in r.output
    r = run(main, ["cache", "clear", "--stale", "--json"])
    assert r.exit_code == 0, r.output
    assert sorted(json.loads(r.stdout)["removed"]) == sorted([kept[b], kept[c], "d-0-1"])
    assert {e.name for e in gguf_cache.entries()} == {kept[a], ".e-0-1.x", other.name}
    gguf_cache._converted.cache_clear()
    assert gguf_cache.converted(a).name == kept[a] and fake_convert.count(a) == 1
    r = run(main, ["cache", "clear"])  # all but a conversion under way
    assert r.exit_code == 0 and "removed 2 entries" in r.output
    assert gguf_cache.converted(a).name == kept[a] and fake_convert.count(a) == 2
    for name in ("..", ".", "", "../gguf", "nothing-here"):
        with pytest.raises(ValueError, match="not an entry of the model cache"):
            gguf_cache.remove([name])
    assert (root / "gguf" / ".e-0-1.x").is_dir()
