"""``shmray.job_config.JobConfig``: a job's settings, passed as ``init(job_config=...)``, as
Ray's.

Runs in: the driver.

Of Ray's settings, the ones that mean something on one machine are honoured: the namespace
(``ray_namespace``), the runtime environment (its ``env_vars``), the lifetime actors get when
they don't choose one (``default_actor_lifetime``) and ``metadata`` (kept, for the program's
own use).  Java's settings (``jvm_options``, ``code_search_path``) are accepted and unused:
shmray runs Python only.  ``init``'s own ``namespace`` and ``runtime_env`` win over the
config's, as in Ray.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from . import _options

_LIFETIMES = ("detached", "non_detached")


class JobConfig:
    """A job's settings (Ray's ``ray.job_config.JobConfig``)."""

    def __init__(self, jvm_options: Optional[List[str]] = None,
                 code_search_path: Optional[List[str]] = None,
                 runtime_env: Optional[Dict[str, Any]] = None,
                 _client_job: bool = False,
                 metadata: Optional[Dict[str, str]] = None,
                 ray_namespace: Optional[str] = None,
                 default_actor_lifetime: str = "non_detached",
                 _py_driver_sys_path: Optional[List[str]] = None):
        self.jvm_options = list(jvm_options or [])
        self.code_search_path = list(code_search_path or [])
        self.metadata = dict(metadata or {})
        self._client_job = _client_job
        self._py_driver_sys_path = list(_py_driver_sys_path or [])
        self.runtime_env: Dict[str, Any] = {}
        self.ray_namespace: Optional[str] = None
        self.default_actor_lifetime = "non_detached"
        self.set_runtime_env(runtime_env)
        self.set_ray_namespace(ray_namespace)
        self.set_default_actor_lifetime(default_actor_lifetime)

    def set_metadata(self, key: str, value: str) -> None:
        self.metadata[key] = value

    def set_ray_namespace(self, ray_namespace: Optional[str]) -> None:
        _options.check_namespace(ray_namespace)
        self.ray_namespace = ray_namespace

    def set_runtime_env(self, runtime_env: Optional[Dict[str, Any]],
                        validate: bool = False) -> None:
        if runtime_env is not None:
            _options.check_runtime_env(runtime_env)
        self.runtime_env = dict(runtime_env or {})

    def set_default_actor_lifetime(self, default_actor_lifetime: str) -> None:
        if default_actor_lifetime not in _LIFETIMES:
            raise ValueError(  # Ray's text
                "Default actor lifetime must be one of `detached`, `non_detached`, got "
                f"{default_actor_lifetime!r}")
        self.default_actor_lifetime = default_actor_lifetime

    def to_dict(self) -> Dict[str, Any]:
        return {"jvm_options": self.jvm_options, "code_search_path": self.code_search_path,
                "runtime_env": self.runtime_env, "metadata": self.metadata,
                "ray_namespace": self.ray_namespace,
                "default_actor_lifetime": self.default_actor_lifetime}

    @classmethod
    def from_json(cls, job_config_json: Dict[str, Any]) -> "JobConfig":
        """A JobConfig from the dict ``ray job submit`` would carry (Ray's names)."""
        return cls(**{key: job_config_json[key] for key in (
            "jvm_options", "code_search_path", "runtime_env", "metadata", "ray_namespace",
            "default_actor_lifetime") if key in job_config_json})

    def __repr__(self) -> str:
        return f"JobConfig({self.to_dict()!r})"
