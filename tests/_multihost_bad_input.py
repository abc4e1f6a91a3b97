"""Bad input across processes (see test_multihost.py): prints one JSON line with the error each process saw.

``python -m tests._multihost_bad_input mesh|config`` under ``ids.distributed.run_local_processes``, or
``coordinator`` alone (a process 1 of 2 whose coordinator never comes up).
"""

import json
import os
import sys

import idesign as ids


def main(case: str) -> None:
    error = None
    try:
        if case == "coordinator":
            ids.distributed.initialize(f"127.0.0.1:{ids.distributed.free_port()}", 2, 1, timeout_s=3)
        elif case == "config":
            # Process 1 was started with another learning rate: caught at start, not as a hang or silent divergence.
            ids.distributed.initialize_from_env(config={"lr": 1e-3 * (1 + int(os.environ["IDESIGN_PROCESS_ID"]))})
        elif case == "mesh":
            ids.distributed.initialize_from_env(config={"lr": 1e-3})
            ids.sharding.make_mesh(data=2, model=2)      # 4 of the 8 global devices
    except Exception as e:  # report every error, the test checks its type and message
        error = {"type": type(e).__name__, "message": str(e)}
    print(json.dumps({"error": error}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
    # The test reads the line printed above. Skip jax's atexit teardown of a run whose processes have just failed
    # (a shutdown barrier that waits up to 300 s for its peers): it is not what is under test, and a run of this
    # script once hung past the test's deadline in CI. run_local_processes's TimeoutError shows where, if it recurs.
    os._exit(0)
