"""Versioned weights, pure: manifests and chunks round trip bit for bit; a bad hash, a
truncated chunk or a manifest that lies about sizes is refused with a clear error;
LoRA deltas and shard-only name selection; the wire messages round trip and refuse
what no honest peer sends."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from peerd.rl.manifest import (
    MissingChunks,
    assemble,
    build_manifest,
    holds_head,
    layer_names,
    lora_deltas,
    tensor_bytes,
)
from protocols.codec import Message, decode, encode
from protocols.errors import WireError
from protocols.weights import (
    BadAnnounce,
    BadChunk,
    BadManifest,
    ChunkReply,
    ChunkRequest,
    Have,
    Manifest,
    ManifestReply,
    ManifestRequest,
    SignedAnnounce,
    TensorEntry,
    VersionAnnounce,
    digest,
    manifest_hash,
)

KIB = 1024


def model_tensors(layers: int = 3, hidden: int = 32, dtype: torch.dtype = torch.float32
                  ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {"model.embed_tokens.weight": torch.randn(100, hidden, generator=g),
           "model.norm.weight": torch.randn(hidden, generator=g),
           "lm_head.weight": torch.randn(100, hidden, generator=g)}
    for i in range(layers):
        out[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(hidden, hidden, generator=g)
        out[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(2 * hidden, hidden, generator=g)
        out[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(hidden, generator=g)
    return {k: v.to(dtype) for k, v in out.items()}


# ---- round trip ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    tensors = model_tensors(dtype=dtype)
    tensors["scalar"] = torch.tensor(1.5, dtype=dtype)
    tensors["empty"] = torch.zeros(0, 4, dtype=dtype)
    tensors["strided"] = torch.arange(64, dtype=dtype).reshape(8, 8).t()  # not contiguous
    manifest, chunks = build_manifest("run-1", "tiny", 3, "full", tensors, chunk_bytes=KIB)
    back = assemble(manifest, chunks)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t), name
    assert manifest.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    # every chunk is at most chunk_bytes and named by its SHA-256
    assert all(len(c) <= KIB and digest(c) == h for h, c in chunks.items())
    # the identity is a pure function of the contents
    again, _ = build_manifest("run-1", "tiny", 3, "full", dict(reversed(tensors.items())),
                              chunk_bytes=KIB)
    assert manifest_hash(again) == manifest_hash(manifest)
    assert manifest_hash(dataclasses.replace(manifest, version=4)) != manifest_hash(manifest)


def test_bytes_are_little_endian_raw_elements() -> None:
    t = torch.tensor([1.0, -2.0], dtype=torch.float32)
    assert tensor_bytes(t) == b"\x00\x00\x80\x3f\x00\x00\x00\xc0"
    assert tensor_bytes(torch.tensor([1.0], dtype=torch.bfloat16)) == b"\x80\x3f"


def test_the_manifest_round_trips_on_the_wire() -> None:
    manifest, _ = build_manifest("r", "m", 1, "lora", {"a.lora_A": torch.ones(2, 3)},
                                 chunk_bytes=KIB, lora_scale=2.0)
    assert decode(encode(manifest), Manifest) == manifest


def test_a_subset_of_names() -> None:
    tensors = model_tensors()
    manifest, chunks = build_manifest("r", "m", 1, "full", tensors, chunk_bytes=KIB)
    names = ["model.norm.weight", "model.layers.1.mlp.up_proj.weight"]
    back = assemble(manifest, chunks, names)
    assert list(back) == names
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        assemble(manifest, chunks, ["nope"])


# ---- integrity -----------------------------------------------------------------------


def test_a_chunk_with_a_bad_hash_is_refused() -> None:
    manifest, chunks = build_manifest("r", "m", 1, "full", model_tensors(), chunk_bytes=KIB)
    h = manifest.tensors[0].chunks[0]
    bad = bytearray(chunks[h])
    bad[7] ^= 1
    with pytest.raises(BadChunk, match="SHA-256"):
        assemble(manifest, {**chunks, h: bytes(bad)})


def test_a_truncated_chunk_is_refused_by_its_size() -> None:
    manifest, chunks = build_manifest("r", "m", 1, "full", model_tensors(), chunk_bytes=KIB)
    h = manifest.tensors[0].chunks[0]
    with pytest.raises(BadChunk, match=f"is {KIB - 5} bytes, expected {KIB}"):
        assemble(manifest, {**chunks, h: chunks[h][:-5]})


def test_chunks_hashed_already_are_checked_by_length_only() -> None:
    manifest, chunks = build_manifest("r", "m", 1, "full", model_tensors(), chunk_bytes=KIB)
    h = manifest.tensors[0].chunks[0]
    bad = bytearray(chunks[h])
    bad[7] ^= 1
    # the store hashed every chunk as it came in: assembling does not hash again
    assemble(manifest, {**chunks, h: bytes(bad)}, hashed=True)
    with pytest.raises(BadChunk, match=f"is {KIB - 5} bytes, expected {KIB}"):
        assemble(manifest, {**chunks, h: chunks[h][:-5]}, hashed=True)


def test_a_missing_chunk_is_named() -> None:
    manifest, chunks = build_manifest("r", "m", 1, "full", model_tensors(), chunk_bytes=KIB)
    h = manifest.tensors[1].chunks[-1]
    with pytest.raises(MissingChunks, match=manifest.tensors[1].name):
        assemble(manifest, {k: v for k, v in chunks.items() if k != h})


def lie(manifest: Manifest, **fields: object) -> Manifest:
    """The manifest with its first tensor's fields replaced."""
    first = dataclasses.replace(manifest.tensors[0], **fields)  # type: ignore[arg-type]
    return dataclasses.replace(manifest, tensors=(first, *manifest.tensors[1:]))


