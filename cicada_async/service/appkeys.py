"""The application's shared state, by typed key, and what the server says of itself."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from aiohttp import web

from cicada_async.service import auth
from cicada_async.service.config import Config
from cicada_async.service.metrics import Metrics
from cicada_async.service.repository import Repository
from cicada_async.service.scheduler import Scheduler
from cicada_async.service.stats import Stats

SERVER_NAME = "cicada-async"
SERVER_VERSION = "0.1.0"
# Only what is served: the binary tensor extension (HTTP), the model repository (index, load,
# unload), schedule_policy (the priority and timeout parameters), statistics (/stats) and
# model_configuration (/config); over gRPC too, except binary_tensor_data (raw contents instead).
EXTENSIONS = ["binary_tensor_data", "model_repository", "schedule_policy", "statistics", "model_configuration"]
# Decoding/encoding big bodies (numpy parsing of long JSON lists) would stall the loop.
OFFLOAD_BYTES = 256 * 1024

EngineFactory = Callable[[Config], AbstractAsyncContextManager[Any]]

CONFIG_KEY = web.AppKey("config", Config)
METRICS_KEY = web.AppKey("metrics", Metrics)
REPO_KEY = web.AppKey("repository", Repository)
SCHED_KEY = web.AppKey("scheduler", Scheduler)
STATE_KEY = web.AppKey("state", dict)
ENGINE_KEY = web.AppKey("engine", object)
BUDGET_KEY = web.AppKey("body_budget", object)  # infer.BodyBudget
TOKENS_KEY = web.AppKey("tokens", auth.TokenSet)
STATS_KEY = web.AppKey("stats", Stats)
GRPC_KEY = web.AppKey("grpc", object)  # grpc_server.GrpcServer, when [server] grpc_port is set
