"""`Settings`: every knob of the package that is not a task argument, from `PREFECT_TENSORFLOW_*`.

One pydantic-settings class, read fresh on each `get_settings()` call (no
module-level state, so a test or a worker can change the environment between
runs):

| variable | meaning | default |
|---|---|---|
| `PREFECT_TENSORFLOW_HOME` | the data home: embedded model dirs, exports, frozen graphs, MLflow store | `./.prefect-tensorflow` |
| `PREFECT_TENSORFLOW_ROOTS` | where paths typed into a deployment's Run form may point (comma-separated paths or `s3://bucket/prefix`) | the data home |
| `PREFECT_TENSORFLOW_ALLOWED_MODULES` | module prefixes whose `module:attr` import strings a deployment run may load, beside the registered names | none |
| `PREFECT_TENSORFLOW_METRICS_TIMEOUT` | seconds selection waits for a checkpoint's evaluation metrics | 900 |
| `PREFECT_TENSORFLOW_SERVER_STARTUP_TIMEOUT` | seconds to wait for a Prefect or MLflow server to answer | 180 |
| `PREFECT_TENSORFLOW_DASK_ADDRESS` | scheduler of an existing Dask cluster for `sweep` | a local cluster |
| `PREFECT_TENSORFLOW_DASK_CONNECT_TIMEOUT` | seconds `sweep` waits to reach that scheduler before anything is written | 5 |
| `PREFECT_TENSORFLOW_MLFLOW_WEBHOOK_SECRET` | the MLflow registry webhooks' HMAC secret; set, `serve` receives them | unset: no receiver |
| `PREFECT_TENSORFLOW_MLFLOW_WEBHOOK_HOST` / `_PORT` | where `serve`'s webhook receiver listens | `127.0.0.1` / `4201` |
| `PREFECT_TENSORFLOW_LEASE_WAIT` | seconds a training waits for another one holding its model dir (or window) before refusing | 0 |
| `PREFECT_TENSORFLOW_LEASE_TTL` | seconds an object-store lease lives without its holder's heartbeat before another takes it over | 60 |
| `PREFECT_TENSORFLOW_RESUBMIT_CRASHED` | how many times a crashed `retrain`, `sweep` or `export-checkpoint` run is resubmitted (same parameters, resuming); 0: never | 2 |
| `PREFECT_TENSORFLOW_ZOMBIE_AFTER_SECONDS` | a running flow run silent (no heartbeat) this long is marked Crashed; read when serve or deploy creates the automation | 90 |
| `PREFECT_TENSORFLOW_WARM_RUNS` | `serve` forks `export-checkpoint` runs from a template with TensorFlow imported (`flows/warm_runs.py`); false: a new process per run | true |

Example:
    >>> import os
    >>> from prefect_tensorflow.tasks.settings import get_settings
    >>> os.environ["PREFECT_TENSORFLOW_ROOTS"] = "/srv/models, s3://team/models"
    >>> get_settings().roots
    ['/srv/models', 's3://team/models']
    >>> del os.environ["PREFECT_TENSORFLOW_ROOTS"]
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Optional

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_HOME = ".prefect-tensorflow"


class Settings(BaseSettings):
    """The package's settings; see the module docstring for the variables."""

    model_config = SettingsConfigDict(env_prefix="PREFECT_TENSORFLOW_", frozen=True, extra="ignore")

    home: str = Field(default=DEFAULT_HOME, description="The data home (made absolute when read).")
    roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Roots that deployment path parameters must resolve under."
    )
    allowed_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Module prefixes deployment runs may import model code from."
    )
    metrics_timeout: float = Field(default=900.0, gt=0, description="Seconds to wait for checkpoint metrics.")
    server_startup_timeout: float = Field(default=180.0, gt=0, description="Seconds to wait for a server.")
    dask_address: Optional[str] = Field(default=None, description="An existing Dask scheduler, tcp://host:port.")
    dask_connect_timeout: float = Field(default=5.0, gt=0, description="Seconds a sweep waits to reach its Dask scheduler.")
    mlflow_webhook_secret: Optional[SecretStr] = Field(default=None, description="HMAC secret of MLflow's registry webhooks.")
    mlflow_webhook_host: str = Field(default="127.0.0.1", description="Address the webhook receiver binds.")
    mlflow_webhook_port: int = Field(default=4201, ge=0, le=65535, description="Port of the webhook receiver (0: any free one).")
    lease_wait: float = Field(default=0.0, ge=0, description="Seconds to wait for a model dir another training holds.")
    lease_ttl: float = Field(default=60.0, gt=0, description="Seconds an object-store lease outlives its last heartbeat.")
    resubmit_crashed: int = Field(
        default=2, ge=0, le=100, description="Automatic resubmissions of a crashed training run (0: off)."
    )
    zombie_after_seconds: float = Field(
        default=90.0, ge=35.0, description="Seconds without a heartbeat after which a running flow run is marked Crashed."
    )
    warm_runs: bool = Field(default=True, description="serve forks export-checkpoint runs from a warm template.")

    @field_validator("roots", "allowed_modules", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: str) -> str:
        return os.path.abspath(value or DEFAULT_HOME)

    def allowed_roots(self) -> list[str]:
        """`roots`, or the data home when none are configured."""
        return list(self.roots) or [self.home]

    def default_path(self, kind: str, name: str = "iris") -> str:
        """`<home>/<kind>/<name>`: where the embedded defaults put model dirs, exports and frozen graphs.

        `name` is the model's (its registered model name), so two models never share a default export
        base or frozen-graph directory.

        Raises:
            ValueError: `name` is not usable as one directory name (empty, '.', '..', a separator).
        """
        if name in ("", ".", "..") or os.sep in name or "\x00" in name:
            raise ValueError(f"default {kind} directory: expected a model name usable as a directory name, received {name!r}")
        return os.path.join(self.home, kind, name)


def get_settings() -> Settings:
    """The settings as the environment says now."""
    return Settings()


def data_home() -> str:
    """The absolute data home: `$PREFECT_TENSORFLOW_HOME` or `./.prefect-tensorflow`."""
    return get_settings().home
