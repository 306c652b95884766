"""The multi-worker processes' entry point: `python -m prefect_tensorflow.tasks.training.multi_worker_main
supervise RUN_DIR` (the supervisor, `supervisor.supervise`) or `... worker RUN_DIR INDEX` (a worker, `worker.run_worker`).

Example:
    >>> from prefect_tensorflow.tasks.training.multi_worker_main import main
    >>> main(["help"])
    2
"""

from __future__ import annotations

import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    """Run the supervisor or a worker, as `argv` says; 2 (and the usage on stderr) for anything else."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[0] == "supervise":
        from .supervisor import supervise

        return supervise(args[1])
    if len(args) >= 3 and args[0] == "worker":
        from .worker import run_worker

        return run_worker(args[1], int(args[2]))
    print(__doc__.split("\n\n")[0], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
