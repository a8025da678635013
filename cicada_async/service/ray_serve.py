"""The Ray Serve front end: ``serve run cicada_async.service.ray_serve:build model_repository=DIR``.

Two deployments, both thin translations over what ``cicada serve`` already has:

- ``CicadaIngress`` (``ray_ingress``) takes every HTTP request from Ray's proxy, answers what
  needs no model, checks the bearer token, and forwards the rest, body bytes untouched, to
  ``CicadaModels`` with the model's name as Ray's multiplexed model id: Ray's router then
  prefers a replica that holds the model. It imports no torch.
- ``CicadaModels`` is one ``DataPlane`` per replica (the engine as in ``cicada serve``:
  pipelined cold starts, priorities, batching, the memory budget). Its ``@serve.multiplexed``
  loader only records that the replica serves the model; it does not load it. The first
  request's forward is the cold start (the pipelined one), and Ray's one-load-at-a-time lock
  around loaders (ray-project/ray#65346) never holds up a second model. Ray's LRU eviction
  unloads the model from the engine, so what Ray routes by and what the engine holds agree.
  ``handle`` answers V2 with one ``Reply``; ``stream`` answers generation (OpenAI, Triton's
  generate) as a head and then events (``ray_generate``), streamed back through the ingress.

A decoded V2 request never crosses the hop: the ingress forwards the body bytes, the replica
decodes them with ``protocols.v2`` as the aiohttp front end does (docs/ray-serve.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, cast

from ray import serve
from ray.serve import Deployment

from cicada_async.service.ray_ingress import CicadaIngress
from cicada_async.service.ray_replica import ReplicaStart
from cicada_async.service.ray_wire import (
    METRICS_TYPE, NODE_HEADER, REPLICA_CLOCK_HEADER, REPLICA_HEADER, REPLICA_TIME_HEADER, CicadaArgs, Forwarded, Reply,
    as_openai, clock_header, error_reply, json_reply, load_settings, process_started_at,
)

if TYPE_CHECKING:
    from ray.serve import Application

    from cicada_async.service.dataplane import DataPlane

__all__ = ["NODE_HEADER", "REPLICA_HEADER", "REPLICA_TIME_HEADER", "CicadaArgs", "CicadaIngress", "CicadaModels",
           "build"]


class _Held:
    """What the multiplexed loader returns: this replica serves ``name``. Ray calls
    ``__del__`` (in a thread) when its LRU drops the model; the engine unloads it then."""

    def __init__(self, dp: DataPlane, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.dp, self.name, self.loop, self.live = dp, name, loop, True

    def __del__(self) -> None:
        if not self.live:  # Ray called it already; this is the garbage collector
            return
        self.live = False
        try:
            asyncio.run_coroutine_threadsafe(self.dp.unload(self.name), self.loop)
        except RuntimeError:  # the loop is closed: the replica is going away anyway
            pass


@serve.deployment()
class CicadaModels:
    """One data plane per replica, serving every model of the repository (multiplexed)."""

    async def __init__(self, args: CicadaArgs) -> None:  # type: ignore[misc]  # Ray awaits it
        # Ready at once: torch, the engine and the data plane start behind it (ray_replica), so
        # Ray routes the first request while they import, and that request's weights are read
        # meanwhile. Only the configured prefetch and the config are done here (no torch).
        init_begin = time.time()
        from cicada_async.engine import prefetch

        prefetch.start_for_cli(["serve", "--config", args.config] if args.config
                               else ["serve", "--model-repository", args.model_repository or ""])
        config = load_settings(args)
        if config.server.torch_threads is None:
            # Ray gives the replica num_cpus of the node: torch gets that many threads, not
            # every core of a node it shares with other replicas.
            config.server.torch_threads = max(1, int(args.num_cpus))
        self._start = ReplicaStart(config, config.server.torch_threads)
        loop = asyncio.get_running_loop()

        async def hold(model_id: str) -> _Held:
            dp = await self._start.data_plane(model_id)
            dp.model(model_id)  # unknown names are refused, never held
            return _Held(dp, model_id, loop)

        self._hold = serve.multiplexed(max_num_models_per_replica=args.max_models_per_replica)(hold)
        ctx = serve.get_replica_context()
        import ray

        self._ident = {REPLICA_HEADER: ctx.replica_id.unique_id, NODE_HEADER: ray.get_runtime_context().get_node_id()}
        self._clock = (process_started_at(), init_begin, time.time())

    async def check_health(self) -> None:
        """Ray's periodic health check: a replica whose start failed is replaced."""
        err = self._start.failed()
        if err is not None:
            raise RuntimeError(f"the replica's start failed: {err!r}")

    async def handle(self, req: Forwarded) -> Reply:
        t0, entered = time.perf_counter(), time.time()
        try:
            model = serve.get_multiplexed_model_id()
            dp = await self._start.data_plane(model if req.action != "metrics" else None)
            if model and req.action != "metrics":  # reading metrics does not make a replica hold a model
                await self._hold(model)
            reply = await _route(dp, req)
        except Exception as e:  # noqa: BLE001 - every error is an answer, in the V2 shape
            reply = error_reply(e)
        reply.headers.update(self._ident)
        # The replica's own time (the multiplexed loader, the engine, the encode): what a client
        # measures beyond it is Ray's path (proxy, ingress, the two hops). The bench records it.
        reply.headers[REPLICA_TIME_HEADER] = f"{time.perf_counter() - t0:.6f}"
        reply.headers[REPLICA_CLOCK_HEADER] = clock_header(*self._clock, entered)
        return reply

    async def stream(self, req: Forwarded) -> AsyncGenerator[Reply | bytes, None]:
        """A generation's head, then its events (``ray_generate.answer``); Ray streams them to the
        ingress as they come, and cancels this generator when the client leaves."""
        from cicada_async.service import ray_generate

        try:
            model = serve.get_multiplexed_model_id()
            dp = await self._start.data_plane(model)
            if model:
                await self._hold(model)
        except Exception as e:  # noqa: BLE001 - an unknown or broken name is an answer
            reply = error_reply(e)
            reply = as_openai(reply) if req.action in ("completions", "chat") else reply
            reply.headers.update(self._ident)
            yield reply
            return
        async with contextlib.aclosing(ray_generate.answer(dp, req)) as items:
            async for item in items:
                if isinstance(item, Reply):
                    item.headers.update(self._ident)
                yield item

    async def __del__(self) -> None:
        """Ray's replica shutdown: drain, then tear the engine down (or stop its start)."""
        await self._start.close()


