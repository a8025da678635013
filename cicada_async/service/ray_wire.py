"""What the Ray Serve front end's two deployments share: the builder's arguments, the request
the ingress forwards and the reply a replica sends back, and the answers the ingress makes
itself (V2's and OpenAI's error shapes, the server metadata, the auth scope of a path).

The ingress runs in its own small Ray worker: this module and everything it imports stay free
of torch (and of the data plane, which imports it), so the ingress starts in the time of Ray's
and pydantic's imports. The few facts it needs from torch-importing modules are spelled out
here; ``tests/deploy/test_ray_ingress.py`` checks that each agrees with its source.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import orjson
from pydantic import BaseModel, ConfigDict, model_validator

from cicada_async.service.auth import scope_of as scope_of  # HTTP's rule, torch-free: the ingress uses it

if TYPE_CHECKING:
    from cicada_async.service.config import Config

log = logging.getLogger("cicada.ray")
REPLICA_HEADER = "cicada-replica"  # which replica answered: the multiplexing test reads it
NODE_HEADER = "cicada-node"
REPLICA_TIME_HEADER = "cicada-replica-s"  # seconds the request spent in the model replica (V2 replies)
# When the replica's process started, its constructor began and returned, and this request
# entered it: four wall-clock times (seconds since the epoch, this node's clock), space-separated.
# The bench splits a first answer's wait on Ray's path with them (docs/ray-serve.md).
REPLICA_CLOCK_HEADER = "cicada-replica-clock"

# dataplane.SERVER_NAME, SERVER_VERSION, EXTENSIONS (the data plane imports torch).
SERVER_NAME = "cicada-async"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("binary_tensor_data", "model_repository", "schedule_policy", "statistics", "model_configuration")
OPENAI_PREFIXES = ("/v1", "/openai/v1")  # openai_api.PREFIXES
EVENT_STREAM = "text/event-stream; charset=utf-8"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # as sse.EventStream's
DONE = b"data: [DONE]\n\n"  # sse.DONE: the end of an OpenAI stream


class CicadaArgs(BaseModel):
    """The builder's arguments (``serve run ... key=value`` or a Serve config's ``args``)."""

    model_config = ConfigDict(extra="forbid")
    model_repository: str | None = None
    config: str | None = None  # the cicada.toml of ``cicada serve --config``
    min_replicas: int = 0
    max_replicas: int = 2
    initial_replicas: int | None = None
    downscale_delay_s: float = 600.0  # Ray's default
    upscale_delay_s: float = 30.0  # Ray's default; from zero replicas Ray scales up at once
    target_ongoing_requests: float = 2.0
    # The engine batches and orders by priority what Ray lets through: more than one request
    # per replica must reach it for that to matter.
    max_ongoing_requests: int = 16
    max_models_per_replica: int = 3
    num_cpus: float = 1.0  # per model replica; torch gets as many threads (at least one)
    memory_bytes: int | None = None  # Ray's memory resource of a model replica
    num_gpus: float = 0.0
    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.0
    # Custom Ray resources a model replica / an ingress replica needs (Ray's ray_actor_options
    # "resources"): e.g. to keep the ingress on the proxy's node, whose loss it cannot survive.
    resources: dict[str, float] = {}
    ingress_resources: dict[str, float] = {}
    # Other AutoscalingConfig fields (metrics_interval_s, look_back_period_s, ...): tests use
    # short ones; the defaults suit a real cluster.
    autoscaling: dict[str, float] = {}

    @model_validator(mode="after")
    def _one_source(self) -> CicadaArgs:
        if (self.model_repository is None) == (self.config is None):
            raise ValueError("give exactly one of model_repository and config")
        return self


def load_settings(args: CicadaArgs) -> Config:
    """The same Config that ``cicada serve --config F`` / ``--model-repository D`` reads."""
    from cicada_async.service import auth
    from cicada_async.service.config import Config, ModelConfig, load_config, scan_repository

    if args.config is not None:
        config = load_config(args.config)
    else:
        repo = Path(args.model_repository or "")
        config = Config(model_repository=repo)
        config.models = scan_repository(repo, ModelConfig(name="_", uri="_"))
    auth.merge_env(config.server.auth)
    return config


def process_started_at() -> float | None:
    """This process's start in seconds since the epoch (/proc, 10 ms ticks), or None without /proc."""
    import os
    import time

    try:
        after_paren = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        start_ticks = int(after_paren[19])  # field 22 (starttime), counted from field 3
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def clock_header(process: float | None, init_begin: float, init_end: float, entered: float) -> str:
    """``REPLICA_CLOCK_HEADER``'s value."""
    return " ".join(f"{t:.3f}" if t is not None else "-" for t in (process, init_begin, init_end, entered))


Action = Literal["infer", "metadata", "ready", "config", "stats", "load", "unload", "index", "metrics",
                 "completions", "chat", "generate", "generate_stream"]
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # metrics.CONTENT_TYPE (Prometheus text)


@dataclass
class Forwarded:
    """An HTTP request as the ingress forwards it: the route decided, the body untouched."""

    action: Action
    model: str | None
    version: str | None
    body: bytes = b""
    header_length: str | None = None


@dataclass
class Reply:
    """A replica's answer; for generation, the head of a stream whose body chunks follow."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    @property
    def streamed(self) -> bool:
        return self.content_type.startswith("text/event-stream")


def json_reply(obj: object, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, orjson.dumps(obj), headers or {})


def error_reply(exc: BaseException) -> Reply:
    """The V2 error shape and status of ``responses.error_response`` (docs/service.md)."""
    from protocols.errors import BadRequest, CicadaError, DeadlineExceeded, ModelNotFound, Overloaded, ShuttingDown

    if isinstance(exc, (Overloaded, ShuttingDown)):
        retry = exc.retry_after_s if isinstance(exc, Overloaded) else 1.0
        return json_reply({"error": str(exc)}, 503, {"Retry-After": str(max(1, round(retry)))})
    status = (400 if isinstance(exc, BadRequest) else 404 if isinstance(exc, ModelNotFound)
              else 504 if isinstance(exc, DeadlineExceeded) else 500)
    if status == 500 and not isinstance(exc, CicadaError):
        log.error("unhandled error in a replica", exc_info=exc)
        return json_reply({"error": "internal server error"}, 500)
    return json_reply({"error": str(exc) or type(exc).__name__}, status)


_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}  # openai_wire's


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, object]:
    """OpenAI's error object (``openai_wire.error``)."""
    kind = _OPENAI_TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def is_openai(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in OPENAI_PREFIXES)


def as_openai(reply: Reply) -> Reply:
    """A V2-shaped error (``{"error": "..."}``) in OpenAI's shape, status and headers kept (what
    ``openai_api.openai_errors`` does to the other layers' answers in ``cicada serve``)."""
    if reply.status < 400 or reply.content_type != "application/json":
        return reply
    try:
        doc = orjson.loads(reply.body)
    except orjson.JSONDecodeError:
        return reply
    if not isinstance(doc, dict) or not isinstance(doc.get("error"), str):
        return reply
    return Reply(reply.status, orjson.dumps(openai_error(reply.status, doc["error"])), reply.headers)
