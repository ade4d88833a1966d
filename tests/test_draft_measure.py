"""`peerd draft measure`: k per kind of prompt on held-out answers, for a head as a chain
and a tree and for prompt lookup, on a tiny random Llama with a freshly initialised
head; and the replay's verification on its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from peerd.cli import main
from peerd.inference.model.head import Head
from peerd.inference.model.source import load_config, resolve
from peerd.inference.speculative.eagle import EagleConfig, EagleHead
from peerd.inference.speculative.eagle_data import read_answers
from peerd.inference.speculative.eagle_file import save_eagle
from peerd.inference.speculative.eagle_measure import agreed, descended
from peerd.inference.speculative.tree import TokenTree
from tests.models import tiny_llama_dir

KINDS = {"chat": ["What is the capital of France?", "Why is the sky blue?",
                  "How do shards keep a cache?"],
         "code": ["def add(a, b):", "def shard(layers):", "0 1 2 3 4 5"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def head_file(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    source = resolve(str(tiny))
    path = tmp_path_factory.mktemp("head") / "fresh.safetensors"
    save_eagle(EagleHead(EagleConfig.from_target(load_config(source))), Head(source), path)
    return path


def test_verification_along_a_known_answer() -> None:
    assert agreed([5, 6, 7], [5, 6, 9, 1]) == 2
    assert agreed([5, 6, 7], [5, 6, 7, 1]) == 3
    assert agreed([5, 6, 7], [5, 6]) == 1  # the last token of the answer is the target's
    assert agreed([], [5, 6]) == 0
    # a tree: 5 -> (6 -> 7, 8), 9; the answer goes 5, 8
    tree = TokenTree([5, 6, 7, 8, 9], [-1, 0, 1, 0, -1])
    assert descended(tree, [5, 8, 3]) == 2
    assert descended(tree, [5, 6, 7, 2]) == 3
    assert descended(tree, [9, 9]) == 1
    assert descended(tree, [4, 5, 6]) == 0
    assert descended(tree, [5, 6, 7]) == 2  # the answer ends: its last token is the target's


def test_peerd_draft_measure_reports_k_per_kind(tmp_path: Path, tiny: Path,
                                                head_file: Path) -> None:
    files = []
    for kind, texts in KINDS.items():
        path = tmp_path / f"{kind}.jsonl"
        key = "prompt" if kind == "chat" else "completion"
        path.write_text("".join(json.dumps({key: t, "kind": kind}) + "\n" for t in texts))
        files.append(path)
    data = tmp_path / "answers.pt"
    args = ["draft", "measure", "--model", str(tiny), "--head", str(head_file),
            "--prompts", f"chat={files[0]}", str(files[1]),  # an argument: kind = its stem
            "--gamma", "2", "--gamma", "3", "--tree", "--max-new-tokens", "12",
            "--data", str(data), "--threads", "1"]
    run = CliRunner().invoke
    r = run(main, [*args, "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["answers"] == {"generated": 6, "reused": 0} and data.is_file()
    assert set(report["k"]) == {"eagle-chain@2", "eagle-chain@3", "eagle-tree@2",
                                "eagle-tree@3", "ngram@2", "ngram@3"}
    for config, parts in report["k"].items():
        assert set(parts) == {"all", "chat", "code"}, config
        gamma = int(config.split("@")[1])
        for kind, a in parts.items():
            assert a["rounds"] > 0 and 1.0 <= a["tokens_per_round"] <= gamma + 1, (config, kind)
        assert parts["all"]["rounds"] == parts["chat"]["rounds"] + parts["code"]["rounds"]
    assert report["kinds"]["chat"]["prompts"] == 3 and report["kinds"]["code"]["prompts"] == 3
    # the figures name the machine they came from
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert isinstance(report["machine"]["bf16_native"], bool)
    assert read_answers(data)[0]["max_new_tokens"] == 12
    # again: the answers are reused, the figures the same; the table names every kind
    r = run(main, args)
    assert r.exit_code == 0, r.output
    assert "chat" in r.output and "code" in r.output and "tree d3" in r.output
    assert "0 generated, 6 reused" in r.output
    r = run(main, [*args, "--json", "--limit", "1"])
    assert r.exit_code == 0 and json.loads(r.stdout)["kinds"]["code"]["prompts"] == 1


def test_peerd_draft_measure_refuses_bad_input(tmp_path: Path, tiny: Path, head_file: Path,
                                               tmp_path_factory: pytest.TempPathFactory
                                               ) -> None:
    good = tmp_path / "chat.jsonl"
    good.write_text(json.dumps({"prompt": "Hello there"}) + "\n")
    run = CliRunner().invoke
    common = ["draft", "measure", "--model", str(tiny), "--head", str(head_file),
              "--max-new-tokens", "8", "--threads", "1"]
    r = run(main, [*common, "--prompts", f"chat={tmp_path / 'missing.jsonl'}"])
    assert r.exit_code == 1 and "no such file" in r.output
    r = run(main, common)
    assert r.exit_code == 1 and "give the held-out prompt files" in r.output
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    r = run(main, [*common, "--prompts", str(broken)])
    assert r.exit_code == 1 and "broken.jsonl:1: not JSON" in r.output
    other = tiny_llama_dir(tmp_path_factory, seed=1)
    r = run(main, ["draft", "measure", "--model", str(other), "--head", str(head_file),
                   "--prompts", str(good)])
    assert r.exit_code == 1 and "embed_fingerprint" in r.output
    r = run(main, ["draft", "measure", "--model", str(tiny), "--prompts", str(good)])
    assert r.exit_code == 1 and "no EAGLE head is shipped" in r.output