async def _route(dp: DataPlane, req: Forwarded) -> Reply:
    name, version = req.model or "", req.version
    if req.action == "infer":
        return await _infer(dp, name, version, req)
    if req.action == "metadata":
        return json_reply(dp.model_metadata(name, version))
    if req.action == "config":
        return json_reply(dp.model_config(name, version))
    if req.action == "stats":
        return json_reply({"model_stats": dp.statistics(req.model, version)})
    if req.action == "metrics":
        return Reply(200, dp.render_metrics(), {}, METRICS_TYPE)
    if req.action == "ready":
        r = dp.model_readiness(name, version)
        return json_reply({"name": r.name, "ready": True, "state": r.state}) if r.ready else json_reply({"error": r.reason}, 503)
    if req.action == "load":
        await dp.load(name)
        return json_reply({})
    if req.action == "unload":
        await dp.unload(name)
        return json_reply({})
    if req.action == "index":
        return json_reply(await dp.repository_index())
    return json_reply({"error": f"unknown action {req.action!r}"}, 404)


async def _infer(dp: DataPlane, name: str, version: str | None, req: Forwarded) -> Reply:
    """``infer.infer`` without the socket: Ray's proxy has read the body already."""
    from cicada_async.service.limits import OFFLOAD_BYTES, offload_codec
    from protocols import v2
    from protocols.errors import BadRequest

    entry = dp.admit(name, version)
    limit = dp.config.server.max_request_bytes
    if len(req.body) > limit:
        return json_reply({"error": f"request body exceeds {limit} bytes"}, 413)
    dp.check_queue(entry)
    hl_raw = req.header_length
    if hl_raw is not None and not (hl_raw.isascii() and hl_raw.isdigit()):
        raise BadRequest(f"{v2.HEADER_LENGTH} must be an integer (ASCII digits)")
    hl = int(hl_raw) if hl_raw is not None else None
    body = req.body
    req.body = b""
    dp.reserve_body(entry.name, len(body))
    try:
        with dp.accounted(entry.name) as outcome:
            t = time.monotonic_ns()
            decoded = (await offload_codec(lambda: v2.decode_request(body, hl)) if len(body) > OFFLOAD_BYTES
                       else v2.decode_request(body, hl))
            outcome.decode_ns = time.monotonic_ns() - t
            outputs = await dp.infer(entry, decoded, outcome)

            def encode() -> tuple[bytes, int | None]:
                return v2.encode_response(entry.name, outputs, request_id=decoded.id, requested=decoded.outputs,
                                          binary_default=decoded.binary_output)

            t = time.monotonic_ns()
            nbytes = sum(o.numel() * o.element_size() for o in outputs.values())
            out, out_hl = await offload_codec(encode) if nbytes > OFFLOAD_BYTES else encode()
            outcome.encode_ns = time.monotonic_ns() - t
    finally:
        dp.release_body(len(body))
    if out_hl is None:
        return Reply(200, out)
    return Reply(200, out, {v2.HEADER_LENGTH: str(out_hl)}, "application/octet-stream")


def build(args: dict[str, object]) -> Application:
    """The application builder: ``serve run cicada_async.service.ray_serve:build model_repository=DIR``.

    ``args`` arrive as strings from the CLI, typed from a Serve config YAML; both are validated
    by ``CicadaArgs``. The configuration is read once here, so a bad one fails the deploy.
    """
    a = CicadaArgs.model_validate(args)
    load_settings(a)  # fail at `serve run`, not in every replica
    autoscaling: dict[str, object] = {
        "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
        "initial_replicas": a.initial_replicas, "target_ongoing_requests": a.target_ongoing_requests,
        "downscale_delay_s": a.downscale_delay_s, "upscale_delay_s": a.upscale_delay_s, **a.autoscaling,
    }
    actor: dict[str, object] = {"num_cpus": a.num_cpus, "num_gpus": a.num_gpus, "resources": a.resources}
    if a.memory_bytes is not None:
        actor["memory"] = a.memory_bytes
    # mypy sees the classes; @serve.deployment made them Deployments.
    models = cast(Deployment, CicadaModels).options(autoscaling_config=autoscaling, ray_actor_options=actor,
                                  max_ongoing_requests=a.max_ongoing_requests).bind(a)
    ingress = cast(Deployment, CicadaIngress).options(num_replicas=a.ingress_replicas, max_ongoing_requests=1024,
                                    ray_actor_options={"num_cpus": a.ingress_num_cpus,
                                                                       "resources": a.ingress_resources})
    app: Application = ingress.bind(models, a)
    return app
