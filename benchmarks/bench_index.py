"""Index benchmark: build time, queries/s and recall@10 of exact (flat) vs the auto ANN index.

    python benchmarks/bench_index.py                      # 1M x 256, about 1 GB of vectors
    python benchmarks/bench_index.py --n 200000 --dim 128  # a quicker look

Writes clustered synthetic unit vectors (`ovis_batch.index.synthetic`; 1 cluster per 1000 vectors,
noise of the same order as the centre spread) as 8 Parquet shards in the batch job's layout, builds a
flat index and an auto index (IVF at this size) with the default settings, then measures:
- build: wall time of `build_index`, from the Parquet files to the committed folder;
- queries/s: 1000 fresh queries (not in the index) searched at once (batch) and one at a time;
- recall@10 of those queries against the flat index's exact results, and the recall the build
  measured on its held-out queries (recorded in index.json).
Prints a Markdown table for benchmarks/README.md. Memory: the vectors once (1 GB at 1M x 256) per
index held, one at a time.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from ovis_batch.index.recall import recall_at_k
from ovis_batch.index.search import RetrievalIndex
from ovis_batch.index.settings import IndexSettings
from ovis_batch.index.synthetic import clustered_unit_vectors, write_embedding_output
from workflows.build_index import build_index

SHARDS = 8


def write_data(folder: Path, n: int, dim: int, clusters: int, spread: float) -> None:
    for shard, rows in enumerate(np.array_split(np.arange(n), SHARDS)):
        vectors = clustered_unit_vectors(
            len(rows), dim, clusters=clusters, spread=spread, seed=shard, centres_seed=0
        )
        part = folder / f"shard{shard}"
        write_embedding_output(part, vectors, shards=1, first_id=int(rows[0]))
        (part / "part-00000.parquet").rename(folder / f"part-{shard:05d}.parquet")
        part.rmdir()


def measure(index_dir: Path, queries: np.ndarray, single: int) -> dict:
    started = time.perf_counter()
    index = RetrievalIndex(index_dir)
    load = time.perf_counter() - started
    started = time.perf_counter()
    _, found = index.index.search(queries, 10)
    batch_qps = len(queries) / (time.perf_counter() - started)
    started = time.perf_counter()
    for query in queries[:single]:
        index.index.search(query[None], 10)
    single_qps = single / (time.perf_counter() - started)
    size = sum(p.stat().st_size for p in index_dir.iterdir())
    return {
        "manifest": index.manifest,
        "found": found,
        "load": load,
        "batch_qps": batch_qps,
        "single_qps": single_qps,
        "size": size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=100, help="queries timed one at a time")
    parser.add_argument("--spread", type=float, default=0.8)
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder, deleted at the end")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_index_"))
    clusters = max(1, args.n // 1000)
    try:
        started = time.perf_counter()
        write_data(workdir / "emb", args.n, args.dim, clusters, args.spread)
        print(f"wrote {args.n} x {args.dim} vectors in {time.perf_counter() - started:.1f} s")
        queries = clustered_unit_vectors(
            args.queries, args.dim, clusters=clusters, spread=args.spread, seed=10_000, centres_seed=0
        )
        rows = []
        truth = None
        for kind in ("flat", "auto"):
            started = time.perf_counter()
            build_index(workdir / "emb", workdir / kind, IndexSettings(kind=kind))
            build = time.perf_counter() - started
            result = measure(workdir / kind, queries, args.single)
            truth = result["found"] if truth is None else truth
            rows.append((kind, build, result, recall_at_k(result["found"], truth, 10)))
            print(f"{kind}: built in {build:.1f} s")
            shutil.rmtree(workdir / kind)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"\n{args.n:,} x {args.dim} float32, {clusters} clusters (spread {args.spread}), {args.queries} fresh "
        f"queries, k=10; {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"faiss {faiss.__version__}\n"
    )
    print(
        "| index | kind (params) | build s | size MiB | queries/s (batch of 1000) | queries/s (one by one) | recall@10 vs exact | recall@10 at build |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind, build, result, recall in rows:
        m = result["manifest"]
        params = ", ".join(
            f"{k} {v}" for k, v in {**m.build, **m.search}.items() if k in ("nlist", "nprobe", "ef_search")
        )
        print(
            f"| {kind} | {m.kind}{f' ({params})' if params else ''} | {build:.1f} | {result['size'] / 2**20:.0f} | "
            f"{result['batch_qps']:.0f} | {result['single_qps']:.0f} | {recall:.3f} | {m.recall.value:.3f} |"
        )


if __name__ == "__main__":
    main()
