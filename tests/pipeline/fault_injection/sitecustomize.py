"""Fault injection for tests/pipeline/test_faults.py. A test puts this folder on PYTHONPATH, so every Python
process of its job (the command line's driver and every Ray worker it starts) imports this at start-up and
injects the fault `OVIS_BATCH_TEST_FAULT` names:

- `enospc:N` / `eacces:N`: the shard writer fails with "no space left" / "permission denied" once the
  output folder holds N shards (so the first N are committed, as when a disk fills up mid-run);
- `model_unreadable`: a model replica cannot read the model folder (as on a node that does not share it);
- `hang`: the model stage never returns (a stuck replica), for the stall watchdog.
Nothing is injected without the variable, and the project itself has no such hook.
"""

import os

FAULT = os.environ.get("OVIS_BATCH_TEST_FAULT", "")

if FAULT:
    import errno
    import glob
    import time

    kind, _, argument = FAULT.partition(":")
    if kind in ("enospc", "eacces"):
        import ovis_batch.pipeline.output as output

        real_write_shard = output.write_shard

        def write_shard(folder, table, id_column, metadata):
            local = folder.uri  # the tests' output folders are local: an absolute path
            if len(glob.glob(os.path.join(local, "part-*.parquet"))) >= int(argument):
                code = errno.ENOSPC if kind == "enospc" else errno.EACCES
                error = PermissionError if kind == "eacces" else OSError
                raise error(code, os.strerror(code), os.path.join(local, "_tmp", "part-x.parquet"))
            return real_write_shard(folder, table, id_column, metadata)

        output.write_shard = write_shard
    elif kind == "model_unreadable":
        import ovis_batch.pipeline.stages as stages
        from ovis_batch.model.checkpoint import CheckpointError

        def unreadable(self, *, model_source, **kwargs):
            raise CheckpointError(
                f"{model_source}/model.safetensors could not be read (PermissionError: [Errno 13] Permission "
                "denied); re-download it"
            )

        stages.CaptionPredictor.__init__ = unreadable
    elif kind == "hang":
        import ovis_batch.pipeline.stages as stages

        def stuck(self, batch):
            time.sleep(3600)

        stages.CaptionPredictor.__call__ = stuck
