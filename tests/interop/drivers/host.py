"""Runs inside a consumer venv, not with quantkit: the drivers beside it, one after another in this one interpreter,
so a session imports the consumer (torch, transformers, gptqmodel / compressed-tensors: about 10 s) once per venv
instead of once per driver run.

    python host.py    # then one JSON line per run on stdin: [CWD, LOG, DRIVER.py, ARG, ...]

Each run executes DRIVER.py as __main__ with sys.argv [DRIVER.py, ARG, ...] in CWD, with file descriptors 1 and 2
(the libraries' native output too) going to LOG, and is answered by its exit status, one line on the host's own
stdout. The host ends when stdin closes.
"""

import json
import os
import runpy
import sys
import traceback


def main() -> None:
    answer = os.fdopen(os.dup(1), "w")
    for line in sys.stdin:
        cwd, log, driver, *args = json.loads(line)
        with open(log, "w") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
        os.chdir(cwd)
        sys.argv = [driver, *args]
        try:
            runpy.run_path(driver, run_name="__main__")
            status = 0
        except SystemExit as exit:  # what `python DRIVER.py` would exit with
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
            status = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        except Exception:  # noqa: BLE001 - a failing run is reported like an uncaught exception in its own process
            traceback.print_exc()
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        answer.write(f"{status}\n")
        answer.flush()


if __name__ == "__main__":
    main()
