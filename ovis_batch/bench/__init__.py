"""Benchmark evaluation: published benchmark files in, a caption-job manifest and references out, and a
suite report over the scores.

- `source`: reading a benchmark file (VLMEvalKit's TSV layout, or a Parquet/TSV with a column mapping);
- `images`: a row's image cell to bytes, several images composed into one;
- `prompts`: the prompt per task type, the way Ovis2.5 is evaluated upstream;
- `prepare`: the prepared folder (`manifest.parquet`, `references.parquet`, `prepared.json`);
- `settings`: `configs/bench.yaml`, the suite `bench run` goes through;
- `suite`: the per-benchmark report and the suite report (`report.md`, `metrics.json`).

The scoring rules live in `ovis_batch.eval.benchmarks` (no Ray, no torch); running the caption job is
the workflow's (`workflows/bench.py`).
"""
