"""The batch job on Ray Data: manifests, resume, CPU and GPU stages, atomic Parquet shards."""
