"""Dynamic batching over the REAL engine and tiny models, through tritonclient.http.

Batched answers are compared with a plain PyTorch forward of each request alone: exactly
(``assert_array_equal``) where the model is batch-invariant on this CPU (tiny-mlp, tiny-gpt2,
tiny-bert's ``last_hidden_state``), to float tolerance where it is not (tiny-bert's
``pooler_output``: a [batch, 64] x [64, 64] matmul whose BLAS kernel changes with the batch
size; padded sequences), as docs/service.md states.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cicada_async.service.config import ModelConfig, model_config
from cicada_async.service.metrics import parse_text
from protocols.errors import ConfigError
from tests.fixtures.server import LiveServer, live_server, real_config, with_model
from tests.fixtures.triton import TRITON_WARNINGS, get_text
from tests.service.test_server_models import ids, ids_input, ref_outputs, reference, zoo  # noqa: F401

pytestmark = TRITON_WARNINGS
httpclient = pytest.importorskip("tritonclient.http")
aioclient = pytest.importorskip("tritonclient.http.aio")

NAMES = ("tiny-mlp", "tiny-gpt2", "tiny-bert")


def serve(zoo: dict[str, Path], **batching: Any) -> Any:  # noqa: F811
    cfg = real_config(zoo, NAMES)
    for n in NAMES:
        with_model(cfg, n, **{"max_batch_size": 32, **batching})
    return live_server(cfg)


def metrics(server: LiveServer, model: str) -> dict[str, float]:
    m = parse_text(server.call(lambda: get_text(server, "/metrics")))
    lab = f'{{model="{model}",version="1"}}'
    return {"exec": m.get(f"nv_inference_exec_count{lab}", 0), "requests": m.get(f"nv_inference_request_success{lab}", 0),
            "cold_batch": m.get(f'cicada_cold_start_batch_size{{model="{model}"}}', 0),
            "hist_count": m.get(f"cicada_batch_size_count{lab}", 0)}


def send(server: LiveServer, model: str, x: np.ndarray, priority: int = 0) -> Any:
    c = httpclient.InferenceServerClient(server.url)
    try:
        return c.infer(model, [ids_input(x)], priority=priority)
    finally:
        c.close()


def held_batch(server: LiveServer, model: str, xs: list[np.ndarray]) -> list[Any]:
    """Queue every request while dispatch is held, then release: they meet in the heap."""
    with concurrent.futures.ThreadPoolExecutor(len(xs)) as pool:
        server.sync(server.scheduler.hold)
        futs = [pool.submit(send, server, model, x) for x in xs]
        server.wait_until(lambda: server.scheduler.queued(model) == len(xs))
        server.sync(server.scheduler.release)
        return [f.result(60) for f in futs]


@pytest.fixture
def server(zoo: dict[str, Path]) -> Iterator[LiveServer]:  # noqa: F811
    with serve(zoo) as s:
        for n in NAMES:
            s.call(lambda n=n: s.repo.load(n))
        yield s


@pytest.mark.parametrize("name", ["tiny-mlp", "tiny-gpt2"])
def test_batched_answers_equal_unbatched_exactly(server: LiveServer, reference: dict[str, Any], name: str) -> None:  # noqa: F811
    xs = [ids(i, seq=16) for i in range(8)]
    before = metrics(server, name)
    results = held_batch(server, name, xs)
    after = metrics(server, name)
    assert after["requests"] - before["requests"] == 8
    assert after["exec"] - before["exec"] == 1  # one forward answered all eight
    for x, res in zip(xs, results):
        for key, want in ref_outputs(reference[name], {"input_ids": torch.from_numpy(x)}).items():
            np.testing.assert_array_equal(res.as_numpy(key), want, err_msg=key)


def test_bert_batched_last_hidden_state_exact_pooler_close(server: LiveServer, reference: dict[str, Any]) -> None:  # noqa: F811
    xs = [ids(i, seq=16) for i in range(4)]
    results = held_batch(server, "tiny-bert", xs)
    for x, res in zip(xs, results):
        want = ref_outputs(reference["tiny-bert"], {"input_ids": torch.from_numpy(x)})
        np.testing.assert_array_equal(res.as_numpy("last_hidden_state"), want["last_hidden_state"])
        np.testing.assert_allclose(res.as_numpy("pooler_output"), want["pooler_output"], rtol=0, atol=1e-5)


def test_padding_only_where_the_model_allows_it(server: LiveServer, reference: dict[str, Any]) -> None:  # noqa: F811
    # tiny-bert takes attention_mask and has pad_token_id 0: lengths 8 and 12 share one forward.
    server.wait_until(lambda: server.repo.get("tiny-bert").instance.pad_token_id == 0)
    xs = [ids(1, seq=8), ids(2, seq=12), ids(3, seq=8)]
    before = metrics(server, "tiny-bert")
    results = held_batch(server, "tiny-bert", xs)
    assert metrics(server, "tiny-bert")["exec"] - before["exec"] == 1
    for x, res in zip(xs, results):
        want = ref_outputs(reference["tiny-bert"], {"input_ids": torch.from_numpy(x)})
        assert res.as_numpy("last_hidden_state").shape == want["last_hidden_state"].shape  # padding cut off
        for key in want:
            np.testing.assert_allclose(res.as_numpy(key), want[key], rtol=0, atol=1e-5, err_msg=key)
    # tiny-gpt2 has no pad token: two lengths are two batches, each exact.
    assert server.repo.get("tiny-gpt2").instance.pad_token_id is None
    xs = [ids(1, seq=8), ids(2, seq=12), ids(3, seq=8), ids(4, seq=12)]
    before = metrics(server, "tiny-gpt2")
    results = held_batch(server, "tiny-gpt2", xs)
    assert metrics(server, "tiny-gpt2")["exec"] - before["exec"] == 2
    for x, res in zip(xs, results):
        want = ref_outputs(reference["tiny-gpt2"], {"input_ids": torch.from_numpy(x)})["logits"]
        np.testing.assert_array_equal(res.as_numpy("logits"), want)


def test_concurrent_clients_form_batches(zoo: dict[str, Path], reference: dict[str, Any]) -> None:  # noqa: F811
    with serve(zoo, max_batch_size=8, max_queue_delay_us=2000) as server:
        server.call(lambda: server.repo.load("tiny-mlp"))

        def client(k: int) -> list[tuple[np.ndarray, np.ndarray]]:
            c = httpclient.InferenceServerClient(server.url)
            try:
                return [(x, c.infer("tiny-mlp", [ids_input(x)]).as_numpy("output"))
                        for x in (ids(100 * k + j, seq=16) for j in range(10))]
            finally:
                c.close()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = [a for f in [pool.submit(client, k) for k in range(8)] for a in f.result(120)]
        m = metrics(server, "tiny-mlp")
        assert m["requests"] == 80 and m["exec"] < m["requests"] and m["hist_count"] == m["exec"]
        for x, got in answers:
            np.testing.assert_array_equal(got, ref_outputs(reference["tiny-mlp"], {"input_ids": torch.from_numpy(x)})["output"])
        stats = httpclient.InferenceServerClient(server.url).get_inference_statistics("tiny-mlp")["model_stats"][0]
        assert int(stats["inference_count"]) == 80 and int(stats["execution_count"]) == m["exec"]
        assert sum(int(b["batch_size"]) * int(b["compute_infer"]["count"]) for b in stats["batch_stats"]) == 80
        config = httpclient.InferenceServerClient(server.url).get_model_config("tiny-mlp")
        assert config["max_batch_size"] == 8 and config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000


def test_priority_1_is_not_delayed_to_fill_a_batch(zoo: dict[str, Path]) -> None:  # noqa: F811
    delay_s = 2.0
    with serve(zoo, max_batch_size=8, max_queue_delay_us=int(delay_s * 1e6)) as server, \
            concurrent.futures.ThreadPoolExecutor(4) as pool:
        server.call(lambda: server.repo.load("tiny-mlp"))
        t0 = time.monotonic()
        alone = pool.submit(send, server, "tiny-mlp", ids(1, seq=16), 10)
        server.wait_until(lambda: server.scheduler.queued("tiny-mlp") == 1)
        low = pool.submit(send, server, "tiny-mlp", ids(2, seq=16), 10)
        server.wait_until(lambda: server.scheduler.queued("tiny-mlp") == 2)
        time.sleep(0.1)
        assert not alone.done() and not low.done()  # the priority-10 batch is waiting to fill
        t1 = time.monotonic()
        urgent = send(server, "tiny-mlp", ids(3, seq=12), 1)  # another length: its own batch
        assert time.monotonic() - t1 < delay_s / 4
        assert urgent.as_numpy("output").shape[1] == 12
        alone.result(30), low.result(30)
        # The priority-10 requests did wait out (most of) their delay: the delay is real.
        assert time.monotonic() - t0 >= delay_s * 0.9
        t2 = time.monotonic()
        lows = [pool.submit(send, server, "tiny-mlp", ids(4 + i, seq=16), 10) for i in range(2)]
        server.wait_until(lambda: server.scheduler.queued("tiny-mlp") == 2)
        urgent = send(server, "tiny-mlp", ids(9, seq=16), 1)  # compatible: leads the batch at once
        assert time.monotonic() - t2 < delay_s / 2
        for f in lows:
            f.result(30)
        assert time.monotonic() - t2 < delay_s / 2  # taken along by the urgent one, not delayed


def test_cold_burst_of_32_rides_the_first_forward(zoo: dict[str, Path], reference: dict[str, Any]) -> None:  # noqa: F811
    xs = [ids(i, seq=16) for i in range(32)]
    with serve(zoo) as server:
        async def burst() -> list[np.ndarray]:
            async with aioclient.InferenceServerClient(server.url, conn_limit=64) as c:
                async def one(x: np.ndarray) -> np.ndarray:
                    inp = aioclient.InferInput("input_ids", list(x.shape), "INT64")
                    inp.set_data_from_numpy(x)
                    return (await c.infer("tiny-gpt2", [inp])).as_numpy("logits")
                return await asyncio.gather(*(one(x) for x in xs))

        outs = asyncio.run(burst())
        m = metrics(server, "tiny-gpt2")
        assert server.repo.get("tiny-gpt2").instance.cold_starts == 1
        assert m["requests"] == 32 and m["exec"] <= 4, m
        assert m["cold_batch"] > 1, m  # the cold start's own, pipelined forward carried several
        for x, got in zip(xs, outs):
            np.testing.assert_array_equal(got, ref_outputs(reference["tiny-gpt2"], {"input_ids": torch.from_numpy(x)})["logits"])


def test_requests_queued_before_a_cold_start_are_its_batch(zoo: dict[str, Path], reference: dict[str, Any]) -> None:  # noqa: F811
    xs = [ids(i, seq=16) for i in range(12)]
    with serve(zoo, max_batch_size=8) as server:
        results = held_batch(server, "tiny-mlp", xs)  # the model is unloaded when they are released
        m = metrics(server, "tiny-mlp")
        assert m["cold_batch"] == 8 and m["exec"] == 2, m  # 8 ride the cold forward, 4 the next one
        for x, res in zip(xs, results):
            np.testing.assert_array_equal(res.as_numpy("output"),
                                          ref_outputs(reference["tiny-mlp"], {"input_ids": torch.from_numpy(x)})["output"])
        too_big = httpclient.InferenceServerClient(server.url)
        with pytest.raises(Exception, match="max_batch_size"):
            too_big.infer("tiny-mlp", [ids_input(ids(0, batch=9, seq=4))])


def test_batching_config_is_checked() -> None:
    cfg = model_config("m", {"uri": "/x", "max_batch_size": 8, "preferred_batch_sizes": [4, 8], "max_queue_delay_us": 100})
    assert (cfg.max_batch_size, cfg.preferred_batch_sizes, cfg.max_queue_delay_us) == (8, [4, 8], 100)
    assert ModelConfig(name="m", uri="/x").max_batch_size == 0  # off by default
    for bad in ({"preferred_batch_sizes": [16], "max_batch_size": 8}, {"max_batch_size": -1},
                {"preferred_batch_sizes": [0], "max_batch_size": 8}, {"max_queue_delay_us": 1.5}):
        with pytest.raises(ConfigError):
            model_config("m", {"uri": "/x", **bad})


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cicada_async.models.catalogue import make_model

    return make_model("tiny-bert-qa", tmp_path_factory.mktemp("qa") / "tiny-bert-qa")


def test_padded_question_answering_batch_returns_each_its_own_length(qa_dir: Path) -> None:
    # C-5: start_logits / end_logits are [batch, seq]; the padded columns must not come back.
    from tests.fixtures.helpers import reference as plain

    cfg = with_model(real_config({"qa": qa_dir}, ("qa",)), "qa", max_batch_size=8)
    with live_server(cfg) as server:
        server.call(lambda: server.repo.load("qa"))
        server.wait_until(lambda: server.repo.get("qa").instance.pad_token_id == 0)
        xs = [ids(5, seq=5), ids(12, seq=12)]
        before = metrics(server, "qa")
        results = held_batch(server, "qa", xs)
        assert metrics(server, "qa")["exec"] - before["exec"] == 1  # one padded forward for both
        for x, res in zip(xs, results):
            want = plain(qa_dir, {"input_ids": torch.from_numpy(x)})  # this request alone
            for key in ("start_logits", "end_logits"):
                got = res.as_numpy(key)
                assert got.shape == (1, x.shape[1]), (key, got.shape)
                # Float tolerance, not bit equality: the padded row's attention and matmuls run
                # at another shape (docs/service.md, "Dynamic batching"); the answer is the same.
                np.testing.assert_allclose(got, want[key].numpy(), rtol=0, atol=1e-6, err_msg=key)
                assert got.argmax() == want[key].numpy().argmax()


def test_a_policy_made_before_describe_pads_once_the_model_is_described(qa_dir: Path) -> None:
    # The cold start's policy is made when its first request arrives, often before the engine's
    # background describe has read pad_token_id; the requests that join the cold forward must
    # still pad by it, not run one forward each.
    from cicada_async.engine.runtime import Engine
    from cicada_async.service import batcher
    from protocols.serving import ModelOptions

    async def go() -> None:
        async with Engine() as engine:
            inst = engine.instance("qa", str(qa_dir), ModelOptions(), describe=False)
            policy = batcher.policy_for(model_config("qa", {"uri": str(qa_dir), "max_batch_size": 8}), inst)
            assert policy is not None and policy.pad_token_id is None
            short, long = {"input_ids": torch.zeros(1, 5, dtype=torch.int64)}, {"input_ids": torch.zeros(1, 12, dtype=torch.int64)}
            assert batcher.key(short, policy) != batcher.key(long, policy)
            await inst.describe()
            assert policy.pad_token_id == 0
            assert batcher.key(short, policy) == batcher.key(long, policy)

    asyncio.run(asyncio.wait_for(go(), 60))


def test_a_large_warm_batch_is_built_off_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # C-10: four 3 MiB image batches joined into one 12 MiB input: no torch.cat of that size
    # on the event loop's thread (torch's own function watched, not ours).
    import dataclasses
    import threading

    from cicada_async.engine.runtime import Engine
    from cicada_async.models.catalogue import make_model
    from cicada_async.service import batcher
    from protocols.serving import ModelOptions, Priority
    from tests.fixtures.helpers import reference as plain

    d = make_model("tiny-convnet", tmp_path / "convnet")

    @dataclasses.dataclass
    class Request:
        inputs: dict[str, torch.Tensor]
        enqueued: float = 0.0
        priority: Priority = Priority(10)

    requests = [Request({"x": torch.randn(1024, 3, 16, 16, generator=torch.Generator().manual_seed(i))}) for i in range(4)]
    cat, big_on_loop = torch.cat, []

    def watched(tensors: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if threading.current_thread() is threading.main_thread() and sum(t.nbytes for t in tensors) > 1 << 20:
            big_on_loop.append(sum(t.nbytes for t in tensors))
        return cat(tensors, *args, **kwargs)

    async def go() -> list[Any]:
        async with Engine() as engine:
            inst = engine.instance("convnet", str(d), ModelOptions())
            await inst.load()
            policy = batcher.policy_for(model_config("convnet", {"uri": str(d), "max_batch_size": 4096}), inst)
            monkeypatch.setattr(torch, "cat", watched)
            sizes: list[int] = []
            out = await batcher.run(inst, requests, policy, join=None, ready=lambda: True,
                                    on_batch=lambda n, ns: sizes.append(n))
            monkeypatch.setattr(torch, "cat", cat)
            assert sizes == [4]  # one forward for the four
            return out

    results = asyncio.run(asyncio.wait_for(go(), 120))
    assert big_on_loop == []
    for r, res in zip(requests, results):
        assert isinstance(res, dict)
        np.testing.assert_allclose(res["output"].numpy(), plain(d, r.inputs)["output"].numpy(), rtol=0, atol=1e-6)
