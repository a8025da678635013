"""TOML config parsing and the `cicada serve` argument handling."""

from __future__ import annotations

from pathlib import Path

import pytest

from cicada_async.service.config import load_config, parse_config
from cicada_async.service.server import config_from_args, main, parse_args
from protocols.errors import ConfigError

GOOD = """
[server]
port = 9000
memory_budget_bytes = 1_000_000
max_queue_total = 64

[storage.s3]
endpoint_url = "http://127.0.0.1:9000"

[models.gpt2]
uri = "s3://bucket/gpt2"
dtype = "bfloat16"
keep_alive_s = 60
max_queue = 8
default_priority = 5
inputs = [{name = "input_ids", datatype = "INT64", shape = [-1, -1]}]
"""


def test_good_config(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(GOOD)
    cfg = load_config(p)
    assert cfg.server.port == 9000 and cfg.server.memory_budget_bytes == 1_000_000
    assert cfg.storage == {"s3": {"endpoint_url": "http://127.0.0.1:9000"}}
    m = cfg.models["gpt2"]
    assert (m.dtype, m.keep_alive_s, m.max_queue, m.default_priority) == ("bfloat16", 60.0, 8, 5)
    assert m.inputs and m.inputs[0].as_dict() == {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}


@pytest.mark.parametrize("doc, needle", [
    ({"server": {"prot": 1}}, "unknown key(s) prot"),
    ({"server": {"port": "80"}}, "expected int"),
    ({"server": {"port": 70000}}, "<= 65535"),
    ({"server": {"grpc_port": 70000}}, "[server] grpc_port: must be <= 65535"),
    ({"server": {"grpc_port": True}}, "expected int"),
    ({"models": {"../x": {"uri": "/tmp"}}}, "must match"),
    ({"models": {"m": {}}}, "missing 'uri'"),
    ({"models": {"m": {"uri": "/x", "dtype": "int8"}}}, "must be one of"),
    ({"models": {"m": {"uri": "/x", "inputs": [{"name": "a", "datatype": "NOPE", "shape": [1]}]}}}, "unknown datatype"),
    ({"models": {"m": {"uri": "/x", "max_queue": 0}}}, ">= 1"),
    ({"storage": {"ftp": {}}}, "unknown backend"),
    ({"extra": {}}, "unknown top-level"),
])
def test_config_errors(doc: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as e:
        parse_config(doc)
    assert needle in str(e.value)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[server\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_model_repository_args_and_port_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("good-model", ".hidden", "no_config"):
        (tmp_path / name).mkdir()
    (tmp_path / "good-model" / "config.json").write_text("{}")
    (tmp_path / ".hidden" / "config.json").write_text("{}")
    monkeypatch.setenv("PORT", "8123")
    cfg = config_from_args(parse_args(["--model-repository", str(tmp_path), "--keep-alive-s", "5"]))
    assert list(cfg.models) == ["good-model"] and cfg.server.port == 8123
    assert cfg.models["good-model"].keep_alive_s == 5.0
    cfg = config_from_args(parse_args(["--model-repository", str(tmp_path), "--port", "0"]))
    assert cfg.server.port == 0 and cfg.server.grpc_port is None  # gRPC is off unless asked for
    cfg = config_from_args(parse_args(["--model-repository", str(tmp_path), "--grpc-port", "8001"]))
    assert cfg.server.grpc_port == 8001


def test_main_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model-repository", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_boolean_server_switches_parse_and_refuse_other_types() -> None:
    from cicada_async.service.config import parse_config
    from protocols.errors import ConfigError

    cfg = parse_config({"server": {"prefetch": True, "serialize_loads": True}})
    assert cfg.server.prefetch is True and cfg.server.serialize_loads is True
    with pytest.raises(ConfigError, match="prefetch"):
        parse_config({"server": {"prefetch": 0}})
