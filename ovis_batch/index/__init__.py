"""Retrieval indexes (FAISS) over the embedding Parquet that the batch job writes.

`workflows/build_index.py` tells the story (build, add, search); the steps live here:

- `provenance`: the model, strategy and dimension recorded in each output file's `ovis_batch` metadata;
- `reader`: finding the data files, footer checks, streaming usable rows in record batches;
- `kinds`: flat, IVF-Flat and HNSW over inner product, exact search over what they store, removal;
- `recall`: recall@k against exact search and tuning nprobe / efSearch to a target;
- `ingest`: adding an input to an index in this process or in parallel parts that merge (the cluster path);
- `build`: choosing the kind, training, the recall record and the run history;
- `folder`: the index folder, `index.json`, the id map, and atomic swaps under a lock;
- `search` and `report`: queries by vector, id, text or image, and what the commands print;
- `settings`: typed settings (`configs/index.yaml`); `errors`: what the user is told;
- `synthetic`: clustered vectors in the output layout, for tests, demos and the benchmark.

Nothing here imports torch or Ray at import time; the model runtime is loaded only to embed a text or
image query. See README.md beside this file for the commands, the folder layout and scaling out.
"""
