"""The server's configuration: one frozen dataclass tree with safe defaults (principle 8).

`config.toml` may leave out any key; unknown keys and wrong types are refused so a
typo cannot silently fall back to a default. The defaults file `otacoap init` writes
is generated from the fields below and their `help` texts (`default_toml`), so a
default is written down once.

Layer (DESIGN.md): imports only core; the store (the data directory holds
config.toml), the server and the CLI read it.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core import protocol
from .core.coap_numbers import INTERNAL_SERVER_ERROR
from .core.errors import OtaError

# The event loops `server.loop` may name; otacoap.eventloop runs them.
EVENT_LOOPS = ("uvloop", "asyncio")


class ConfigError(OtaError):
    """config.toml does not parse or holds a key/value we do not accept."""

    coap_code = INTERNAL_SERVER_ERROR


def _option(default: Any, help: str, *, positive: bool = True) -> Any:
    """A config key: its default, the one-line help the defaults file shows, and
    whether a value must be above zero (every count, size and duration unless said)."""
    return field(default=default, metadata={"help": help, "positive": positive})


@dataclass(frozen=True)
class ServerConfig:
    """[server]: the listener. `otacoap serve`'s options override these."""

    bind: str = _option(
        "127.0.0.1", "one address: aiocoap's DTLS server cannot bind 0.0.0.0/::", positive=False
    )
    port: int = _option(
        5684, "the DTLS (coaps) port devices connect to (0: pick a free one)", positive=False
    )
    loop: str = _option("uvloop", 'or "asyncio"', positive=False)
    # Peers still before the cookie exchange have a pool of their own.
    max_dtls_sessions: int = _option(256, "beyond this the least recently used session is dropped")
    dtls_idle_timeout: float = _option(300.0, "seconds of silence before a DTLS session is dropped")
    # Peers past the cookie exchange whose PSK handshake has not completed: they only
    # displace each other, never an authenticated session (issue 10 §2).
    max_dtls_handshakes: int = _option(
        256, "DTLS handshakes in progress; beyond this the longest silent one is dropped"
    )
    # RFC 7252 §4.5 duplicate detection keeps each response for EXCHANGE_LIFETIME
    # (§4.8.2: 247 s); we cap the number of entries instead of trusting traffic levels.
    dedup_max_entries: int = _option(4096, "RFC 7252 §4.5 duplicate-detection cache (entries)")
    dedup_lifetime: float = _option(247.0, "seconds, RFC 7252 §4.8.2 EXCHANGE_LIFETIME")
    max_block_szx: int = _option(
        6, "largest Block2 size served: 16 << 6 = 1024 bytes", positive=False
    )
    max_observers: int = _option(4096, "RFC 7641 observations of /m, all devices")
    max_observers_per_device: int = _option(4, "RFC 7641 observations of /m, per device")
    observe_poll_interval: float = _option(
        1.0, "seconds; notices releases published by other processes"
    )
    # Rate-limited per (identity, kind) so a hostile device cannot turn its requests
    # into synchronous DB writes.
    refusal_audit_interval: float = _option(
        10.0,
        "seconds between audits of refused requests, per identity and kind",
        positive=False,
    )


@dataclass(frozen=True)
class PublishConfig:
    """[publish]: what a release must satisfy besides its signature."""

    # TUF §1.5.2 fast-forward: a signed seq far above the current one would lock the
    # class out of every later release.
    max_sequence_jump: int = _option(1000, "refuse a seq more than this above the current release")
    max_image_size: int = _option(16 * 1024 * 1024, "bytes")
    max_envelope_size: int = _option(protocol.MAX_ENVELOPE_SIZE, "bytes")


@dataclass(frozen=True)
class UploadConfig:
    """[uploads]: operator Block1 uploads to /admin (RFC 7959 §2.3)."""

    max_concurrent: int = _option(8, "Block1 reassemblies in flight (RFC 7959 §7.1)")
    max_per_peer: int = _option(2, "Block1 reassemblies in flight, per peer")
    idle_timeout: float = _option(60.0, "seconds without a block before an upload is dropped")
    max_duration: float = _option(3600.0, "seconds an upload may take from first to last block")
    staged_ttl: float = _option(600.0, "seconds an uploaded image waits for its envelope")
    max_staged: int = _option(4, "uploaded images waiting for an envelope, all operators")
    busy_max_age: int = _option(30, "Max-Age of the 5.03 sent when all slots are busy")


LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class MonitoringConfig:
    """[monitoring]: what the operator's monitoring sees. `serve --metrics` and
    `--log-format` override these."""

    metrics_bind: str = _option(
        "",
        "HOST:PORT of the HTTP /metrics (Prometheus) and /health endpoint, e.g. "
        '"127.0.0.1:9464"; empty: off',
        positive=False,
    )
    log_format: str = _option(
        "text", '"text", or "json" (one JSON object per line, for log shippers)', positive=False
    )


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    uploads: UploadConfig = field(default_factory=UploadConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)

    def __post_init__(self) -> None:
        s, p = self.server, self.publish
        # Ranges first, then "positive" (the order the refusals have always come in).
        if s.loop not in EVENT_LOOPS:
            raise ConfigError("server.loop must be 'uvloop' or 'asyncio'")
        if not 0 <= s.port <= 65535:
            raise ConfigError("server.port must be 0..65535")
        if self.monitoring.log_format not in LOG_FORMATS:
            raise ConfigError("monitoring.log_format must be 'text' or 'json'")
        if self.monitoring.metrics_bind:
            split_host_port(self.monitoring.metrics_bind, "monitoring.metrics_bind")
        if not 0 <= s.max_block_szx <= 6:
            raise ConfigError("server.max_block_szx must be 0..6 (RFC 7959 §2.2)")
        for section, cls in _sections().items():
            for f in dataclasses.fields(cls):
                if f.metadata["positive"] and getattr(getattr(self, section), f.name) <= 0:
                    raise ConfigError(f"{section}.{f.name} must be positive")
        if p.max_envelope_size > protocol.MAX_ENVELOPE_SIZE:
            raise ConfigError(
                f"publish.max_envelope_size may not exceed {protocol.MAX_ENVELOPE_SIZE} "
                "(devices refuse larger envelopes)"
            )


def split_host_port(text: str, what: str) -> tuple[str, int]:
    """ "HOST:PORT" or "[V6]:PORT" (port 0: any free one), or ConfigError naming `what`."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} must be HOST:PORT (e.g. 127.0.0.1:9464), not {text!r}")
    return host, int(port)


def _sections() -> dict[str, type[Any]]:
    """config.toml's tables, in file order: Config's fields and their dataclasses."""
    sections: dict[str, type[Any]] = {}
    for f in dataclasses.fields(Config):
        factory = f.default_factory
        assert isinstance(factory, type)
        sections[f.name] = factory
    return sections


_HEADER = """\
# otacoap server configuration (TOML). Every key is optional; the values shown are
# the defaults. Command-line options of `otacoap serve` override [server].
"""
_COMMENT_COLUMN = 29


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    return repr(value)


def default_toml() -> str:
    """The defaults file: every key of every section, its default and its help."""
    lines = [_HEADER]
    for name, cls in _sections().items():
        lines.append(f"[{name}]")
        for f in dataclasses.fields(cls):
            setting = f"{f.name} = {_toml_value(f.default)}"
            lines.append(f"{setting.ljust(_COMMENT_COLUMN - 1)} # {f.metadata['help']}")
        lines.append("")
    return "\n".join(lines)


def _section(cls: type[Any], data: Any, name: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{name}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        f = fields.get(key)
        if f is None:
            raise ConfigError(f"unknown key {name}.{key} in config.toml")
        default = f.default
        expected: tuple[type, ...]
        if isinstance(default, bool):
            expected = (bool,)
        elif isinstance(default, float):
            expected = (int, float)
        else:
            expected = (type(default),)
        if isinstance(value, bool) and bool not in expected:
            raise ConfigError(f"{name}.{key} must be a {type(default).__name__}")
        if not isinstance(value, expected):
            raise ConfigError(f"{name}.{key} must be a {type(default).__name__}")
        if isinstance(default, float) and isinstance(value, int):
            value = float(value)  # TOML writes 10 for 10.0
        values[key] = value
    return cls(**values)


def parse_config(text: str) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config.toml: {exc}") from None
    sections = _sections()
    unknown = set(data) - set(sections)
    if unknown:
        raise ConfigError(f"unknown section [{sorted(unknown)[0]}] in config.toml")
    parts = {name: _section(cls, data.get(name, {}), name) for name, cls in sections.items()}
    return Config(**parts)


def load_config(path: Path) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8") from None
    return parse_config(text)
