"""`ovis-batch checkpoint inspect|consolidate` through `ovis_batch.cli.main`."""

from __future__ import annotations

import json

import ovis_batch
from ovis_batch.cli import main


def test_inspect_reports_kind_training_state_and_parts(trainer_run, capsys):
    assert main(["checkpoint", "inspect", str(trainer_run.checkpoint(3))]) == 0
    text = capsys.readouterr().out
    assert "Trainer checkpoint" in text
    assert "global step 3 of 3" in text and "last loss" in text
    assert "model.safetensors" in text and "optimizer.pt" in text

    assert main(["checkpoint", "inspect", "--json", str(trainer_run.checkpoint(3))]) == 0
    report = json.loads(capsys.readouterr().out)
    state = json.loads((trainer_run.checkpoint(3) / "trainer_state.json").read_text())
    assert (report["kind"], report["global_step"], report["epoch"]) == (
        "Trainer checkpoint",
        3,
        state["epoch"],
    )
    assert report["last_loss"] == [e for e in state["log_history"] if "loss" in e][-1]["loss"]
    assert report["weights_source"] == "safetensors" and report["weights_complete"]
    assert "optimizer.pt" in report["resume_only_files"] and "config.json" in report["inference_files"]


def test_inspect_of_a_bad_folder_is_a_one_line_error(trainer_run, capsys):
    assert main(["checkpoint", "inspect", str(trainer_run.run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is a training run" in err and "checkpoint-3" in err


def test_consolidate_writes_a_loadable_checkpoint(trainer_run, tmp_path, capsys):
    out = tmp_path / "ft-2"
    assert (
        main(["checkpoint", "consolidate", str(trainer_run.checkpoint(2)), str(out), "--dtype", "bf16"]) == 0
    )
    assert str(out) in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert ovis_batch.load_model(out, device="cpu").model_info()["model_type"] == "ovis2_5"
    assert main(["checkpoint", "consolidate", str(trainer_run.checkpoint(2)), str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
