"""TOML configuration for ``cicada serve``: dataclasses with one docstring per field.

A config file looks like::

    [server]
    port = 8080
    memory_budget_bytes = 8_000_000_000

    [storage.s3]
    endpoint_url = "http://minio:9000"

    [cache]
    plan_dir = "/var/cache/cicada/plans"

    [models.gpt2]
    uri = "s3://bucket/gpt2"
    dtype = "bfloat16"
    keep_alive_s = 600

Every problem is reported as ``ConfigError`` naming the offending key.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocols.errors import ConfigError

# Names are matched, never joined into paths (reliability.md): this keeps URLs, metric labels
# and log lines free of separators and control characters.
MODEL_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$")
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_PRIORITY = 10
# protocols.v2.DATATYPES' names without its torch import: the Ray ingress reads configs (test_ray_ingress).
V2_DATATYPES = frozenset("BOOL UINT8 UINT16 UINT32 UINT64 INT8 INT16 INT32 INT64 FP16 BF16 FP32 FP64".split())


@dataclass
class AuthConfig:
    """The ``[server.auth]`` table: optional bearer tokens (see cicada_async/service/auth.py).

    With no token configured at all, every route is open. With any token configured, every
    route except health (and /metrics unless ``protect_metrics``) needs a token of its scope;
    a scope with no tokens is then closed to everyone.
    """

    inference_tokens: list[str] = field(default_factory=list, repr=False)
    """Tokens for infer and metadata routes; also $CICADA_INFERENCE_TOKENS (comma list)."""
    admin_tokens: list[str] = field(default_factory=list, repr=False)
    """Tokens for /v2/repository/* (index, load, unload); also $CICADA_ADMIN_TOKENS."""
    protect_metrics: bool = False
    """Require a token (either scope) for /metrics; off so that scrapers need no secret."""

    @property
    def enabled(self) -> bool:
        return bool(self.inference_tokens or self.admin_tokens)


@dataclass
class ServerConfig:
    """The ``[server]`` table."""

    host: str = "0.0.0.0"
    """Address to bind; Knative requires 0.0.0.0."""
    port: int | None = None
    """TCP port; None means $PORT, else 8080. 0 picks a free port (tests)."""
    grpc_port: int | None = None
    """TCP port of the V2 gRPC service on the same host; None (the default) serves no gRPC.
    Same scheduler, limits and tokens as HTTP; its largest message is max_request_bytes."""
    max_request_bytes: int = 64 * 1024 * 1024
    """Largest infer request body accepted (413 above it); other routes keep aiohttp's 1 MiB."""
    max_queue_total: int = 1024
    """Requests waiting across all models; above it the lowest priority is shed with 503."""
    memory_budget_bytes: int | None = None
    """Weight bytes that may be resident at once; idle models are evicted LRU. None: no limit."""
    retry_after_s: float = 1.0
    """Retry-After sent with 503 answers (overload, shutting down)."""
    shutdown_timeout_s: float = 25.0
    """How long admitted requests may take to finish after SIGTERM (keep it under the pod's
    grace period minus queue-proxy's 30 s drain)."""
    max_connections: int = 1024
    """TCP backlog; a proxy in front is expected to cap connections too."""
    keep_alive_check_s: float = 1.0
    """How often idle models are checked against keep_alive_s and the memory budget."""
    serialize_loads: bool = False
    """Benchmark baseline only: a waiting cold start keeps all compute; read slots go FIFO."""
    prefetch: bool = False
    """Read the local models' weight files into the page cache from the process's first
    millisecond, while torch imports (cicada_async/engine/prefetch.py). Models are taken in
    config order while they fit half of MemAvailable (and memory_budget_bytes); remote ones are
    skipped. Off by default (it cost more than it saved: docs/process-start.md); $CICADA_PREFETCH=1/0 overrides."""
    torch_threads: int | None = None
    """Torch intra-op threads; None: usable cores minus one while any load fetches (the fetch
    and the loop keep a core), every usable core for warm forwards while none does. 0 leaves
    torch's default; any value set is used for every forward."""
    max_body_bytes_in_flight: int = 1 << 30
    """Infer body bytes the server holds at once (being read, queued or running). A request
    whose Content-Length does not fit is refused with 503 before its body is read; a chunked
    body that runs out of room mid-read is refused then. Bounds memory under a flood."""
    body_timeout_s: float = 60.0
    """Longest time allowed to receive one infer body (408 after it): a slow sender cannot hold
    a handler and its buffer forever."""
    min_body_rate_bps: float = 8192.0
    """Slow-body floor: after ``body_rate_grace_s``, an infer body must keep arriving at this
    many bytes per second on average (408 otherwise). 0 turns the floor off."""
    body_rate_grace_s: float = 5.0
    """Seconds a body may take before the rate floor applies (a slow start is no attack)."""
    header_timeout_s: float = 10.0
    """Time from a connection's opening, or the first byte of a later request on it, to the
    end of its headers; a connection that sends no complete request line and headers in that
    time is closed (408 when it had sent something). Applies before auth."""
    idle_timeout_s: float = 75.0
    """Keep-alive: a connection idle this long between requests is closed. Keep it above the
    proxy's idle timeout in front, so the proxy closes first and never reuses a dying one."""
    max_open_connections: int = 4096
    """Open client connections at once; new ones beyond it take a health-probe slot or are
    closed at accept. Kept below the process's fd limit (the server checks at start)."""
    max_connections_per_peer: int = 1024
    """Open connections from one peer address. Behind a single proxy every connection has the
    proxy's address: set it to max_open_connections there."""
    health_reserved_connections: int = 16
    """Connections kept beyond the caps for health probes only: on them /v2/health/live and
    /ready are answered and anything else is 503 + Connection: close."""
    accept_error_log_interval_s: float = 10.0
    """A failing accept() (fds exhausted) logs one line per interval with a count, not a
    traceback per attempt."""
    auth: AuthConfig = field(default_factory=AuthConfig)
    """The [server.auth] table."""


@dataclass
class TensorSpec:
    """One entry of a model's ``inputs`` or ``outputs`` metadata."""

    name: str
    """Forward keyword argument (inputs) or output key (outputs)."""
    datatype: str
    """V2 datatype, e.g. INT64 or FP32."""
    shape: list[int]
    """Dimensions; -1 for a variable one."""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class ModelConfig:
    """One ``[models.NAME]`` table."""

    name: str
    """Model name used in URLs; matches ^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$."""
    uri: str
    """Where the model directory lives: a path, file://, s3:// or http(s)://."""
    dtype: str | None = None
    """Compute dtype (float32, bfloat16, float16); None keeps the checkpoint's dtype."""
    device: str = "cpu"
    """Torch device the model runs on."""
    inputs: list[TensorSpec] | None = None
    """Input metadata to publish; None derives it from the model."""
    outputs: list[TensorSpec] | None = None
    """Output metadata to publish; None derives it from the model."""
    keep_alive_s: float | None = 300.0
    """Idle seconds after which the weights are dropped; None or 0 keeps them forever."""
    max_queue: int = 256
    """Requests of this model that may wait; above it the lowest priority is shed with 503."""
    default_priority: int = DEFAULT_PRIORITY
    """Priority of requests that send none (or 0); 1 is the most urgent."""
    max_batch_size: int = 0
    """Dynamic batching: most rows (first-dimension entries) one forward takes; 0: no batching."""
    preferred_batch_sizes: list[int] = field(default_factory=list)
    """Batch sizes run at once, without waiting out max_queue_delay_us (Triton's preferred_batch_size)."""
    max_queue_delay_us: int = 0
    """How long a batch smaller than max_batch_size may wait for more requests (docs/service.md)."""
    kv_cache_bytes: int = 256 << 20
    """A causal LM's KV cache budget in bytes, counted in the memory budget with its weights
    (both defaults are protocols.serving.ModelOptions'; this module does not import torch)."""
    max_sequences: int = 16
    """Sequences of one causal LM generating at once (its continuous batch), at most."""


@dataclass
class CacheConfig:
    """The ``[cache]`` table."""

    plan_dir: Path | None = None
    """Where plan files of remote models (and of read-only model directories) are kept; None:
    $XDG_CACHE_HOME/cicada/plans, else ~/.cache/cicada/plans. Local model directories keep
    theirs in <model dir>/.cicada/ (see cicada_async/engine/plancache.py)."""


@dataclass
class Config:
    """A whole config file."""

    server: ServerConfig = field(default_factory=ServerConfig)
    """The [server] table."""
    storage: dict[str, dict[str, Any]] = field(default_factory=dict)
    """[storage.s3|http|file] tables, passed unchanged to Engine(storage=...)."""
    models: dict[str, ModelConfig] = field(default_factory=dict)
    """Models by name."""
    model_repository: Path | None = None
    """A directory whose subfolders are models (--model-repository); rescanned by /v2/repository/index."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """The [cache] table's plan_dir (plan files)."""
    node_cache: dict[str, Any] = field(default_factory=dict)
    """[cache] dir and max_bytes: the node cache of remote weight files (backends/cache.py)."""


def _check_keys(table: dict[str, Any], cls: type, where: str, extra: tuple[str, ...] = ()) -> None:
    known = {f.name for f in dataclasses.fields(cls)} | set(extra)
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")


def _typed(value: Any, types: tuple[type, ...], where: str, *, minimum: float | None = None) -> Any:
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise ConfigError(f"{where}: expected {'/'.join(t.__name__ for t in types)}, got {value!r}")
    if minimum is not None and isinstance(value, (int, float)) and value < minimum:  # minimums are numbers
        raise ConfigError(f"{where}: must be >= {minimum}, got {value!r}")
    return value


def _server(table: dict[str, Any]) -> ServerConfig:
    _check_keys(table, ServerConfig, "[server]")
    cfg = ServerConfig()
    for key, value in table.items():
        where = f"[server] {key}"
        if key == "host":
            _typed(value, (str,), where)
        elif key in ("port", "grpc_port"):
            _typed(value, (int,), where, minimum=0)
            if value > 65535:
                raise ConfigError(f"{where}: must be <= 65535")
        elif key in ("serialize_loads", "prefetch"):
            _typed(value, (bool,), where)
        elif key in ("max_request_bytes", "max_queue_total", "max_connections", "max_body_bytes_in_flight",
                     "max_open_connections", "max_connections_per_peer", "memory_budget_bytes"):
            _typed(value, (int,), where, minimum=1)
        elif key in ("torch_threads", "health_reserved_connections"):
            _typed(value, (int,), where, minimum=0)
        elif key == "auth":
            value = _auth(_typed(value, (dict,), "[server.auth]"))
        else:
            value = float(_typed(value, (int, float), where, minimum=0))
        setattr(cfg, key, value)
    return cfg


def _auth(table: dict[str, Any]) -> AuthConfig:
    _check_keys(table, AuthConfig, "[server.auth]")
    cfg = AuthConfig()
    for key, value in table.items():
        where = f"[server.auth] {key}"
        if key == "protect_metrics":
            cfg.protect_metrics = _typed(value, (bool,), where)
            continue
        tokens = _typed(value, (list,), where)
        for i, t in enumerate(tokens):
            # Never echo the value: a config error must not put a secret in the logs.
            if not isinstance(t, str) or not t or not t.isascii() or not t.isprintable() or " " in t:
                raise ConfigError(f"{where}[{i}]: tokens must be non-empty printable ASCII without spaces")
        setattr(cfg, key, list(tokens))
    return cfg


def _specs(raw: Any, where: str) -> list[TensorSpec]:
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: must be an array of tables {{name, datatype, shape}}")
    specs = []
    for i, item in enumerate(raw):
        w = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{w}: must be a table")
        _check_keys(item, TensorSpec, w)
        for key in ("name", "datatype", "shape"):
            if key not in item:
                raise ConfigError(f"{w}: missing {key!r}")
        if item["datatype"] not in V2_DATATYPES:
            raise ConfigError(f"{w}: unknown datatype {item['datatype']!r}")
        shape = item["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= -1 for d in shape):
            raise ConfigError(f"{w}: shape must be a list of integers >= -1")
        specs.append(TensorSpec(_typed(item["name"], (str,), f"{w} name"), item["datatype"], list(shape)))
    return specs


def check_model_name(name: str, where: str = "model") -> str:
    if not MODEL_NAME_RE.match(name):
        raise ConfigError(f"{where}: name {name!r} must match {MODEL_NAME_RE.pattern}")
    return name


def model_config(name: str, table: dict[str, Any]) -> ModelConfig:
    where = f"[models.{name}]"
    check_model_name(name, where)
    _check_keys(table, ModelConfig, where)
    if "uri" not in table:
        raise ConfigError(f"{where}: missing 'uri'")
    cfg = ModelConfig(name=name, uri=_typed(table["uri"], (str,), f"{where} uri"))
    for key, value in table.items():
        w = f"{where} {key}"
        if key in ("uri", "name"):
            if key == "name" and value != name:
                raise ConfigError(f"{w}: differs from the table name {name!r}")
            continue
        if key == "dtype":
            if value not in DTYPES:
                raise ConfigError(f"{w}: must be one of {', '.join(DTYPES)}, got {value!r}")
        elif key == "device":
            _typed(value, (str,), w)
        elif key in ("inputs", "outputs"):
            value = _specs(value, w)
        elif key == "keep_alive_s":
            value = float(_typed(value, (int, float), w, minimum=0)) or None
        elif key in ("max_queue", "default_priority", "kv_cache_bytes", "max_sequences"):
            _typed(value, (int,), w, minimum=1)
        elif key in ("max_batch_size", "max_queue_delay_us"):
            _typed(value, (int,), w, minimum=0)
        elif key == "preferred_batch_sizes":
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in _typed(value, (list,), w)):
                raise ConfigError(f"{w}: must be a list of integers >= 1")
        setattr(cfg, key, value)
    if any(b > cfg.max_batch_size for b in cfg.preferred_batch_sizes):
        raise ConfigError(f"{where} preferred_batch_sizes: each must be <= max_batch_size ({cfg.max_batch_size})")
    return cfg


def _node_cache(table: dict[str, Any]) -> dict[str, Any]:
    """The node cache's keys of [cache], checked; the table may hold other features' keys."""
    from backends.cache import CACHE_KEYS, CacheSettings

    mine = {k: table[k] for k in CACHE_KEYS if k in table}
    if mine:
        CacheSettings.from_table(mine)
    return mine


def parse_config(doc: dict[str, Any]) -> Config:
    """Build a Config from a parsed TOML document."""
    unknown = sorted(set(doc) - {"server", "storage", "models", "model_repository", "cache"})
    if unknown:
        raise ConfigError(f"unknown top-level table(s) {', '.join(unknown)} (known: server, storage, models, model_repository, cache)")
    cfg = Config(server=_server(_typed(doc.get("server", {}), (dict,), "[server]")))
    cache = _typed(doc.get("cache", {}), (dict,), "[cache]")
    _check_keys(cache, CacheConfig, "[cache]", extra=("dir", "max_bytes"))  # + the node cache's
    if "plan_dir" in cache:
        cfg.cache.plan_dir = Path(_typed(cache["plan_dir"], (str,), "[cache] plan_dir"))
    storage = _typed(doc.get("storage", {}), (dict,), "[storage]")
    for scheme, table in storage.items():
        if scheme not in ("s3", "http", "file"):
            raise ConfigError(f"[storage.{scheme}]: unknown backend (known: s3, http, file)")
        cfg.storage[scheme] = dict(_typed(table, (dict,), f"[storage.{scheme}]"))
    cfg.node_cache = _node_cache(_typed(doc.get("cache", {}), (dict,), "[cache]"))
    for name, table in _typed(doc.get("models", {}), (dict,), "[models]").items():
        cfg.models[name] = model_config(name, _typed(table, (dict,), f"[models.{name}]"))
    if "model_repository" in doc:
        cfg.model_repository = Path(_typed(doc["model_repository"], (str,), "model_repository"))
        cfg.models.update({k: v for k, v in scan_repository(cfg.model_repository).items() if k not in cfg.models})
    return cfg


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    try:
        return parse_config(doc)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def scan_repository(root: Path, defaults: ModelConfig | None = None) -> dict[str, ModelConfig]:
    """Models from a directory: each subfolder holding config.json or cicada.json is one model.

    Folder names that are not valid model names are skipped rather than escaped, so a name
    never has to be mapped back to a path.
    """
    if not root.is_dir():
        raise ConfigError(f"model repository {root} is not a directory")
    models = {}
    for sub in sorted(root.iterdir()):
        if sub.is_dir() and not sub.is_symlink() and MODEL_NAME_RE.match(sub.name) and _is_model_dir(sub):
            base = dataclasses.replace(defaults, name=sub.name, uri=str(sub.resolve())) if defaults else None
            models[sub.name] = base or ModelConfig(name=sub.name, uri=str(sub.resolve()))
    return models


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "cicada.json").is_file()
