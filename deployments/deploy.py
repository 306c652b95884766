"""Create both deployments on a work pool (the Python way to do `prefect deploy --all`).

    python deployments/deploy.py --env prod --work-pool tensorflow-process
    prefect worker start --pool tensorflow-process

Needs a running Prefect server (PREFECT_API_URL). The flows are loaded by
module path from the installed package, so the worker's environment must have
prefect-tensorflow installed; the working directory of a run is this
repository (as in prefect.yaml).
"""

from __future__ import annotations

import argparse
import os

from environments import load_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", help="name of a file in deployments/environments/")
    parser.add_argument("--work-pool", default="tensorflow-process", help="a process work pool")
    args = parser.parse_args()
    overrides = load_overrides(args.env)

    from prefect import deploy
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.runner.storage import LocalStorage

    from prefect_tensorflow.flows.serve import build_deployments

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=args.work_pool, type="process"))
        except ObjectAlreadyExists:
            pass
    runner_deployments = build_deployments(overrides)
    for deployment in runner_deployments:
        deployment.storage = LocalStorage(REPO)
        deployment.job_variables = {"env": {"TF_CPP_MIN_LOG_LEVEL": "3"}}
    ids = deploy(*runner_deployments, work_pool_name=args.work_pool, build=False, push=False, print_next_steps_message=False)
    print(f"created {len(ids)} deployments on work pool {args.work_pool!r}: retrain/retrain-iris, export-checkpoint/export-checkpoint")
