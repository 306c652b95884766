"""The Prefect server `serve` starts can be shut: never reachable beyond this machine without auth."""

from __future__ import annotations

import base64
import os
import subprocess
import urllib.error
import urllib.request

import pytest
from helpers import cli_command
from served import seed_prefect_home

from prefect_tensorflow.flows.deployments import DeploymentError, check_bind_address
from prefect_tensorflow.flows.servers import free_port, start_prefect_server
from prefect_tensorflow.tasks.child_processes import stop_process_group


def test_a_non_loopback_address_needs_api_auth(monkeypatch):
    monkeypatch.delenv("PREFECT_SERVER_API_AUTH_STRING", raising=False)
    for host in ("127.0.0.1", "localhost", "::1"):
        check_bind_address(host)
    for host in ("0.0.0.0", "192.168.1.10", "::", "my-host.example"):
        with pytest.raises(DeploymentError, match="set PREFECT_SERVER_API_AUTH_STRING"):
            check_bind_address(host)
    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", "admin:long-and-secret")
    check_bind_address("0.0.0.0")


def test_serve_refuses_to_bind_every_interface_without_auth(cli_env, tmp_path):
    env = {k: v for k, v in cli_env.items() if k not in ("PREFECT_API_URL", "PREFECT_SERVER_API_AUTH_STRING")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    result = subprocess.run(
        cli_command("serve", "--host", "0.0.0.0"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--host 0.0.0.0: a Prefect server reachable beyond this machine" in result.stderr
    assert not (tmp_path / "prefect-home").exists() or not list((tmp_path / "prefect-home").glob("*.db"))


@pytest.mark.slow
def test_an_unauthenticated_call_to_a_server_with_auth_is_refused(tmp_path, prefect_database):
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_AUTH_STRING": "admin:long-and-secret",
    }
    env.pop("PREFECT_API_URL", None)
    seed_prefect_home(tmp_path / "home", prefect_database)
    server = start_prefect_server("127.0.0.1", port, str(tmp_path / "server.log"), env=env)
    try:
        url = f"http://127.0.0.1:{port}/api/flows/filter"

        def post(headers: dict) -> int:
            request = urllib.request.Request(
                url, data=b"{}", method="POST", headers={"Content-Type": "application/json", **headers}
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    return answer.status
            except urllib.error.HTTPError as err:
                return err.code

        assert post({}) == 401
        assert post({"Authorization": "Basic " + base64.b64encode(b"admin:wrong").decode()}) == 401
        assert post({"Authorization": "Basic " + base64.b64encode(b"admin:long-and-secret").decode()}) == 200
    finally:
        stop_process_group(server)
