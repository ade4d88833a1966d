"""SEDM memory benchmarks (docs/sedm.md). One subcommand per section; each prints a table
and writes bench/results/memory_<section>.json. Not a test: no thresholds.

- retrieval: the store (peerd/memory/store.py) filled to each size in --sizes: insert
  rate (bulk, one transaction per batch; and single durable puts), search latency p50/p99
  (one query at a time, k=10, through the store: index plus the SQLite read of the hits;
  and the index alone), recall@10 against exact brute force, with and without a domain
  filter, the index's size on disk, the time to save it, and the time to reopen the
  store with no usable index file (the rebuild after a crash).

  Items: real texts (GSM8K questions, the draft prompts shipped in peerd/data, first
  paragraphs of standard-library docstrings) embedded with all-MiniLM-L6-v2, then
  synthetic items to reach each size: a synthetic vector is a random real one plus 0.35
  of a second real one plus noise of norm 0.5 in a random direction, re-normalised (the
  printed output measures its mean cosine to its parent), with a synthetic text naming
  its parent and the domain of its parent. Queries: real texts held out of the store.
  MiniLM runs at a few dozen texts a second on 2 busy cores, so only --real texts are
  embedded (cached in the temp dir between runs).
- accuracy: held-out questions answered by SmolLM2-135M with no memory, an
  add-everything memory and SEDM (bench_memory_accuracy.py).
- growth: a long stream of candidate writes into a capped store: its size, admissions
  and refusals, decision times, and accuracy along the way (bench_memory_growth.py).
- transfer: items proven on one task (add), abstracted by the model into insights and
  re-validated by replay on another (gsm8k): held-out accuracy there with no memory, the
  insights, and the source items given raw (bench_memory_transfer.py).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_memory_accuracy import add_accuracy, run_accuracy  # noqa: E402
from bench_memory_growth import add_growth, run_growth  # noqa: E402
from bench_memory_transfer import add_transfer, run_transfer  # noqa: E402
from libp2p.crypto.ed25519 import create_new_key_pair  # noqa: E402
from libp2p.peer.id import ID  # noqa: E402

from peerd.embedding import Embedder, make_embedder  # noqa: E402
from peerd.machine import describe as machine  # noqa: E402
from peerd.memory import index as index_module  # noqa: E402
from peerd.memory.index import IndexMeta  # noqa: E402
from peerd.memory.item import ItemStats, Record, sign_item  # noqa: E402
from peerd.memory.store import ItemStore  # noqa: E402

console = Console(width=160)
RESULTS = ROOT / "bench" / "results"


def write_result(section: str, result: dict[str, Any], path: Path | None = None) -> None:
    """The result as JSON: at `path`, or bench/results/memory_<section>.json (the
    accuracy of a task other than add: memory_accuracy_<task>.json)."""
    if path is None:
        task = result.get("task", "add") if section == "accuracy" else "add"
        path = RESULTS / f"memory_{section}{'' if task == 'add' else '_' + task}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {path}")


# --- retrieval ---------------------------------------------------------------------

def real_texts(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """(domain, text): GSM8K questions, draft prompts, stdlib docstrings, shuffled and
    cut to n with the three sources in proportion 5 : 1 : 4 (all drafts, at most)."""
    gsm8k = [json.loads(line)["question"] for name in ("train", "test")
             for line in (ROOT / "bench/data/gsm8k" / f"{name}.jsonl").open()]
    drafts = [json.loads(line)["prompt"] for line in (ROOT / "peerd/data/draft_prompts.jsonl")
              .open()]
    docs: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                doc = ast.get_docstring(node)
                first = doc.split("\n\n")[0].strip() if doc else ""
                if 20 <= len(first) <= 600:
                    docs.append(" ".join(first.split()))
    docs = list(dict.fromkeys(docs))
    for pool in (gsm8k, drafts, docs):
        rng.shuffle(pool)
    n_drafts = min(len(drafts), n // 10)
    n_gsm8k = (n - n_drafts) * 5 // 9
    out = ([("gsm8k", t) for t in gsm8k[:n_gsm8k]] + [("chat", t) for t in drafts[:n_drafts]]
           + [("code", t) for t in docs[:n - n_gsm8k - n_drafts]])
    rng.shuffle(out)  # the held-out queries, cut from the end, mix the three
    return out


def embed_cached(embedder: Embedder, texts: list[str]) -> np.ndarray:
    key = hashlib.sha256(json.dumps([embedder.name, texts]).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"peerd_bench_memory_{key}.npy"
    if path.is_file():
        console.print(f"real embeddings from the cache {path}")
        cached: np.ndarray = np.load(path)
        return cached
    t0 = time.perf_counter()
    vectors = embedder.embed(texts)
    console.print(f"embedded {len(texts)} real texts with {embedder.name} in "
                  f"{time.perf_counter() - t0:.0f} s")
    np.save(path, vectors)
    return vectors


def synthetic(real: np.ndarray, n: int, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """n vectors near real ones, and the row of each one's parent."""
    parents = rng.integers(0, len(real), n)
    other = real[rng.integers(0, len(real), n)]
    noise = rng.standard_normal(real[parents].shape).astype(np.float32)
    noise *= 0.5 / np.linalg.norm(noise, axis=1, keepdims=True)
    v = real[parents] + 0.35 * other + noise
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32), parents


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.array(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def measure(store: ItemStore, matrix: np.ndarray, domains: np.ndarray, queries: np.ndarray,
            query_domains: list[str], k: int) -> dict[str, Any]:
    """Latency and recall@k at the store's current size (matrix: its vectors in order)."""
    exact_all = np.argsort(-(queries @ matrix.T), axis=1)[:, :k]  # [Q, k]
    ids = np.array([r.item.id for r in store.records()])  # label order = insertion order
    out: dict[str, Any] = {}
    for name in sorted(set(query_domains)):  # warm: a small domain's first search loads it
        store.search(queries[0], k, domain=name)
    for mode in ("all", "domain"):
        store_s: list[float] = []
        index_s: list[float] = []
        hits = 0
        for qi, q in enumerate(queries):
            domain: str | None = query_domains[qi] if mode == "domain" else None
            if domain is None:
                exact = set(ids[exact_all[qi]])
            else:
                sims = np.where(domains == domain, matrix @ q, -np.inf)
                exact = set(ids[np.argsort(-sims)[:k]])
            t0 = time.perf_counter()
            found = store.search(q, k, domain=domain)
            store_s.append(time.perf_counter() - t0)
            hits += len(exact & {r.item.id for r, _ in found})
            if domain is None:
                t0 = time.perf_counter()
                store.index.search(q, k)
                index_s.append(time.perf_counter() - t0)
        p50, p99 = percentiles(store_s)
        out[mode] = {"recall_at_10": hits / (k * len(queries)), "p50_ms": p50, "p99_ms": p99}
        if index_s:
            out[mode]["index_p50_ms"], out[mode]["index_p99_ms"] = percentiles(index_s)
    return out


def run_retrieval(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    nrng = np.random.default_rng(args.seed)
    embedder = make_embedder("minilm")
    pool = real_texts(rng, args.real + args.queries)
    vectors = embed_cached(embedder, [t for _, t in pool])
    query_rows = list(range(len(pool)))[-args.queries:]
    queries, query_domains = vectors[query_rows], [pool[i][0] for i in query_rows]
    real, real_pool = vectors[:args.real], pool[:args.real]
    top = max(args.sizes)
    extra, parents = synthetic(real, max(0, top - len(real)), nrng)
    parent_cos = float(np.mean(np.sum(extra * real[parents], axis=1))) if len(extra) else 1.0
    matrix = np.vstack([real, extra])[:top]  # [N, 384], the insertion order
    domains = np.array([d for d, _ in real_pool] + [real_pool[p][0] for p in parents])[:top]
    texts = [t for _, t in real_pool] + [f"synthetic note {i} near: {real_pool[p][1][:80]}"
                                         for i, p in enumerate(parents)]
    console.print(f"{len(real)} real texts, {len(extra)} synthetic vectors (mean cosine "
                  f"{parent_cos:.3f} to their parent), {len(queries)} held-out queries")

    key = create_new_key_pair()
    author = str(ID.from_pubkey(key.public_key))
    stats = ItemStats(weight=0.1, admitted_utility=0.1)

    def record(i: int) -> Record:
        item, signed = sign_item(key.private_key, author, texts[i][:4000], str(domains[i]),
                                 "example", created=1.0)
        return Record(item, signed, stats)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = ItemStore(Path(tmp), embedder)
        # Single durable puts (one fsync'd transaction each), on the first items.
        t0 = time.perf_counter()
        n_single = min(args.single, top)
        for i in range(n_single):
            store.put(record(i), matrix[i])
        single_rate = n_single / (time.perf_counter() - t0)
        done, bulk_s = n_single, 0.0
        for size in sorted(args.sizes):
            while done < size:
                batch = [(record(i), matrix[i]) for i in range(done, min(size, done + 1_000))]
                t0 = time.perf_counter()
                store.put_many(batch)
                bulk_s += time.perf_counter() - t0
                done += len(batch)
            store.flush()
            t0 = time.perf_counter()  # what one save of the index costs at this size
            store.index.save(Path(tmp) / "scratch.bin", IndexMeta(
                dim=embedder.dim, embedder=embedder.name, count=size, generation=0))
            save_s = time.perf_counter() - t0
            m = measure(store, matrix[:size], domains[:size], queries, query_domains, args.k)
            # Recovery after a crash: open with no usable index file, rebuilt from SQLite.
            store.index_path.unlink()
            t0 = time.perf_counter()
            ItemStore(Path(tmp), embedder).close()
            rebuild_s = time.perf_counter() - t0
            row = {"items": size, "bulk_items_per_s": (size - n_single) / bulk_s,
                   "single_put_per_s": single_rate, "index_save_s": save_s,
                   "reopen_rebuild_s": rebuild_s,
                   "index_bytes": store.index_path.stat().st_size,
                   "db_bytes": store.db_path.stat().st_size, **m}
            rows.append(row)
            console.print(f"{size} items: recall@10 {m['all']['recall_at_10']:.3f}, "
                          f"p99 {m['all']['p99_ms']:.2f} ms")
        store.close()

    table = Table(title=f"memory retrieval: k={args.k}, {len(queries)} queries, "
                        f"M={index_module.M}, ef_construction={index_module.EF_CONSTRUCTION}, "
                        f"ef={index_module.EF_SEARCH}")
    for col in ("items", "insert /s (bulk | single)", "recall@10", "p50 ms", "p99 ms",
                "index p50 | p99 ms", "domain recall@10", "domain p50 | p99 ms",
                "index MB", "db MB", "save | rebuild s"):
        table.add_column(col, justify="right")
    for r in rows:
        a, d = r["all"], r["domain"]
        table.add_row(f"{r['items']:,}", f"{r['bulk_items_per_s']:,.0f} | "
                      f"{r['single_put_per_s']:,.0f}", f"{a['recall_at_10']:.3f}",
                      f"{a['p50_ms']:.2f}", f"{a['p99_ms']:.2f}",
                      f"{a['index_p50_ms']:.2f} | {a['index_p99_ms']:.2f}",
                      f"{d['recall_at_10']:.3f}", f"{d['p50_ms']:.2f} | {d['p99_ms']:.2f}",
                      f"{r['index_bytes'] / 1e6:.0f}", f"{r['db_bytes'] / 1e6:.0f}",
                      f"{r['index_save_s']:.2f} | {r['reopen_rebuild_s']:.1f}")
    console.print(table)
    return {"section": "retrieval", "embedder": embedder.name, "dim": embedder.dim,
            "k": args.k, "queries": len(queries), "real_texts": len(real),
            "synthetic_parent_cosine": parent_cos, "seed": args.seed,
            "hnsw": {"M": index_module.M, "ef_construction": index_module.EF_CONSTRUCTION,
                     "ef": index_module.EF_SEARCH},
            "how": ("real texts (GSM8K questions, draft prompts, stdlib docstrings) embedded "
                    "with MiniLM; the rest synthetic vectors near them; queries are held-out "
                    "real texts; latencies one query at a time through ItemStore.search "
                    "(index + SQLite read), and through the index alone; the domain rows "
                    "filter to the query's own domain"),
            "machine": machine(), "rows": rows}


def add_retrieval(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("retrieval", help="insert rate, search latency and recall, index size")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--real", type=int, default=3_000, help="real texts embedded with MiniLM")
    p.add_argument("--queries", type=int, default=300, help="held-out real texts as queries")
    p.add_argument("--single", type=int, default=500, help="items put one durable put each")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=26)


# Each section: (add its subcommand, run it). accuracy, growth and transfer live in
# bench_memory_accuracy.py, bench_memory_growth.py and bench_memory_transfer.py (their
# in-process peer, learning phase and held-out evaluation in bench_memory_peer.py).
SECTIONS: dict[str, tuple[Callable[[Any], None], Callable[[argparse.Namespace],
                                                           dict[str, Any]]]] = {
    "retrieval": (add_retrieval, run_retrieval),
    "accuracy": (add_accuracy, run_accuracy),
    "growth": (add_growth, run_growth),
    "transfer": (add_transfer, run_transfer),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--out", type=Path, help="where the JSON goes (default: "
                        "bench/results/memory_<section>.json)")
    sub = parser.add_subparsers(dest="section", required=True)
    for add, _ in SECTIONS.values():
        add(sub)
    args = parser.parse_args()
    result = SECTIONS[args.section][1](args)
    result.setdefault("machine", machine())
    write_result(args.section, result, args.out)


if __name__ == "__main__":
    main()
