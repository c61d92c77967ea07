"""Scoring of what the batch job writes. Reads Parquet, writes reports; imports neither Ray nor torch."""
