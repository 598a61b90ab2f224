"""The server's configuration: one frozen dataclass tree with safe defaults (principle 8).

`config.toml` may leave out any key; unknown keys and wrong types are refused so a
typo cannot silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import protocol
from .errors import ConfigError


@dataclass(frozen=True)
class ServerConfig:
    bind: str = "127.0.0.1"
    port: int = 5684
    loop: str = "uvloop"
    # Concurrent DTLS sessions; beyond this the least recently used established one
    # is dropped. Peers still before the cookie exchange have a pool of their own.
    max_dtls_sessions: int = 256
    dtls_idle_timeout: float = 300.0  # seconds of silence before a session is dropped
    # RFC 7252 §4.5 duplicate detection keeps each response for EXCHANGE_LIFETIME
    # (§4.8.2: 247 s); we cap the number of entries instead of trusting traffic levels.
    dedup_max_entries: int = 4096
    dedup_lifetime: float = 247.0
    max_block_szx: int = 6  # RFC 7959 §2.2: 1024-byte blocks at most
    max_observers: int = 4096
    max_observers_per_device: int = 4
    observe_poll_interval: float = 1.0
    # Audit entries for refused requests are rate-limited per (identity, kind) so a
    # hostile device cannot turn its requests into synchronous DB writes.
    refusal_audit_interval: float = 10.0


@dataclass(frozen=True)
class PublishConfig:
    # TUF §1.5.2 fast-forward: a signed seq far above the current one would lock the
    # class out of every later release; refuse jumps larger than this.
    max_sequence_jump: int = 1000
    max_image_size: int = 16 * 1024 * 1024
    max_envelope_size: int = protocol.MAX_ENVELOPE_SIZE


@dataclass(frozen=True)
class UploadConfig:
    max_concurrent: int = 8  # Block1 reassemblies in flight, all peers (RFC 7959 §7.1)
    max_per_peer: int = 2
    idle_timeout: float = 60.0  # seconds without a block before an upload is dropped
    max_duration: float = 3600.0  # seconds from block 0 to the last block, at most
    staged_ttl: float = 600.0  # an uploaded image waits this long for its envelope
    max_staged: int = 4  # uploaded images waiting for an envelope, all operators
    busy_max_age: int = 30  # Max-Age on 5.03 when the reassembly slots are full


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    uploads: UploadConfig = field(default_factory=UploadConfig)

    def __post_init__(self) -> None:
        s, p, u = self.server, self.publish, self.uploads
        if s.loop not in ("uvloop", "asyncio"):
            raise ConfigError("server.loop must be 'uvloop' or 'asyncio'")
        if not 0 <= s.port <= 65535:
            raise ConfigError("server.port must be 0..65535")
        if not 0 <= s.max_block_szx <= 6:
            raise ConfigError("server.max_block_szx must be 0..6 (RFC 7959 §2.2)")
        positive = {
            "server.max_dtls_sessions": s.max_dtls_sessions,
            "server.dtls_idle_timeout": s.dtls_idle_timeout,
            "server.dedup_max_entries": s.dedup_max_entries,
            "server.dedup_lifetime": s.dedup_lifetime,
            "server.max_observers": s.max_observers,
            "server.max_observers_per_device": s.max_observers_per_device,
            "server.observe_poll_interval": s.observe_poll_interval,
            "publish.max_sequence_jump": p.max_sequence_jump,
            "publish.max_image_size": p.max_image_size,
            "publish.max_envelope_size": p.max_envelope_size,
            "uploads.max_concurrent": u.max_concurrent,
            "uploads.max_per_peer": u.max_per_peer,
            "uploads.idle_timeout": u.idle_timeout,
            "uploads.max_duration": u.max_duration,
            "uploads.staged_ttl": u.staged_ttl,
            "uploads.max_staged": u.max_staged,
            "uploads.busy_max_age": u.busy_max_age,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be positive")
        if p.max_envelope_size > protocol.MAX_ENVELOPE_SIZE:
            raise ConfigError(
                f"publish.max_envelope_size may not exceed {protocol.MAX_ENVELOPE_SIZE} "
                "(devices refuse larger envelopes)"
            )


DEFAULT_TOML = """\
# otacoap server configuration (TOML). Every key is optional; the values shown are
# the defaults. Command-line options of `otacoap serve` override [server].

[server]
bind = "127.0.0.1"           # one address: aiocoap's DTLS server cannot bind 0.0.0.0/::
port = 5684                  # the DTLS (coaps) port devices connect to
loop = "uvloop"              # or "asyncio"
max_dtls_sessions = 256      # beyond this the least recently used session is dropped
dtls_idle_timeout = 300.0    # seconds of silence before a DTLS session is dropped
dedup_max_entries = 4096     # RFC 7252 §4.5 duplicate-detection cache (entries)
dedup_lifetime = 247.0       # seconds, RFC 7252 §4.8.2 EXCHANGE_LIFETIME
max_block_szx = 6            # largest Block2 size served: 16 << 6 = 1024 bytes
max_observers = 4096         # RFC 7641 observations of /m, all devices
max_observers_per_device = 4
observe_poll_interval = 1.0  # seconds; notices releases published by other processes
refusal_audit_interval = 10.0

[publish]
max_sequence_jump = 1000     # refuse a seq more than this above the current release
max_image_size = 16777216    # bytes
max_envelope_size = 65536    # bytes

[uploads]
max_concurrent = 8           # Block1 reassemblies in flight (RFC 7959 §7.1)
max_per_peer = 2
idle_timeout = 60.0          # seconds without a block before an upload is dropped
max_duration = 3600.0        # seconds an upload may take from first to last block
staged_ttl = 600.0           # seconds an uploaded image waits for its envelope
max_staged = 4
busy_max_age = 30            # Max-Age of the 5.03 sent when all slots are busy
"""


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
        values[key] = float(value) if isinstance(default, float) else value
    return cls(**values)


def parse_config(text: str) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config.toml: {exc}") from None
    sections = {"server": ServerConfig, "publish": PublishConfig, "uploads": UploadConfig}
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
