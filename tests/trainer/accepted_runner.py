"""Run ``audioclr pretrain`` in this process for each override read from stdin (one per
line), a tiny 2-step run on the synthetic back end from a scratch folder, and print one
JSON line per case (the override, its exit status, the end of what it wrote to stderr).
A case that hangs ends the whole process after HANG_S seconds with every thread's stack
(faulthandler): the test that runs this reads that as a hang. Used by test_fuzz.py."""

import contextlib
import faulthandler
import io
import json
import os
import sys
import tempfile

HANG_S = 180
TINY = ["data.backend=synthetic", "data.synthetic_clips=16", "data.batch_size=4", "model.width=4",
        "model.proj_hidden=16", "model.proj_dim=8", "train.max_steps=2", "train.progress=false",
        "train.tensorboard=false", "data.num_workers=0", "frontend.n_mels=32", "data.view_seconds=0.5"]


def run(override: str) -> dict:
    from trainer.cli import main
    with tempfile.TemporaryDirectory() as scratch:
        deep = os.path.join(scratch, "a", "b", "c", "d")  # relative paths among the values stay in here
        os.makedirs(deep)
        os.chdir(deep)
        err = io.StringIO()
        faulthandler.dump_traceback_later(HANG_S, exit=True)
        with contextlib.redirect_stderr(err):
            try:
                code = main(["pretrain", *TINY, "run_dir=run", override])
            except SystemExit as exit_:
                code = exit_.code
            except BaseException as raised:  # noqa: BLE001 -- what the runner reports
                code = f"raised {type(raised).__name__}: {raised}"
        faulthandler.cancel_dump_traceback_later()
    lines = err.getvalue().splitlines()[-12:]  # each line cut: a 5,000-character value is not the point
    return {"override": override, "code": code, "err": "\n".join(line[:300] for line in lines)}


if __name__ == "__main__":
    for line in sys.stdin:
        print(json.dumps(run(line.rstrip("\n"))), flush=True)
