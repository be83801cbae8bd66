"""Every serve setting is checked at startup, on the library path (ServeConfig.check) and the command
line (one line `error: ...`, exit 2, before any model is loaded)."""

from __future__ import annotations

import resource

import pytest

from minigpt4 import cli
from minigpt4.serve.config import ServeConfig
from minigpt4.serve.transport import ensure_file_limit


@pytest.mark.parametrize("change, message", [
    ({"batch_wait_ms": float("nan")}, "serve.batch_wait_ms must be a finite number between 0 and 60000, got nan"),
    ({"batch_wait_ms": float("inf")}, "serve.batch_wait_ms must be a finite number between 0 and 60000, got inf"),
    ({"batch_wait_ms": -1.0}, "serve.batch_wait_ms must be a finite number between 0 and 60000, got -1.0"),
    ({"port": 99999}, "serve.port must be an integer between 1 and 65535, got 99999"),
    ({"port": 0}, "serve.port must be an integer between 1 and 65535, got 0"),
    ({"request_head_timeout_s": -5.0}, "serve.request_head_timeout_s must be a finite number between 0.1 and 3600"),
    ({"request_body_timeout_s": float("nan")}, "serve.request_body_timeout_s must be a finite number between 0.1 and"),
    ({"keep_alive_timeout_s": 0.0}, "serve.keep_alive_timeout_s must be a finite number between 0.1 and 3600, got 0.0"),
    ({"remote_image_timeout_s": float("inf")}, "serve.remote_image_timeout_s must be a finite number"),
    ({"max_connections": 0}, "serve.max_connections must be an integer between 1 and 1000000, got 0"),
    ({"max_header_bytes": 10}, "serve.max_header_bytes must be an integer between 1024 and"),
    ({"max_generation_seconds": 0.0}, "serve.max_generation_seconds must be a finite number > 0, got 0.0"),
    ({"max_queue": -3}, "serve.max_queue must be an integer of at least 1, got -3"),
    ({"max_images": -1}, "serve.max_images must be an integer of at least 0, got -1"),
    ({"port": "8000"}, "serve.port must be of type int, got '8000'"),
    ({"max_n": True}, "serve.max_n must be of type int, got True"),
    ({"allow_remote_images": 1}, "serve.allow_remote_images must be of type bool"),
    ({"cors_origins": "http://a.example"}, "serve.cors_origins must be of type tuple[str, ...]"),
    ({"cors_origins": ("http://a.example/",)}, "'http://a.example/' is not an origin"),
    ({"cors_origins": ("*",)}, "'*' is not an origin"),
    ({"max_connections": 10}, "serve.max_connections_per_client=64 exceeds serve.max_connections=10"),
    ({"max_buffered_body_bytes": 1000}, "serve.max_buffered_body_bytes=1000 is below serve.max_body_bytes"),
])
def test_bad_settings_are_refused_naming_the_field(change, message):
    with pytest.raises(ValueError) as err:
        ServeConfig(**change).check()
    assert message in str(err.value)


def test_defaults_and_good_origins_pass():
    ServeConfig().check()
    ServeConfig(cors_origins=("http://localhost:3000", "https://app.example.org", "http://[::1]:8080")).check()


@pytest.mark.parametrize("flags, message", [
    (["--batch-wait-ms", "nan"], "error: serve.batch_wait_ms must be a finite number between 0 and 60000, got nan"),
    (["--batch-wait-ms", "inf"], "error: serve.batch_wait_ms must be a finite number between 0 and 60000, got inf"),
    (["--port", "99999"], "error: serve.port must be an integer between 1 and 65535, got 99999"),
    (["--request-body-timeout-s", "-1"], "error: serve.request_body_timeout_s must be a finite number between 0.1"),
    (["--cors-origin", "http://ok.example", "--cors-origin", "evil.example"],
     "error: serve.cors_origins: 'evil.example' is not an origin"),
])
def test_command_line_errors_are_one_line_and_exit_2(capsys, flags, message):
    assert cli.main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_cors_origin_flag_repeats(monkeypatch):
    import argparse

    from minigpt4.commands import serve as command

    monkeypatch.delenv("MINIGPT4_API_KEY", raising=False)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--cors-origin", "http://a.example", "--cors-origin", "http://b.example:8080",
                              "--max-connections", "100", "--max-connections-per-client", "10"])
    config = command.serve_config(args)
    assert config.cors_origins == ("http://a.example", "http://b.example:8080")
    assert (config.max_connections, config.max_connections_per_client) == (100, 10)
    assert command.serve_config(parser.parse_args([])).cors_origins == ()


def test_open_files_limit_is_raised_or_refused(monkeypatch):
    calls = []
    monkeypatch.setattr(resource, "setrlimit", lambda kind, limits: calls.append(limits))
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (256, 100_000))
    ensure_file_limit(ServeConfig(max_connections=512))
    assert calls == [(512 + 256, 100_000)]
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (1024, 1024))
    with pytest.raises(ValueError, match="max_connections=2000 needs 2256 open files, but the hard limit"):
        ensure_file_limit(ServeConfig(max_connections=2000))
