"""Fine-tuning Ovis2.5 on (image, caption) pairs: generation and contrastive losses, freeze strategies.

    from workflows.finetune import finetune
    finetune("pairs.parquet", "AIDC-AI/Ovis2.5-2B", "runs/ft", freeze="top:4", loss="both")

`settings.py` (the typed settings and freeze specs), `freeze.py` (which parameters train), `data.py`
(pairs -> checked pairs -> examples -> batches), `model.py` (the trained module and its losses),
`trainer.py` (the Hugging Face Trainer writing checkpoints in the official layout), `session.py` (one
training process), `ray_train.py` (several, on Ray Train), `job.py` (the run folder, the checks before
training, the summary). The command is `ovis-batch finetune` (`workflows/finetune.py`). Nothing here
runs at import time, and importing this package imports neither torch nor Ray.
"""
