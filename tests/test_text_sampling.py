"""Streamed detokenisation with stop strings, and sampling: pure."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from peerd.inference.options import SamplingParams
from peerd.inference.sampling import distribution, make_generator, next_token
from peerd.inference.text import BYTE_LEVEL, TextStream, token_bytes, token_text

VOCAB = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "\n", 6: "END", 7: "E", 8: "ND!"}


def decode(ids: Sequence[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


def run(ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    ts = TextStream(decode, stop)
    out = [ts.push(i) for i in ids]
    out.append(ts.flush())
    return out, ts


def test_text_streams_everything_without_stop() -> None:
    out, ts = run([1, 2, 3, 4])
    assert "".join(out) == "Hello world" and ts.text() == "Hello world"


def test_stop_string_cuts_and_stops() -> None:
    out, ts = run([1, 2, 5, 3, 4], stop=("\n",))
    assert "".join(out) == "Hello" and ts.stopped and ts.text() == "Hello"


def test_stop_string_split_across_tokens_is_held_back() -> None:
    out, ts = run([1, 2, 7, 8], stop=("END",))
    assert out[2] == ""  # "E" might start "END": held back
    assert "".join(out) == "Hello" and ts.stopped


def test_held_back_prefix_released_when_not_a_stop() -> None:
    vocab_decode = {1: "Hel", 7: "E", 2: "lo"}
    ts = TextStream(lambda ids: "".join(vocab_decode[i] for i in ids), ("END",))
    parts = [ts.push(1), ts.push(7), ts.push(2), ts.flush()]
    assert parts[1] == "" and "".join(parts) == "HelElo" and not ts.stopped


def test_incomplete_utf8_is_held_back() -> None:
    chunks = {1: b"caf", 2: b"\xc3", 3: b"\xa9!"}

    def dec(ids: Sequence[int]) -> str:
        return b"".join(chunks[i] for i in ids).decode("utf-8", errors="replace")

    ts = TextStream(dec)
    assert [ts.push(1), ts.push(2), ts.push(3)] == ["caf", "", "é!"]


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    p = SamplingParams(temperature=0.0)
    assert next_token(logits, p, make_generator(p)) == 1


def test_seeded_sampling_is_reproducible() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0, seed=42)
    a = [next_token(logits, p, g) for g in [make_generator(p)] for _ in range(20)]
    b = [next_token(logits, p, g) for g in [make_generator(p)] for _ in range(20)]
    assert a == b and len(set(a)) > 1


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = SamplingParams(temperature=1.0, top_p=0.7, seed=1)
    g = make_generator(p)
    seen = {next_token(logits, p, g) for _ in range(300)}
    assert seen == {0, 1}


@pytest.mark.parametrize(("temperature", "top_p"), [
    (1e-30, 1.0), (1e-40, 1.0), (5e-324, 1.0), (1.0, 1e-300), (2.0, 5e-324)])
def test_a_tiny_temperature_or_top_p_is_as_good_as_greedy(temperature: float,
                                                          top_p: float) -> None:
    """The API takes any temperature in (0, 2] and top_p in (0, 1]; in float32 a tiny
    one rounds to 0 or makes logits / T overflow: the distribution was NaN, and
    torch.multinomial raised (a 500)."""
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0]) * 30
    p = SamplingParams(temperature=temperature, top_p=top_p, seed=0)
    probs = distribution(logits, p)
    assert torch.isfinite(probs).all() and int(probs.argmax()) == 1, probs
    assert float(probs.sum()) == pytest.approx(1.0)
    assert next_token(logits, p, make_generator(p)) == 1


@pytest.mark.parametrize("kwargs", [{"max_tokens": 0}, {"temperature": -1}, {"top_p": 0},
                                    {"stop": ("",)}, {"stop": tuple("abcdefghi")}])
def test_bad_params_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_a_tokens_bytes_come_back_whole_even_when_it_splits_a_character() -> None:
    from tests.models import _tiny_tokenizer

    assert sorted(BYTE_LEVEL.values()) == list(range(256))  # one character per byte
    tok = _tiny_tokenizer(384)
    text = "add(2, 3) \u2014 \u00e9\u00d74"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [token_bytes(tok, i) for i in ids]
    assert b"".join(pieces).decode() == text
    # a token holding part of a character shows its bytes, not U+FFFD
    partial = [p for p in pieces if not _decodes(p)]
    assert partial, "pick a text whose characters the tiny vocabulary splits"
    assert all("\\x" in token_text(p) and "\ufffd" not in token_text(p) for p in partial)

    class SentencePiece:  # byte fallback tokens, as Llama's tokenizer writes them
        def convert_ids_to_tokens(self, token_id: int) -> str:
            return {1: "<0xE2>", 2: "\u2581the", 3: "<s>"}[token_id]

        def decode(self, ids: list[int]) -> str:
            return {2: "the", 3: "<s>"}[ids[0]]

    assert token_bytes(SentencePiece(), 1) == b"\xe2"
    assert token_bytes(SentencePiece(), 2) == b" the"  # decoded alone it loses its space
    assert token_bytes(SentencePiece(), 3) == b"<s>"


def _decodes(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True
