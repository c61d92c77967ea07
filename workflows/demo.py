"""The demo: the caption job on the bundled sample manifest with a tiny random-weight model, on a local
Ray and the CPU. Nothing is downloaded.

    ovis-batch demo [--workdir ovis-batch-demo] [--verbose] [--progress-interval 30]

1. write the tiny Ovis2.5 checkpoint (official layout, RANDOM WEIGHTS) unless it is already there;
2. run the caption job on `ovis_batch/assets/sample/manifest.parquet` (four photos, one missing file)
   with embeddings on; rerunning resumes and finds nothing left to do;
3. print where the output is and its first rows.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from ovis_batch.model.tiny import make_tiny_model
from ovis_batch.progress import DEFAULT_INTERVAL_S
from ovis_batch.storage import local_path
from workflows.caption import run_caption


def run_demo(
    workdir: str = "ovis-batch-demo",
    *,
    verbose: bool = False,
    progress_interval_s: float = DEFAULT_INTERVAL_S,
    wait_for_lease: bool = False,
) -> dict[str, Any]:
    """Run the demo in `workdir`; returns the caption job's summary."""
    root = Path(local_path(workdir, "demo folder", "the demo writes a model checkpoint, a local folder"))
    model = root / "tiny-ovis2.5-random"
    if not (model / "config.json").is_file():
        make_tiny_model(model)
    manifest = resources.files("ovis_batch.assets").joinpath("sample").joinpath("manifest.parquet")
    summary = run_caption(
        str(manifest),
        str(root / "captions"),
        str(model),
        overrides=[
            "max_new_tokens=24",
            "embedding=last_token",
            "passthrough_columns=[credit]",
            "decode_workers=1",
        ],
        verbose=verbose,
        progress_interval_s=progress_interval_s,
        wait_for_lease=wait_for_lease,
    )
    _show(root / "captions")
    return summary


def _show(output: Path) -> None:
    import pyarrow.dataset as pads

    table = pads.dataset(str(output), format="parquet", exclude_invalid_files=True).to_table(
        columns=["image_id", "status", "error_type", "visual_tokens", "caption"]
    )
    print(f"\nfirst rows of {output} (random weights: the captions are noise):")
    for row in sorted(table.to_pylist(), key=lambda r: r["image_id"]):
        text = row["caption"] if row["status"] == "ok" else f"[{row['error_type']}]"
        print(f"  {row['image_id']:<14} {row['status']:<6} tokens={row['visual_tokens']!s:<5} {text!r:.70}")