def test_a_manifest_that_lies_about_sizes_is_refused() -> None:
    manifest, chunks = build_manifest("r", "m", 1, "full", model_tensors(), chunk_bytes=KIB)
    t = manifest.tensors[0]
    lies = {
        "nbytes": lie(manifest, nbytes=t.nbytes - 4),  # shape * itemsize != nbytes
        "shape": lie(manifest, shape=(t.shape[0] + 1, *t.shape[1:])),
        "chunks": lie(manifest, chunks=t.chunks[:-1]),  # chunks do not add up
        "dtype": lie(manifest, dtype="float64"),
    }
    for what, bad in lies.items():
        with pytest.raises(BadManifest) as err:
            assemble(bad, chunks)
        assert err.value.reason == "bad_manifest"
        assert t.name in str(err.value) or what == "dtype", str(err.value)
    with pytest.raises(BadManifest, match="chunks do not add up"):
        lies["chunks"].check()
    with pytest.raises(BadManifest, match="bytes, but shape"):
        lies["nbytes"].check()


@pytest.mark.parametrize("fields, match", [
    ({"kind": "half"}, "kind"),
    ({"kind": "lora"}, "lora_scale"),
    ({"lora_scale": 2.0}, "lora_scale on a full"),
    ({"chunk_bytes": 10}, "chunk size"),
    ({"version": -1}, "version"),
    ({"run_id": "a b"}, "run id"),
    ({"model_id": ""}, "model id"),
])
def test_manifest_values_no_honest_peer_sends(fields: dict[str, object], match: str) -> None:
    manifest, _ = build_manifest("r", "m", 1, "full", model_tensors(1), chunk_bytes=KIB)
    with pytest.raises(BadManifest, match=match):
        dataclasses.replace(manifest, **fields).check()  # type: ignore[arg-type]


def test_repeated_names_and_bad_hash_lengths_are_refused() -> None:
    manifest, _ = build_manifest("r", "m", 1, "full", model_tensors(1), chunk_bytes=KIB)
    twice = dataclasses.replace(manifest, tensors=manifest.tensors + manifest.tensors[:1])
    with pytest.raises(BadManifest, match="repeated"):
        twice.check()
    with pytest.raises(BadManifest, match="not 32 bytes"):
        lie(manifest, chunks=(b"x",) * len(manifest.tensors[0].chunks)).check()


