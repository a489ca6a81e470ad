"""One typed settings object, read from the environment once at the entry point.

Resolution, per variable: the process environment wins; otherwise the values that
``flashsale dev up`` wrote to ``<home>/dev.env`` (the embedded stack); otherwise unset.
A component that needs an unset server gets a :class:`~flashsale.errors.ConfigError` that
says how to fix it, never a silent default pointing at some other server.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from flashsale.errors import ConfigError

DEV_ENV_FILE = "dev.env"
_EXPORT_LINE = re.compile(r"^export ([A-Z_][A-Z0-9_]*)=(.*)$")


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret string: masked in ``repr``/``str`` so it cannot leak through logs by accident."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


def mask_url(url: str | None) -> str | None:
    """Return ``url`` with any password replaced by ``***`` (for logs and ``repr``)."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def read_env_file(path: Path) -> dict[str, str]:
    """Parse ``export KEY=value`` lines (the format ``flashsale dev env`` prints)."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text().splitlines():
        match = _EXPORT_LINE.match(raw.strip())
        if match:
            value = match.group(2)
            if len(value) >= 2 and value[0] == value[-1] == "'":
                value = value[1:-1]
            values[match.group(1)] = value
    return values


def home_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The engine's state folder: ``$FLASHSALE_HOME`` or ``./.flashsale``."""
    env = os.environ if environ is None else environ
    return Path(env.get("FLASHSALE_HOME") or Path.cwd() / ".flashsale").resolve()


@dataclass(frozen=True)
class Settings:
    """Everything the engine reads from its environment. Build it with :meth:`from_env`."""

    home: Path
    redis_url: str | None = None
    database_url: str | None = None
    kafka_bootstrap: str | None = None
    admin_token: Secret = Secret("")
    secret: Secret = Secret("")
    buyer_token_secret: Secret = Secret("")
    log_level: str = "INFO"
    # Which values came from the embedded stack's dev.env rather than the environment.
    from_dev_env: frozenset[str] = frozenset()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        home = home_dir(env)
        dev = read_env_file(home / DEV_ENV_FILE)

        used_dev: set[str] = set()

        def pick(name: str) -> str | None:
            value = env.get(name)
            if value:
                return value
            if dev.get(name):
                used_dev.add(name)
                return dev[name]
            return None

        settings = cls(
            home=home,
            redis_url=pick("REDIS_URL"),
            database_url=pick("DATABASE_URL"),
            kafka_bootstrap=pick("KAFKA_BOOTSTRAP"),
            admin_token=Secret(pick("FLASHSALE_ADMIN_TOKEN") or ""),
            secret=Secret(pick("FLASHSALE_SECRET") or ""),
            buyer_token_secret=Secret(pick("FLASHSALE_BUYER_TOKEN_SECRET") or ""),
            log_level=(env.get("FLASHSALE_LOG_LEVEL") or "INFO").upper(),
            from_dev_env=frozenset(used_dev),
        )
        return settings

    # -- accessors that fail with an actionable message -----------------------------------

    def require_redis(self) -> str:
        return _require(self.redis_url, "REDIS_URL")

    def require_database(self) -> str:
        return _require(self.database_url, "DATABASE_URL")

    def require_kafka(self) -> str:
        return _require(self.kafka_bootstrap, "KAFKA_BOOTSTRAP")

    def secrets(self) -> list[str]:
        """Every secret value in force, for the log redaction filter."""
        values = [self.admin_token, self.secret, self.buyer_token_secret]
        found = [s.reveal() for s in values if s]
        for url in (self.redis_url, self.database_url):
            password = urlsplit(url).password if url else None
            if password:
                found.append(password)
        return found

    def __repr__(self) -> str:
        return (
            f"Settings(home={str(self.home)!r}, redis_url={mask_url(self.redis_url)!r}, "
            f"database_url={mask_url(self.database_url)!r}, "
            f"kafka_bootstrap={self.kafka_bootstrap!r}, admin_token={self.admin_token!r}, "
            f"secret={self.secret!r}, buyer_token_secret={self.buyer_token_secret!r}, "
            f"log_level={self.log_level!r})"
        )


def _require(value: str | None, name: str) -> str:
    if not value:
        raise ConfigError(
            f"{name} is not set and no embedded stack is running: "
            "run `flashsale dev up` or export it"
        )
    return value


class RedactSecrets(logging.Filter):
    """Replace any secret value that reaches a log record with ``********``."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = record.getMessage()
            redacted = message
            for secret in self._secrets:
                redacted = redacted.replace(secret, "********")
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


class _EngineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so reconfiguring replaces only it."""


def configure_logging(settings: Settings) -> None:
    """Logs on stderr with secrets redacted. Idempotent; leaves other handlers alone."""
    root = logging.getLogger()
    for existing in [h for h in root.handlers if isinstance(h, _EngineHandler)]:
        root.removeHandler(existing)
    handler = _EngineHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%H:%M:%S")
    )
    handler.addFilter(RedactSecrets(settings.secrets()))
    root.addHandler(handler)
    root.setLevel(settings.log_level)
