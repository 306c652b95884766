"""Create the deployments of prefect.yaml on a work pool (the Python way to `prefect deploy --all`), with overrides.

    python deployments/deploy.py --env prod --work-pool tensorflow-process
    prefect worker start --pool tensorflow-process

The triggers of prefect.yaml (retrain-daily on the data sensor's event,
sync-exports on a champion move, resubmit-crashed on a crashed run) become the
deployments' automations, as with `prefect deploy --all`; the zombie-run
automation (flows/zombie_runs.py: a run without heartbeats for
PREFECT_TENSORFLOW_ZOMBIE_AFTER_SECONDS is marked Crashed) is created too. The
work pool's environment in prefect.yaml makes the runs send heartbeats every 30 s. Needs a running Prefect server (PREFECT_API_URL). The flows are loaded by
module path from the installed package, so the worker's environment must have
prefect-tensorflow installed; the working directory of a run is this
repository (as in prefect.yaml).
"""

from __future__ import annotations

import argparse
import os

from prefect_tensorflow.flows.defaults import apply_environment_defaults

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", help="name of a file in deployments/environments/")
    parser.add_argument("--work-pool", default=None, help="a process work pool [default: prefect.yaml's]")
    args = parser.parse_args()
    apply_environment_defaults()
    from prefect import deploy
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.runner.storage import LocalStorage

    from prefect_tensorflow.flows.deployments import (
        DeploymentError,
        apply_overrides,
        build_deployments,
        load_definitions,
        load_overrides,
    )
    from prefect_tensorflow.flows.unreadable_runs import bound_deployment_schemas
    from prefect_tensorflow.flows.zombie_runs import ensure_zombie_automation
    from prefect_tensorflow.tasks.settings import get_settings

    try:
        definitions = apply_overrides(load_definitions(), load_overrides(args.env, os.path.join(HERE, "environments")))
    except DeploymentError as err:
        raise SystemExit(f"error: {err}") from err
    pool = args.work_pool or definitions[0].work_pool.get("name", "tensorflow-process")
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            pass
        ensure_zombie_automation(client, get_settings().zombie_after_seconds)
    runner_deployments = build_deployments(definitions)
    for definition, deployment in zip(definitions, runner_deployments):
        deployment.storage = LocalStorage(REPO)
        deployment.job_variables = dict(definition.work_pool.get("job_variables", {}))
    ids = deploy(*runner_deployments, work_pool_name=pool, build=False, push=False, print_next_steps_message=False)
    bound_deployment_schemas(ids)  # free-form values nest at most 32 levels, no lone surrogates
    print(f"created {len(ids)} deployments on work pool {pool!r}: {', '.join(d.name for d in definitions)}")