def test_unsupported_dtypes_are_refused_when_built() -> None:
    with pytest.raises(BadManifest, match="float64"):
        build_manifest("r", "m", 1, "full", {"x": torch.ones(2, dtype=torch.float64)})


# ---- LoRA and shards -----------------------------------------------------------------


def test_lora_deltas_are_scale_b_at_a() -> None:
    g = torch.Generator().manual_seed(1)
    m = "model.layers.0.self_attn.q_proj"
    a, b = torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g)
    deltas = lora_deltas({f"{m}.lora_A": a, f"{m}.lora_B": b}, 0.5)
    assert list(deltas) == [f"{m}.weight"]
    expected = [[0.5 * sum(b[i, k].item() * a[k, j].item() for k in range(4))
                 for j in range(16)] for i in range(8)]
    assert torch.allclose(deltas[f"{m}.weight"], torch.tensor(expected), atol=1e-5)
    # bfloat16 adapters: computed in float32
    bf = lora_deltas({f"{m}.lora_A": a.bfloat16(), f"{m}.lora_B": b.bfloat16()}, 2.0)
    assert bf[f"{m}.weight"].dtype == torch.float32


@pytest.mark.parametrize("adapters, match", [
    ({"m.lora_A": torch.ones(2, 3)}, "pairs"),
    ({"m.lora_A": torch.ones(2, 3), "m.lora_B": torch.ones(4, 5)}, "do not chain"),
    ({"m.weight": torch.ones(2, 3)}, "expected M.lora_A"),
])
def test_lora_deltas_refuse_a_broken_layout(adapters: dict[str, torch.Tensor],
                                            match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lora_deltas(adapters, 1.0)


def test_layer_names_pick_a_shards_tensors() -> None:
    names = list(model_tensors(layers=12))
    middle = layer_names(names, 4, 8, 12, head=False)
    assert middle and all(any(f"layers.{i}." in n for i in range(4, 8)) for n in middle)
    assert len(middle) == 4 * 3
    first = layer_names(names, 0, 4, 12, head=holds_head(0, 4, 12))
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(first)
    assert not any("layers.4." in n or "layers.10." in n for n in first)
    assert "model.layers.1.mlp.up_proj.weight" in first  # not confused with layers.10
    assert sorted(layer_names(names, 0, 12, 12, head=True)) == sorted(names)
    assert holds_head(8, 12, 12) and not holds_head(4, 8, 12)
    lora = ["model.layers.5.self_attn.q_proj.lora_A", "model.layers.5.self_attn.q_proj.lora_B",
            "model.layers.9.self_attn.q_proj.lora_A"]
    assert layer_names(lora, 4, 8, 12, head=False) == lora[:2]
    with pytest.raises(ValueError):
        layer_names(names, 8, 4, 12, head=False)


# ---- the wire messages ---------------------------------------------------------------

H = b"\x01" * 32
MESSAGES: list[Message] = [
    VersionAnnounce(run_id="r", model_id="m", version=1, kind="full", manifest_hash=H,
                    author="peer", timestamp=1.0),
    SignedAnnounce(body=b"b", sig=b"s"),
    Have(run_id="r", version=1, manifest_hash=H, holder="p", complete=True, timestamp=1.0),
    ManifestRequest(run_id="r", version=-1),
    ManifestRequest(run_id="r", version=2, manifest_hash=H),
    ManifestReply(),
    ManifestReply(announce=SignedAnnounce(body=b"b", sig=b"s"), manifest=b"m"),
    ChunkRequest(hashes=(H, H)),
    ChunkReply(data=(b"abc", b"")),
    Manifest(run_id="r", model_id="m", version=0, kind="full", chunk_bytes=KIB,
             tensors=(TensorEntry(name="x", dtype="float16", shape=(2,), nbytes=4,
                                  chunks=(H,)),)),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_messages_round_trip(msg: Message) -> None:
    assert decode(encode(msg), type(msg)) == msg


def test_requests_refuse_what_no_honest_peer_sends() -> None:
    for bad in (ChunkRequest(hashes=()), ChunkRequest(hashes=(H,) * 65),
                ChunkRequest(hashes=(b"short",)), ManifestRequest(run_id="", version=1),
                ManifestRequest(run_id="r", version=-2),
                ManifestRequest(run_id="r", version=1, manifest_hash=b"x")):
        with pytest.raises(WireError):
            bad.check()
    ok = VersionAnnounce(run_id="r", model_id="m", version=1, kind="full", manifest_hash=H,
                         author="p", timestamp=100.0)
    ok.check(100.0)
    for fields in ({"timestamp": 1000.0}, {"timestamp": math.nan}, {"manifest_hash": b"x"},
                   {"kind": "half"}, {"run_id": "x" * 65}, {"version": -1}):
        with pytest.raises(BadAnnounce):
            dataclasses.replace(ok, **fields).check(100.0)  # type: ignore[arg-type]


# ---- list bounds, before any item is read ------------------------------------------------


def _over(msg: Message, path: tuple[str, ...], item: object, n: int) -> Message:
    """Decode `msg` with the list at `path` (a field, or `tensors`' first entry's
    field) holding `n` copies of `item`."""
    from protocols.codec import packb

    wire = msg.to_wire()
    at = wire
    for key in path[:-1]:
        at = at[key][0] if key == "tensors" else at[key]
    at[path[-1]] = [item] * n
    return decode(packb(wire), type(msg))


ONE = Manifest(run_id="r", model_id="m", version=0, kind="full", chunk_bytes=KIB,
               tensors=(TensorEntry(name="x", dtype="float16", shape=(2,), nbytes=4,
                                    chunks=(H,)),))
ENTRY = ONE.tensors[0].to_wire()
LISTS = [  # (message, where its list is, a well-typed item, the most an honest peer sends)
    (ChunkRequest(hashes=(H,)), ("hashes",), H, "MAX_HASHES_PER_REQUEST"),
    (ChunkReply(data=(b"",)), ("data",), b"", "MAX_HASHES_PER_REQUEST"),
    (ONE, ("tensors",), ENTRY, "MAX_TENSORS"),
    (ONE, ("tensors", "shape"), 1, "MAX_DIMS"),
    (ONE, ("tensors", "chunks"), b"", "MAX_CHUNKS"),
]


@pytest.mark.parametrize(("msg", "path", "item", "bound"), LISTS,
                         ids=[".".join((type(m).__name__, *p)) for m, p, _, _ in LISTS])
def test_lists_past_their_bound_are_refused_before_any_item_is_read(
        msg: Message, path: tuple[str, ...], item: object, bound: str) -> None:
    import protocols.weights

    most = getattr(protocols.weights, bound)
    with pytest.raises(WireError, match="items"):
        _over(msg, path, item, most + 1)
    _over(msg, path, item, most)


def test_the_chunk_bound_is_every_hash_a_manifest_that_travels_can_name() -> None:
    """A large model's manifest lists many chunks: the bound is what fits in the largest
    manifest a holder serves (MAX_MANIFEST_BYTES), so no honest one is refused."""
    from protocols.weights import MAX_CHUNKS, MAX_MANIFEST_BYTES

    n = MAX_CHUNKS - 8  # room for the rest of the manifest
    big = Manifest(run_id="r", model_id="m", version=0, kind="full", chunk_bytes=KIB,
                   tensors=(TensorEntry(name="embed", dtype="float32", shape=(n * KIB // 4,),
                                        nbytes=n * KIB, chunks=(H,) * n),))
    raw = encode(big)
    assert len(raw) <= MAX_MANIFEST_BYTES < len(raw) + 9 * (len(H) + 2)
    got = decode(raw, Manifest)
    got.check()
    assert len(got.tensors[0].chunks) == n
