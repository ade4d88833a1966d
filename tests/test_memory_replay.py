"""SEDM's execution contexts and replays: the SCEC on the wire (bounds, hash, strict
decoding), the scorers, the one prompt layout, and, on a tiny random Llama served by
a real node, that replaying a recorded SCEC reproduces its output exactly and that a
replay under another model or version is refused."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from peerd.inference.face import LanguageModel
from peerd.inference.options import SamplingParams
from peerd.inference.slot import ModelOptions, ModelSlot
from peerd.memory import prompting, scoring
from peerd.memory.replay import ReplayRefused, record, replay, run_task
from peerd.memory.scec import Task, build, decode_scec, encode_scec, params_of, scec_hash
from protocols import memory as wire
from protocols.codec import encode, packb
from protocols.errors import WireError
from protocols.memory import ScecMsg
from tests.harness import gossip, swarm
from tests.models import tiny_llama_dir

ITEM = "Q: What is 1 + 1?\nA: 2"
ITEM_ID = "ab" * 32


@contextlib.asynccontextmanager
async def served(tmp_path: Path, spec: str) -> AsyncIterator[LanguageModel]:
    """The face of `spec` served whole by one real node."""
    async with swarm(1, tmp_path) as (node,):
        slot = ModelSlot(node, gossip(node), ModelOptions(spec, torch_threads=1))
        await node.start(slot)
        await slot.settled.wait()
        yield slot.face()  # ModelUnavailable, saying why, when it failed to load


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


def an_scec(**fields: Any) -> ScecMsg:
    scec = build(Task("What is 2 + 3?", "5", "number", "arithmetic"), model="m", version="",
                 params=SamplingParams(max_tokens=16, seed=7), memory=[ITEM],
                 memory_ids=[ITEM_ID], output="It is 5.", score=1.0, prompt_tokens=40,
                 latency_s=0.25)
    return dataclasses.replace(scec, **fields)


# ---- the SCEC on the wire --------------------------------------------------------


def test_scec_round_trips_and_its_hash_is_of_its_canonical_bytes() -> None:
    scec = an_scec()
    data = encode_scec(scec)
    assert decode_scec(data) == scec
    assert encode_scec(decode_scec(data)) == data  # canonical: the same bytes again
    assert scec_hash(scec) == hashlib.sha256(data).hexdigest()
    assert wire.SCEC_HASH.fullmatch(scec_hash(scec))
    # every field is in the hash
    variants: list[dict[str, Any]] = [
        {"prompt": "What is 2 + 4?"}, {"version": "v1"}, {"seed": 8}, {"output": "5"},
        {"memory": ("Q: 2 + 2?\nA: 4",)}, {"memory_ids": ()}, {"score": 0.0},
        {"latency_s": 0.5}, {"stop": ("\n",)}]
    for fields in variants:
        changed = an_scec(**fields)
        changed.check()
        assert scec_hash(changed) != scec_hash(scec), fields
    assert params_of(scec) == SamplingParams(max_tokens=16, seed=7)
    assert params_of(an_scec(temperature=0.7, top_p=0.9), greedy=True) == \
        SamplingParams(max_tokens=16, seed=7)


@pytest.mark.parametrize("fields,says", [
    ({"prompt": " "}, "prompt empty"),
    ({"prompt": "x" * (wire.MAX_PROMPT_CHARS + 1)}, "prompt of"),
    ({"domain": "Arith metic"}, "domain"),
    ({"model": ""}, "model empty"),
    ({"version": "v" * (wire.MAX_VERSION_CHARS + 1)}, "version of"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": wire.MAX_SCEC_TOKENS + 1}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"stop": ("",)}, "stop string empty"),
    ({"stop": ("s" * (wire.MAX_SCEC_STOP_CHARS + 1),)}, "stop string empty or over"),
    ({"stop": ("s",) * (wire.MAX_SCEC_STOPS + 1)}, "stop strings"),
    ({"memory": ("",), "memory_ids": ()}, "memory item empty"),
    ({"memory": ("m",) * (wire.MAX_SCEC_ITEMS + 1), "memory_ids": ()}, "items"),
    ({"memory_ids": (ITEM_ID, ITEM_ID)}, "item ids for"),
    ({"memory_ids": ("not an id",)}, "not an item id"),
    ({"answer": "x" * (wire.MAX_ANSWER_CHARS + 1)}, "answer of"),
    ({"scorer": "regex"}, "scorer"),
    ({"output": "x" * (wire.MAX_OUTPUT_CHARS + 1)}, "output of"),
    ({"score": 1.5}, "score"),
    ({"score": float("inf")}, "score"),
    ({"prompt_tokens": -1}, "prompt_tokens"),
    ({"latency_s": -1.0}, "latency_s"),
])
def test_an_scec_out_of_bounds_is_refused_clearly(fields: dict[str, Any], says: str) -> None:
    bad = an_scec(**fields)
    with pytest.raises(WireError, match=says):
        bad.check()
    with pytest.raises(WireError, match=says):  # as a peer or a damaged store sends it
        decode_scec(encode(bad))


def test_malformed_scec_bytes_are_refused() -> None:
    good = an_scec().to_wire()
    for bad in [b"\xc1garbage", packb([1, 2]), packb({**good, "extra": 1}),
                packb({k: v for k, v in good.items() if k != "output"}),
                packb({**good, "seed": "7"}), packb({**good, "memory": "one item"}),
                packb({**good, "t": "memory.item"}), packb({**good, "v": 2})]:
        with pytest.raises(WireError):
            decode_scec(bad)


# ---- scorers and the prompt ------------------------------------------------------


def test_scorers() -> None:
    assert set(scoring.SCORERS) == set(wire.SCORERS)  # every scorer the wire allows exists
    assert scoring.score("number", "So 47 + 38 = 85.", "85") == 1.0
    assert scoring.score("number", "1,234.0", "1234") == 1.0
    assert scoring.score("number", "85 or 86", "85") == 0.0  # the final number counts
    assert scoring.score("number", "no number", "85") == 0.0
    assert scoring.score("number", "85", "no number") == 0.0
    assert scoring.score("exact", "  Paris\n", "Paris") == 1.0
    assert scoring.score("exact", "Paris.", "Paris") == 0.0
    assert scoring.score("contains", "It is Paris.", " Paris ") == 1.0
    assert scoring.score("contains", "It is Lyon.", "Paris") == 0.0
    assert scoring.score("contains", "anything", "  ") == 0.0
    with pytest.raises(ValueError, match="unknown scorer 'regex': use one of number, exact"):
        scoring.scorer("regex")


def test_the_prompt_layout_is_fixed() -> None:
    assert prompting.messages("What is 2 + 3?", []) == [
        {"role": "user", "content": "What is 2 + 3?"}]
    assert prompting.messages("What is 2 + 3?", [" Rule one. ", "Q: 1 + 1?\nA: 2"]) == [
        {"role": "user", "content": "Notes that helped on similar tasks:\n\nRule one.\n\n"
                                    "Q: 1 + 1?\nA: 2\n\nWhat is 2 + 3?"}]


# ---- replays on a tiny random Llama ----------------------------------------------


async def test_replaying_an_scec_reproduces_its_output_exactly(tmp_path: Path,
                                                               tiny: Path) -> None:
    task = Task("What is 10 + 7?", "17", "number", "arithmetic")
    async with served(tmp_path, str(tiny)) as face:
        for params in [SamplingParams(max_tokens=16), SamplingParams(
                max_tokens=16, temperature=0.8, top_p=0.95, seed=1234)]:
            outcome, scec = await record(face, task, [ITEM], params, version="v3",
                                         memory_ids=[ITEM_ID])
            assert outcome.output and outcome.completion_tokens >= 1
            assert scec.model == face.model_id and scec.version == "v3"
            assert (scec.output, scec.prompt_tokens) == (outcome.output, outcome.prompt_tokens)
            stored = decode_scec(encode_scec(scec))  # through bytes, as the store keeps it
            again = await replay(face, stored, version="v3")
            assert again.output == scec.output
            assert (again.score, again.prompt_tokens, again.completion_tokens) == \
                (scec.score, scec.prompt_tokens, outcome.completion_tokens)
        # the memory is in the prompt: without it the prompt is shorter
        bare = await run_task(face, task, [], SamplingParams(max_tokens=16))
        assert bare.prompt_tokens < outcome.prompt_tokens

        with pytest.raises(ReplayRefused, match="recorded on model 'other-model'"):
            await replay(face, dataclasses.replace(scec, model="other-model"), version="v3")
        with pytest.raises(ReplayRefused, match=r"recorded on version 'v3'.*this is version "
                                                 r"'base'"):
            await replay(face, scec)
        with pytest.raises(ReplayRefused, match="without a seed"):
            await replay(face, dataclasses.replace(scec, seed=None), version="v3")
        with pytest.raises(ValueError, match="unknown scorer"):
            await run_task(face, Task("What is 1 + 1?", "2", "regex"), [])
        # a tampered SCEC is refused as bytes; the model keeps serving replays
        data = bytearray(encode_scec(scec))
        data[-1] ^= 0xFF
        with pytest.raises(WireError):
            decode_scec(bytes(data))
        assert (await replay(face, scec, version="v3")).output == scec.output
