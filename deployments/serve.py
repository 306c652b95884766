"""Serve the deployments of prefect.yaml from this process (`flow.serve` style), with an environment's overrides.

    python deployments/serve.py                 # embedded defaults, like `make serve`
    python deployments/serve.py --env dev       # deployments/environments/dev.yaml

Starts a local Prefect server on 127.0.0.1:4200 unless PREFECT_API_URL is set.
"""

from __future__ import annotations

import argparse
import os

from prefect_tensorflow.flows.defaults import apply_environment_defaults

ENVIRONMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "environments")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", help="name of a file in deployments/environments/")
    parser.add_argument("--limit", type=int, default=None, help="most flow runs at once")
    args = parser.parse_args()
    apply_environment_defaults()
    from prefect_tensorflow.flows.deployments import DeploymentError, load_overrides, serve_deployments

    try:
        overrides = load_overrides(args.env, ENVIRONMENTS)
    except DeploymentError as err:
        raise SystemExit(f"error: {err}") from err
    serve_deployments(overrides, limit=args.limit)
