"""Configuration: frozen dataclasses read from one TOML file, every key with a safe default.

Each key is declared once, on its dataclass field (``kinds.setting``: kind of value, default,
doc line, issue); from that one declaration come parsing, with a ``ConfigError`` naming the
dotted key (``routes[0].backends[1].url``) the way ``nginx -t`` names the line, the TOML that
``tunnel check`` prints and workers receive (``Config.to_toml``), and the key tables of
docs/configuration.md (``python -m tunnel.config.docs``). Only keys whose behaviour exists are
accepted: an unknown key is an error, never silently ignored.

Modules: ``units`` (durations, sizes), ``hosts`` (addresses), ``kinds`` (declaring a key),
``tables`` (walking declarations), ``server``, ``listeners``, ``routes`` (the tables),
``model`` (``Config``), ``docs``.
"""

from tunnel.config.hosts import Address, is_ip_address, join_host_port
from tunnel.config.kinds import IPNetwork
from tunnel.config.listeners import HEADER_NAME, TLS_VERSIONS, CertPair, ListenerConfig, ListenerTLS
from tunnel.config.model import Config
from tunnel.config.routes import (
    BALANCE_METHODS,
    DEFAULT_PORTS,
    UPGRADE_TOKEN,
    BackendConfig,
    BackendTLS,
    RouteConfig,
)
from tunnel.config.server import LOG_FORMATS, MAX_WORKERS, RELAY_MODES, AdminConfig, ServerConfig
from tunnel.config.units import (
    BYTES,
    DAYS,
    HOURS,
    MAX_SIZE,
    MILLISECONDS,
    MINUTES,
    SECONDS,
    GiB,
    KiB,
    MiB,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)

__all__ = [
    "BALANCE_METHODS",
    "BYTES",
    "DAYS",
    "DEFAULT_PORTS",
    "HEADER_NAME",
    "HOURS",
    "LOG_FORMATS",
    "MAX_SIZE",
    "MAX_WORKERS",
    "MILLISECONDS",
    "MINUTES",
    "RELAY_MODES",
    "SECONDS",
    "TLS_VERSIONS",
    "UPGRADE_TOKEN",
    "Address",
    "AdminConfig",
    "BackendConfig",
    "BackendTLS",
    "CertPair",
    "Config",
    "GiB",
    "IPNetwork",
    "KiB",
    "ListenerConfig",
    "ListenerTLS",
    "MiB",
    "RouteConfig",
    "ServerConfig",
    "format_duration",
    "format_size",
    "is_ip_address",
    "join_host_port",
    "parse_duration",
    "parse_size",
]
