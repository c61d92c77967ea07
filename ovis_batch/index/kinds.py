"""The FAISS index kinds and what differs between them: creation, search knob, exact search, removal.

All kinds use inner product over unit vectors (= cosine) and are addressed by int64 FAISS ids:

- `flat`: exact search (`IndexFlatIP` inside `IndexIDMap2`). Memory 4*dim bytes per vector; a query
  scans everything. Exact by construction, so its recall is 1.
- `ivf`: `IndexIVFFlat` with `nlist` k-means lists trained on a sample; a query scans the `nprobe`
  nearest lists. Ids are stored natively, with a hash-table direct map so vectors can be looked up by
  id and removed. Lists from separately built parts merge (`merge_from`) without retraining.
- `hnsw`: `IndexHNSWFlat` graph inside `IndexIDMap2`; queries visit `efSearch` candidates. FAISS
  cannot delete graph nodes, so replacing ids rebuilds the graph from the stored vectors.

Each kind stores the full float32 vectors, so `--id` search uses the exact stored vector and recall
can be measured against exact search over the same index (`exact_search`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import faiss
import numpy as np

KINDS = ("flat", "ivf", "hnsw")
# The knob that trades speed for recall, per kind (stored in index.json under "search").
SEARCH_PARAMETER = {"flat": None, "ivf": "nprobe", "hnsw": "ef_search"}
# FAISS asks for at least this many training points per list (it warns below).
MIN_TRAIN_POINTS_PER_LIST = 39
_REBUILD_CHUNK = 65_536
_SCAN_CHUNK = 262_144


def choose_nlist(count: int, lists_per_sqrt_n: float) -> int:
    """The list count for `count` vectors: `lists_per_sqrt_n * sqrt(count)`, at most count / 39.

    ~4*sqrt(n) keeps both the coarse assignment (nlist centroids) and the scan of each probed list
    (n / nlist vectors) small; the cap keeps every list trainable from the data at hand.
    """
    wanted = round(lists_per_sqrt_n * math.sqrt(count))
    return max(1, min(wanted, count // MIN_TRAIN_POINTS_PER_LIST))


def new_flat_index(dim: int) -> faiss.Index:
    """An empty exact inner-product index keyed by FAISS ids."""
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def new_ivf_index(train_vectors: np.ndarray, nlist: int, kmeans_iterations: int, seed: int) -> faiss.Index:
    """An empty IVF-Flat index whose lists are trained (k-means) on `train_vectors`."""
    dim = train_vectors.shape[1]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = kmeans_iterations
    index.cp.seed = seed
    index.train(np.ascontiguousarray(train_vectors, dtype=np.float32))
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index


def new_hnsw_index(dim: int, m: int, ef_construction: int) -> faiss.Index:
    """An empty inner-product HNSW graph of degree `m`, keyed by FAISS ids."""
    graph = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = ef_construction
    return faiss.IndexIDMap2(graph)


def empty_like(index: faiss.Index, kind: str) -> faiss.Index:
    """An empty index of the same kind and training (for a part built elsewhere and merged back)."""
    if kind == "ivf":
        ivf = faiss.extract_index_ivf(index)
        part = faiss.IndexIVFFlat(
            faiss.clone_index(ivf.quantizer), ivf.d, ivf.nlist, faiss.METRIC_INNER_PRODUCT
        )
        part.is_trained = True
        return part
    if kind == "flat":
        return new_flat_index(index.d)
    raise ValueError(f"{kind} indexes are not built in parts (FAISS cannot merge HNSW graphs)")


def merge_parts(index: faiss.Index, kind: str, parts: Iterable[faiss.Index]) -> None:
    """Move the vectors of `parts` (built with `empty_like`) into `index`; ids are kept as they are."""
    if kind == "ivf":
        # FAISS merges inverted lists only without a direct map; rebuild the map once at the end.
        index.set_direct_map_type(faiss.DirectMap.NoMap)
        for part in parts:
            index.merge_from(part, 0)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
    elif kind == "flat":
        for part in parts:
            index.merge_from(part, 0)
    else:
        raise ValueError(f"{kind} indexes cannot be merged")


def set_search_parameter(index: faiss.Index, kind: str, value: int | None) -> None:
    """Apply the stored `nprobe` (ivf) or `efSearch` (hnsw); flat has none."""
    if value is None:
        return
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(value)
    elif kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = int(value)


def search_parameter_candidates(index: faiss.Index, kind: str, k: int, limit: int | None) -> list[int]:
    """Increasing values of the kind's knob to try when tuning for recall; the last one is the most exact."""
    if kind == "ivf":
        nlist = faiss.extract_index_ivf(index).nlist
        top = min(nlist, limit or nlist)
        values = [v for v in (2**i for i in range(32)) if v < top]
        return [*values, top]
    if kind == "hnsw":
        top = max(limit or 1024, k)
        values = [v for v in (2**i for i in range(4, 32)) if k <= v < top]
        return [*values, top]
    return []


