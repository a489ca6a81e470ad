"""The engine's Kafka topic names, from the environment."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from flashsale.errors import ConfigError, shown

_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,200}\Z")


@dataclass(frozen=True)
class Topics:
    """Kafka topic names: ``FLASHSALE_TOPIC_PREFIX`` + the base name, or each one set in full
    by ``FLASHSALE_TOPIC_RESERVATIONS``, ``..._ORDER_EVENTS``, ``..._DEAD_LETTER``."""

    reservations: str = "reservations"
    order_events: str = "order-events"
    dead_letter: str = "flashsale-dead-letter"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Topics:
        prefix = env.get("FLASHSALE_TOPIC_PREFIX", "")
        names: dict[str, str] = {}
        for name, default in DEFAULT_TOPICS.items():
            variable = f"FLASHSALE_TOPIC_{name.upper()}"
            value = env.get(variable) or prefix + default
            source = variable if env.get(variable) else "FLASHSALE_TOPIC_PREFIX"
            if not _TOPIC.match(value) or value in (".", ".."):  # Kafka refuses those two
                raise ConfigError(f"{source} makes the topic name {shown(value)}: it must be "
                                  "1-200 of [A-Za-z0-9._-], not . or ..")  # fmt: skip
            if same := next((n for n, topic in names.items() if topic == value), None):
                raise ConfigError(f"{source} makes the topic {shown(value)} of FLASHSALE_TOPIC_"
                                  f"{same.upper()} too: each needs its own")  # fmt: skip
            names[name] = value
        return cls(**names)

    def all(self) -> list[str]:
        return [self.reservations, self.order_events, self.dead_letter]

    def env(self) -> dict[str, str]:
        """The environment that gives another process these topics."""
        return {f"FLASHSALE_TOPIC_{name.upper()}": getattr(self, name) for name in DEFAULT_TOPICS}


DEFAULT_TOPICS = {"reservations": Topics.reservations, "order_events": Topics.order_events,
                  "dead_letter": Topics.dead_letter}  # fmt: skip
