"""The engine's Kafka topic and consumer group names, from the environment."""

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


def consumer_groups(env: Mapping[str, str], *, webhooks: bool) -> tuple[str, str]:
    """``FLASHSALE_CONSUMER_GROUP`` (the workers') and ``FLASHSALE_WEBHOOK_GROUP``, the latter
    checked only when the webhooks are on (alone it does nothing, and is said to), from
    the settings' values (:func:`~flashsale.env_values.trimmed`, so a blank one is unset).
    Neither holds a control character, and they differ: in the workers' group, each
    webhooks consumer joining would rebalance every worker."""
    workers = _group(env, "FLASHSALE_CONSUMER_GROUP", "flashsale-workers")
    if not webhooks:
        return workers, env.get("FLASHSALE_WEBHOOK_GROUP") or "flashsale-webhooks"
    hooks = _group(env, "FLASHSALE_WEBHOOK_GROUP", "flashsale-webhooks")
    if hooks == workers:
        raise ConfigError(f"FLASHSALE_WEBHOOK_GROUP is {shown(hooks)}, the workers' group "
                          "(FLASHSALE_CONSUMER_GROUP): the webhooks need their own")  # fmt: skip
    return workers, hooks


def _group(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name) or default
    if not value.isprintable():
        raise ConfigError(f"{name} is {shown(value)}: a consumer group name holds no control "
                          "characters")  # fmt: skip
    return value