def exact_search(index: faiss.Index, kind: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (scores, FAISS ids) over everything the index stores, for the recall measurement.

    Every kind keeps the float32 vectors, so this is a brute-force (BLAS) scan of the stored vectors:
    the flat storage for flat and hnsw, the inverted lists' contents for ivf.
    """
    if kind == "flat":
        return index.search(queries, k)
    if kind == "hnsw":
        storage = faiss.downcast_index(faiss.downcast_index(index.index).storage)
        scores, rows = storage.search(queries, k)
        id_map = faiss.vector_to_array(index.id_map)
        return scores, np.where(rows >= 0, id_map[np.maximum(rows, 0)], -1)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for ids, vectors in _ivf_contents(faiss.extract_index_ivf(index)):
        scores, rows = faiss.knn(queries, vectors, min(k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(np.ascontiguousarray(scores), np.ascontiguousarray(ids[rows]))
    heap.finalize()
    return heap.D, heap.I


def _ivf_contents(ivf: faiss.IndexIVF) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, vectors) of an IVF-Flat index's lists, in chunks of about _SCAN_CHUNK vectors."""
    invlists, dim = ivf.invlists, ivf.d
    ids: list[np.ndarray] = []
    vectors: list[np.ndarray] = []
    held = 0
    for list_no in range(ivf.nlist):
        size = invlists.list_size(list_no)
        if size == 0:
            continue
        codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), size * ivf.code_size)
        vectors.append(np.frombuffer(codes, dtype=np.float32).reshape(size, dim).copy())
        ids.append(faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy())
        held += size
        if held >= _SCAN_CHUNK:
            yield np.concatenate(ids), np.concatenate(vectors)
            ids, vectors, held = [], [], 0
    if held:
        yield np.concatenate(ids), np.concatenate(vectors)


def remove_ids(index: faiss.Index, kind: str, faiss_ids: np.ndarray) -> faiss.Index:
    """Remove `faiss_ids`; returns the index to use afterwards (a rebuilt one for hnsw)."""
    if len(faiss_ids) == 0:
        return index
    if kind in ("flat", "ivf"):
        removed = index.remove_ids(np.ascontiguousarray(faiss_ids, dtype=np.int64))
        assert removed == len(np.unique(faiss_ids)), f"removed {removed} of {len(faiss_ids)} ids"
        return index
    return _rebuild_hnsw_without(index, faiss_ids)


def _rebuild_hnsw_without(index: faiss.Index, faiss_ids: np.ndarray) -> faiss.Index:
    graph = faiss.downcast_index(index.index)
    rebuilt = new_hnsw_index(index.d, graph.hnsw.nb_neighbors(1), graph.hnsw.efConstruction)
    faiss.downcast_index(rebuilt.index).hnsw.efSearch = graph.hnsw.efSearch
    id_map = faiss.vector_to_array(index.id_map)
    for start in range(0, index.ntotal, _REBUILD_CHUNK):
        ids = id_map[start : start + _REBUILD_CHUNK]
        keep = ~np.isin(ids, faiss_ids)
        vectors = graph.reconstruct_n(start, len(ids))
        rebuilt.add_with_ids(vectors[keep], ids[keep])
    return rebuilt


def stored_vector(index: faiss.Index, faiss_id: int) -> np.ndarray:
    """The float32 vector stored under `faiss_id` (every kind keeps exact vectors)."""
    return index.reconstruct(int(faiss_id))
