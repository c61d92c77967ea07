"""Scoring of what the batch job writes. Reads Parquet, writes reports; imports neither Ray nor torch.

- `ptb_tokenizer`: the COCO toolkit's PTB tokenisation, in pure Python (and the original jar, with Java).
- `caption_metrics`: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D with the COCO toolkit's definitions.
- `answers`: reasoning stripped, multiple-choice and yes/no extraction, VQA normalisation and accuracy.
- `retrieval`: exact, chunked image<->text Recall@k; defines the text embeddings Parquet format.
- `data`: reading prediction shards, references and embeddings; `EvalInputError`.
- `tasks`: one task scored end to end; `health`: run health and errors; `report` and `plots`: the report
  folder; `options`: the settings of a run.

The story of a run is `workflows/evaluate.py` (`ovis-batch evaluate`).
"""
