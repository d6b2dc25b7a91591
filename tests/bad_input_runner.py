"""Run s2moe_ds.cli.train.main on a list of argument lists in this one process (one process group for all),
printing one JSON line per case: the exit code and what it wrote to stderr. Used by
test_bad_inputs.py in a subprocess, so the process group never leaks into the test process."""

import contextlib
import io
import json
import sys


def main():
    from s2moe_ds.cli.train import main as train_main

    for argv in json.loads(sys.stdin.read()):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                rc = train_main(argv)
            except SystemExit as e:  # argparse
                rc = e.code
            except Exception as e:  # an unhandled error is a failure of the case, reported as such
                rc, err = -1, io.StringIO(f"UNHANDLED {type(e).__name__}: {e}")
        print(json.dumps({"rc": rc, "stderr": err.getvalue()}), flush=True)


if __name__ == "__main__":
    main()
