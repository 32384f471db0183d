"""What ``[routes.auth]`` reads from outside the configuration: the bearer tokens file, kept
current while the server runs, and the JWT key (a PEM file or an environment variable)."""

from __future__ import annotations

import logging
import os

import trio
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from tunnel.config import Config
from tunnel.config.auth import RouteAuth, read_pem, read_secret, read_tokens_file
from tunnel.errors import ConfigError
from tunnel.logs import LOGGER_NAME, fields
from tunnel.policy.auth import AuthRules, PublicKey

log = logging.getLogger(LOGGER_NAME)
MIN_RSA_BITS = 2048

Stamp = tuple[int, int, int, int]
"""(device, inode, size, mtime in ns): a change in any of them means the file may have changed,
including a new file renamed over the old one."""


def _stamp(path: str) -> Stamp:
    """Raises ``OSError``."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class TokenFile:
    """A bearer tokens file: ``tokens`` holds the SHA-256 digests of the last good version.

    A version that cannot be read or holds no valid token leaves the previous tokens in use
    and logs one error line; the next change is tried again.
    """

    def __init__(self, path: str, tokens: tuple[bytes, ...], stamp: Stamp | None) -> None:
        self.path = path
        self._tokens = tokens
        self._seen: Stamp | str | None = stamp
        """The version last read, good or not (or the error of a file that cannot be seen),
        so that each version is read and each failure logged once."""

    @classmethod
    def load(cls, path: str, key: str = "tokens_file") -> TokenFile:
        """Read ``path`` now.

        Raises:
            ConfigError: naming ``key``, when the file cannot be read or holds no valid token.
        """
        try:
            stamp: Stamp | None = _stamp(path)
        except OSError:
            stamp = None  # read_tokens_file says why
        return cls(path, read_tokens_file(path, key), stamp)

    @property
    def tokens(self) -> tuple[bytes, ...]:
        return self._tokens

    def reload(self) -> bool:
        """Read the file again if its stamp changed; True when new tokens are in use. Blocks
        on the disk: call it in a thread from async code."""
        try:
            stamp: Stamp | str = _stamp(self.path)
        except OSError as exc:
            return self._failed(f"cannot read the file: {exc.strerror}", f"stat: {exc.strerror}")
        if stamp == self._seen:
            return False
        try:
            tokens = read_tokens_file(self.path, "tokens_file")
        except ConfigError as error:
            return self._failed(error.problem, stamp)
        self._seen = stamp
        self._tokens = tokens
        log.info(
            "tokens file reloaded; new upgrades are checked against it",
            extra=fields(file=self.path, tokens=len(tokens)),
        )
        return True

    def _failed(self, problem: str, seen: Stamp | str) -> bool:
        if seen != self._seen:
            log.error(
                "tokens file not reloaded; the previous tokens stay in use",
                extra=fields(
                    file=self.path,
                    error=f"{problem}; fix the file (one token a line): it is read again when "
                    "it changes",
                ),
            )
        self._seen = seen
        return False

    async def watch(
        self, interval: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Check the file every ``interval`` seconds (never when it is 0) until cancelled. The
        disk is read in a thread: a slow disk must not stall the relay."""
        task_status.started()
        if interval <= 0:
            await trio.sleep_forever()
        while True:
            await trio.sleep(interval)
            await trio.to_thread.run_sync(self.reload)


def read_public_key(path: str, key: str) -> PublicKey:
    """The JWT verification key in PEM file ``path``: RSA (2048 bits or more) or EC P-256.

    Raises:
        ConfigError: the file cannot be read, is not a PEM public key, or holds another kind
            of key.
    """
    data = read_pem(path, key)
    try:
        public = load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(key, f"{path} is not a PEM public key (BEGIN PUBLIC KEY)") from exc
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < MIN_RSA_BITS:
            raise ConfigError(
                key, f"{path}: an RSA key of {public.key_size} bits is too weak; use 2048 or more"
            )
        return public
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
        return public
    raise ConfigError(key, f"{path}: only RSA (RS256) and EC P-256 (ES256) keys verify JWTs here")


def auth_rules(
    settings: RouteAuth, tokens: TokenFile | None = None, *, key: str = "auth"
) -> AuthRules:
    """A route's auth compiled with what its files and variable hold now; ``tokens`` is the
    bearer tokens file when it is already loaded (and watched), else it is loaded here.
    ``key`` names the table in errors (``routes[0].auth``).

    Raises:
        ConfigError: naming the key, when a file or the variable cannot be read, or the public
            key is not one JWTs are verified with here.
    """
    if settings.kind == "bearer":
        if tokens is None:
            tokens = TokenFile.load(settings.tokens_file, f"{key}.tokens_file")
        return AuthRules.build(settings, tokens=tokens)
    if settings.secret_env:
        secret = read_secret(settings.secret_env, f"{key}.secret_env")
        return AuthRules.build(settings, key=secret)
    public = read_public_key(settings.public_key, f"{key}.public_key")
    return AuthRules.build(settings, key=public)


def check_auth(config: Config) -> None:
    """Load every route's credentials as a start would (the key's kind and size too, which
    reading the configuration does not check); for ``tunnel check``.

    Raises:
        ConfigError: naming the route's key and the file or variable.
    """
    for i, route in enumerate(config.routes):
        if route.auth.kind != "none":
            auth_rules(route.auth, key=f"routes[{i}].auth")
