"""Unauthenticated gRPC floods against a live ``cicada serve`` process: every call is refused
UNAUTHENTICATED, and the server's real peak memory (VmHWM in /proc) stays far below the bytes
the clients sent, because a refused call's message is never read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from cicada_async.models.catalogue import make_model
from loadtest.soak import ServerProcess, free_port

MiB = 1 << 20
CALLS, SIZE = 40, 8 * MiB


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{key} not in /proc/{pid}/status")


def _message(size: int) -> bytes:
    """A ModelInferRequest for model ``mlp`` padded with an unknown bytes field (number 15):
    well formed, and as large as an 8 MiB tensor, without importing generated protobuf code
    into the pytest process (tests/service/grpc_probe.py says why)."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    return b"\x0a\x03mlp" + bytes([15 << 3 | 2]) + varint(size) + b"\x01" * size


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, int]]:
    root = tmp_path_factory.mktemp("grpc-flood")
    mlp = make_model("tiny-mlp", root / "tiny-mlp", seed=1)
    grpc_port = free_port()
    cfg = f"""
[server]
grpc_port = {grpc_port}
max_request_bytes = {16 * MiB}
[server.auth]
inference_tokens = ["inf-token"]
admin_tokens = ["adm-token"]
[models.mlp]
uri = "{mlp}"
"""
    (root / "work").mkdir()
    proc = ServerProcess(cfg, root / "work").start()
    # The same flood with tiny messages first: what CALLS connections cost the server by
    # themselves (grpc's threads, arenas, per-connection buffers) is not the messages' cost.
    asyncio.run(_flood(grpc_port, (), size=16))
    try:
        yield proc, grpc_port
    finally:
        proc.stop()


async def _flood(port: int, metadata: tuple[tuple[str, str], ...], size: int = SIZE) -> list[grpc.StatusCode]:
    body = _message(size)
    options = [("grpc.max_send_message_length", -1)]
    # A channel per call: separate connections, as a flood of clients would open.
    channels = [aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(CALLS)]

    async def one(ch: aio.Channel) -> grpc.StatusCode:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        try:
            await call(body, metadata=metadata, timeout=60)
        except aio.AioRpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    try:
        return list(await asyncio.gather(*(one(ch) for ch in channels)))
    finally:
        for ch in channels:
            await ch.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("metadata,code", [
    ((), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Bearer adm-token"),), grpc.StatusCode.PERMISSION_DENIED),
])
def test_refused_flood_is_not_buffered(server: tuple[ServerProcess, int],
                                       metadata: tuple[tuple[str, str], ...], code: grpc.StatusCode) -> None:
    proc, port = server
    assert proc.proc is not None
    pid = proc.proc.pid
    # Reset the peak to the current RSS (proc(5), clear_refs "5"), so that VmHWM is this flood's.
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = _status_kib(pid, "VmRSS")
    codes = asyncio.run(_flood(port, metadata))
    assert codes == [code] * CALLS
    # VmHWM: the process's peak resident set since the reset, whatever it freed since. 40 x 8 MiB = 320 MiB
    # were sent; buffering them (before the fix) raised the peak by 80-400 MiB.
    grown_mib = (_status_kib(pid, "VmHWM") - before) / 1024
    assert grown_mib < 48, f"peak RSS grew {grown_mib:.0f} MiB while {CALLS * SIZE // MiB} MiB were refused"


@pytest.mark.timeout(120)
def test_authorized_large_message_is_still_read(server: tuple[ServerProcess, int]) -> None:
    # The same 8 MiB messages with a valid token reach the handler whole (no bandwidth-delay
    # probing must not stall a large message): it parses them and refuses the missing inputs.
    _, port = server
    codes = asyncio.run(_flood(port, (("authorization", "Bearer inf-token"),)))
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * CALLS
