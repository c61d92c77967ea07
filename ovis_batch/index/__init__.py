"""Retrieval indexes (FAISS) over the embedding Parquet that the batch job writes."""
