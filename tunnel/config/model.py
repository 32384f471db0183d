"""``Config``: the whole configuration, read from one file, changed by flags, written back."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunnel.config.hosts import Address, check_listen_together
from tunnel.config.kinds import Context, declare, setting
from tunnel.config.limits import LimitsConfig
from tunnel.config.listeners import CertPair, ListenerConfig, ListenerTLS
from tunnel.config.routes import BackendConfig, BackendTLS, RouteConfig
from tunnel.config.server import AdminConfig, ServerConfig
from tunnel.config.tables import Table, TableList, dump_table, key_named, parse_table, render_table
from tunnel.errors import ConfigError

_NEEDED = (
    ("listeners", "no listener", "[[listeners]]", "--listen"),
    ("routes", "no route", "[[routes]]", "--backend"),
)
"""What a file may leave to flags: (key, what is lacking, the table to add, the flag)."""


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. Build it with ``from_toml``, ``from_file`` or ``from_mapping``."""

    listeners: tuple[ListenerConfig, ...] = setting(
        (), TableList(ListenerConfig), "Where clients connect."
    )
    routes: tuple[RouteConfig, ...] = setting((), TableList(RouteConfig), "Where upgrades go.")
    server: ServerConfig = field(
        default=ServerConfig(),
        metadata=declare(Table(ServerConfig), "The process."),
    )
    admin: AdminConfig = field(
        default=AdminConfig(), metadata=declare(Table(AdminConfig), "The admin listener.")
    )
    limits: LimitsConfig = field(
        default=LimitsConfig(),
        metadata=declare(Table(LimitsConfig), "Where per-client limits are counted."),
    )

    @classmethod
    def from_file(cls, path: str | Path, *, partial: bool = False) -> Config:
        """Read ``path``; relative file names in it are read from its directory."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read the file: {exc.strerror}") from exc
        return cls.from_toml(text, base=Path(path).absolute().parent, partial=partial)

    @classmethod
    def from_toml(cls, text: str, *, base: Path | None = None, partial: bool = False) -> Config:
        """``base``: the directory relative file names (certificates, keys) are read from;
        ``from_file`` passes the file's own directory, as nginx users expect of an include."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("(file)", f"not valid TOML: {exc}") from exc
        return cls.from_mapping(data, base=base, partial=partial)

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], *, base: Path | None = None, partial: bool = False
    ) -> Config:
        """Every key is checked alone, then together with the others (``ConfigError`` names
        the key). ``partial``: a file may leave listeners and routes to ``--listen`` and
        ``--backend`` (``missing`` says which; ``with_overrides`` then requires them);
        otherwise it must be able to run as it is."""
        config: Config = parse_table(cls, data, "", Context(base))
        config._check()
        if not partial:
            config._require_complete()
        return config

    def with_overrides(
        self,
        *,
        listen: Sequence[str] = (),
        backends: Sequence[str] = (),
        log_format: str | None = None,
        workers: int | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        admin: str | None = None,
    ) -> Config:
        """Apply command-line flags, each replacing the file's value entirely, then
        ``validate``: flags are the last word, so the result must be able to run.

        ``tls_cert`` and ``tls_key`` come together and make every listener (those of
        ``listen``, else the file's) serve TLS with that one pair. ``admin`` is the admin
        listener's address."""
        config = self
        if listen:
            flags = [f"--listen {a}" for a in listen]
            addresses = [Address.parse(a, flag) for a, flag in zip(listen, flags, strict=True)]
            check_listen_together(addresses, flags)
            config = dataclasses.replace(
                config, listeners=tuple(ListenerConfig(a) for a in addresses)
            )
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError("--tls-cert/--tls-key", "give both, or neither")
        if tls_cert is not None and tls_key is not None:
            pair = CertPair(str(Path(tls_cert).absolute()), str(Path(tls_key).absolute()))
            config = dataclasses.replace(
                config, listeners=tuple(_with_tls(x, pair) for x in config.listeners)
            )
        if backends:
            config = dataclasses.replace(
                config, routes=(RouteConfig("default", _backend_flags(backends)),)
            )
        server = config.server
        if log_format is not None:
            server = dataclasses.replace(server, log_format=log_format)
        if workers is not None:
            key_named(ServerConfig, "workers").kind.parse(workers, "--workers", Context())
            server = dataclasses.replace(server, workers=workers)
        config = dataclasses.replace(config, server=server)
        if admin is not None:
            address = Address.parse(admin, f"--admin {admin}")
            config = dataclasses.replace(config, admin=AdminConfig(address))
        config.validate()
        return config

    def validate(self) -> None:
        """Check this configuration as ``from_mapping`` checks a file that must run as it is,
        so one built in Python or changed by flags meets every rule a file meets."""
        Config.from_mapping(self.to_mapping())

    def missing(self) -> tuple[str, ...]:
        """What ``tunnel run`` must get from flags, one note each (``tunnel check`` prints
        them); empty when the configuration can run as it is."""
        return tuple(
            f"{what}: tunnel run needs {flag}"
            for name, what, _, flag in _NEEDED
            if not getattr(self, name)
        )

    def to_mapping(self) -> dict[str, Any]:
        """The effective configuration as TOML data: ``from_mapping`` reads it back as is."""
        return dump_table(self)

    def to_toml(self) -> str:
        """The effective configuration, every default spelled out (``tunnel check`` prints it,
        and workers receive it)."""
        lines = render_table(self, "")
        return "\n".join(lines[1:] if lines[:1] == [""] else lines) + "\n"

    def _check(self) -> None:
        """What a single key cannot check alone; raise ``ConfigError`` naming the key."""
        addresses = [x.listen for x in self.listeners]
        keys = [f"listeners[{i}].listen" for i in range(len(self.listeners))]
        if self.admin.listen is not None:
            addresses.append(self.admin.listen)
            keys.append("admin.listen")
        check_listen_together(addresses, keys)
        server = self.server
        if server.lifetime_jitter and server.lifetime_jitter >= server.max_lifetime:
            raise ConfigError(
                "server.lifetime_jitter",
                "must be less than max_lifetime"
                + ("" if server.max_lifetime else ", which is 0s (off); set max_lifetime too"),
            )
        for i, listener in enumerate(self.listeners):
            tls = listener.tls
            if tls is not None and listener.redirect_https:
                raise ConfigError(
                    f"listeners[{i}].redirect_https",
                    "a TLS listener cannot redirect to itself; set it on the plain listener",
                )
            if tls is not None and tls.client_subject_header and not tls.client_ca:
                raise ConfigError(
                    f"listeners[{i}].tls.client_subject_header",
                    "needs client_ca: only a verified subject is sent",
                )
        seen: set[str] = set()
        for i, route in enumerate(self.routes):
            if route.name in seen:
                raise ConfigError(f"routes[{i}].name", f"{route.name!r} is used twice")
            seen.add(route.name)
            if len({b.name for b in route.backends}) != len(route.backends):
                raise ConfigError(
                    f"routes[{i}].backends", "backend names must be unique within a route"
                )
            if bool(route.backend_tls.cert) != bool(route.backend_tls.key):
                raise ConfigError(
                    f"routes[{i}].backend_tls.cert", "a client certificate needs both cert and key"
                )
            if route.backend_tls != BackendTLS() and not any(b.tls for b in route.backends):
                raise ConfigError(
                    f"routes[{i}].backend_tls",
                    "applies to wss:// backends and this route has none; remove it or use wss://",
                )

    def check_reload(self, running: Config) -> None:
        """Raise ``ConfigError`` when replacing ``running`` by this configuration needs a
        restart: the keys a running process cannot change are refused, naming the key,
        rather than applied in part."""
        for key, old, new in (
            ("server.workers", running.server.workers, self.server.workers),
            ("admin.listen", running.admin.listen, self.admin.listen),
            ("server.log_format", running.server.log_format, self.server.log_format),
            ("limits.store", running.limits.store, self.limits.store),
            ("limits.on_store_error", running.limits.on_store_error, self.limits.on_store_error),
        ):
            if old != new:
                shown = "off" if old is None else old
                raise ConfigError(key, f"changing it needs a restart (running with {shown})")

    def _require_complete(self) -> None:
        for name, what, table, flag in _NEEDED:
            if not getattr(self, name):
                raise ConfigError(name, f"{what}; add {table} or pass {flag}")


def _with_tls(listener: ListenerConfig, pair: CertPair) -> ListenerConfig:
    """``listener`` serving TLS with ``pair`` alone, keeping its other TLS keys."""
    tls = ListenerTLS((pair,))
    if listener.tls is not None:
        tls = dataclasses.replace(listener.tls, certs=(pair,))
    return dataclasses.replace(listener, tls=tls, redirect_https=False)


def _backend_flags(urls: Sequence[str]) -> tuple[BackendConfig, ...]:
    """The backends of ``--backend`` flags, named by ``host:port``, or by URL when two share
    one; the same backend twice is refused."""
    backends: list[BackendConfig] = []
    for url in urls:
        backend = BackendConfig.parse_url(url, f"--backend {url}")
        for earlier_url, earlier in zip(urls, backends, strict=False):
            if earlier.url == backend.url:
                raise ConfigError(
                    f"--backend {url}",
                    f"{backend.url!r} is also --backend {earlier_url}; give each backend once",
                )
        if any(b.name == backend.name for b in backends):
            backend = dataclasses.replace(backend, name=backend.url)
        backends.append(backend)
    return tuple(backends)
