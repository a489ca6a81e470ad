"""Settings: environment first, then dev.env; secrets never in repr or logs."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import pytest

from flashsale.cli.devstack.processes import UP_PORTS, free_ports
from flashsale.env_values import VARIABLES, bootstrap
from flashsale.errors import ConfigError
from flashsale.logs import RedactSecrets
from flashsale.settings import Settings, mask_url
from flashsale.topics import DEFAULT_TOPICS
from tests.conftest import Cli
from tests.harness import run_bounded


def test_environment_wins_over_dev_env(tmp_path: Path) -> None:
    (tmp_path / "dev.env").write_text(
        "export REDIS_URL=redis://dev:6379/0\nexport DATABASE_URL=postgresql://dev/db\n"
        "export FLASHSALE_SECRET=from-dev-env-0123456789\n"
    )
    env = {"FLASHSALE_HOME": str(tmp_path), "REDIS_URL": "redis://external:6379/0"}
    settings = Settings.from_env(env)
    assert settings.redis_url == "redis://external:6379/0"
    assert settings.database_url == "postgresql://dev/db"
    assert settings.secret.reveal() == "from-dev-env-0123456789"
    assert settings.from_dev_env == frozenset({"DATABASE_URL", "FLASHSALE_SECRET"})


def test_missing_server_is_an_actionable_error(tmp_path: Path) -> None:
    settings = Settings.from_env({"FLASHSALE_HOME": str(tmp_path)})
    with pytest.raises(ConfigError, match="flashsale dev up"):
        settings.require_kafka()
    # Where it looked, for a shell in another folder than the stack's (FLASHSALE_HOME unset).
    with pytest.raises(ConfigError) as missing:
        settings.require_redis()
    assert f"no embedded stack is running in {tmp_path}:" in missing.value.message


def test_secrets_are_masked_in_repr_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings.from_env(
        {
            "FLASHSALE_HOME": str(tmp_path),
            "DATABASE_URL": "postgresql://app:pg-password-123@db:5432/x",
            "FLASHSALE_ADMIN_TOKEN": "admin-token-xyz-0123",
            "FLASHSALE_SECRET": "signing-secret-xyz",
            "FLASHSALE_BUYER_TOKEN_SECRET": "buyer-secret-xyz",
        }
    )
    text = repr(settings) + str(settings.admin_token)
    secrets = ("pg-password-123", "admin-token-xyz-0123", "signing-secret-xyz", "buyer-secret-xyz")
    for secret in secrets:
        assert secret not in text
    assert mask_url(settings.database_url) == "postgresql://app:***@db:5432/x"

    logger = logging.getLogger("test.redact")
    logger.addFilter(RedactSecrets(settings.secrets()))
    with caplog.at_level(logging.INFO, logger="test.redact"):
        logger.info("connecting with %s and %s", "admin-token-xyz-0123", settings.database_url)
    assert "admin-token-xyz-0123" not in caplog.text
    assert "pg-password-123" not in caplog.text
    assert "********" in caplog.text


def test_a_secret_in_a_urls_query_is_masked_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """libpq takes a password in the query (`?password=`), and a shop's webhook URL may carry
    a token there: both were shown whole, in `repr`, `dev status`, logs and `up`'s start line."""
    settings = Settings.from_env({
        "FLASHSALE_HOME": str(tmp_path),
        "DATABASE_URL": "postgresql://app@db:5432/x?sslmode=require&password=pg-query-secret-1",
        "FLASHSALE_WEBHOOK_URL": "https://shop.example/hooks?token=hook-query-secret-2",
        "FLASHSALE_WEBHOOK_SECRET": "whsec_" + "A" * 44,
        "FLASHSALE_PSP_URL": "https://psp:psp-password-3@psp.example",
    })  # fmt: skip
    assert mask_url(settings.database_url) == (
        "postgresql://app@db:5432/x?sslmode=***&password=***"
    )
    assert mask_url(settings.webhook_url) == "https://shop.example/hooks?token=***"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert "pg-query-secret-1" not in repr(settings)
    logger = logging.getLogger("test.redact.query")
    logger.addFilter(RedactSecrets(settings.secrets()))
    with caplog.at_level(logging.INFO, logger="test.redact.query"):
        logger.info("to %s, %s and %s", settings.database_url, settings.webhook_url,
                    settings.psp_url)  # fmt: skip
    assert "pg-query-secret-1" not in caplog.text and "hook-query-secret-2" not in caplog.text
    assert "psp-password-3" not in caplog.text
    assert "sslmode=require" in caplog.text  # a word, not a secret: the log keeps it


@pytest.mark.parametrize(
    ("name", "value"),
    [("FLASHSALE_RATE_PER_IP", "bad"), ("FLASHSALE_CORS_ORIGINS", "shop.example"),
     ("FLASHSALE_RESERVATIONS_URL", "http://reserve.example/desk"),
     ("FLASHSALE_MAX_IN_FLIGHT", "-3"), ("FLASHSALE_PSP_URL", "psp.example:8080"),
     ("FLASHSALE_PSP_URL", "http://127.0.0.1:notaport"), ("FLASHSALE_PSP_URL", "http://[::1"),
     ("FLASHSALE_PSP_URL", "http://127.1:8083"),  # each charge refused by aiohttp, not the start
     ("FLASHSALE_CORS_ORIGINS", "https://999.1.1.1"),
     ("FLASHSALE_RESERVATIONS_URL", "http://127.1:8085"),
     ("FLASHSALE_PG_POOL_MODE", "statement"),
     # float() reads these: a traceback, or nan taken as a timeout
     ("FLASHSALE_MAX_IN_FLIGHT", "inf"), ("FLASHSALE_BODY_TIMEOUT", "nan"),
     ("FLASHSALE_REDIS_TIMEOUT", "0"), ("FLASHSALE_PG_TIMEOUT", "nan"),
     ("FLASHSALE_RATE_PER_IP", "inf"), ("FLASHSALE_RATE_PER_BUYER", "nan,5"),
     # Kafka takes no session the consumer's requests could not outlast
     ("FLASHSALE_WORKER_SESSION_TIMEOUT", "0.5"), ("FLASHSALE_WORKER_SESSION_TIMEOUT", "31"),
     ("FLASHSALE_ARCHIVE_AFTER", "-1"), ("FLASHSALE_ARCHIVE_AFTER", "later"),
     # logging's own check was a traceback; a yes/no taken as no behind a proxy counted
     # every buyer at the proxy's address
     ("FLASHSALE_LOG_LEVEL", "verbose"), ("FLASHSALE_TRUST_FORWARDED", "on"),
     ("FLASHSALE_TOPIC_PREFIX", "flash sale/"), ("FLASHSALE_TOPIC_RESERVATIONS", "a b"),
     # Kafka refuses the topics "." and ".."; a topic named twice mixed two streams
     ("FLASHSALE_TOPIC_RESERVATIONS", "."), ("FLASHSALE_TOPIC_DEAD_LETTER", "order-events"),
     # a control character in a group name
     ("FLASHSALE_CONSUMER_GROUP", "work\ters")],
)  # fmt: skip
def test_a_bad_setting_is_one_line_naming_it_not_a_traceback(
    run_cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, value: str
) -> None:
    monkeypatch.setenv("FLASHSALE_HOME", str(tmp_path))
    monkeypatch.setenv(name, value)
    result = run_cli("sale", "list")
    assert result.code == 1
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flashsale: error: {name}"), result.err


@pytest.mark.parametrize(
    ("value", "says"),
    [("hoo\tks", "control characters"),
     # in the workers' group, each webhooks consumer joining rebalanced every worker
     ("flashsale-workers", "the workers' group (FLASHSALE_CONSUMER_GROUP)")],
)  # fmt: skip
def test_the_webhooks_group_is_a_name_of_its_own(value: str, says: str) -> None:
    env = {"FLASHSALE_HOME": "/nonexistent-flashsale-home",
           "FLASHSALE_WEBHOOK_URL": "https://shop.example/hooks",
           "FLASHSALE_WEBHOOK_SECRET": "whsec_" + "A" * 44}  # fmt: skip
    assert Settings.from_env(env).webhook_group == "flashsale-webhooks"
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({**env, "FLASHSALE_WEBHOOK_GROUP": value})
    assert str(refused.value).startswith("FLASHSALE_WEBHOOK_GROUP") and says in str(refused.value)
    # Without the URL it does nothing, and is said to (unknown_settings), not refused.
    Settings.from_env({"FLASHSALE_HOME": "/nonexistent", "FLASHSALE_WEBHOOK_GROUP": value})


def test_the_admin_token_is_no_key_of_the_storefronts(
    run_cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The storefront holds FLASHSALE_BUYER_TOKEN_SECRET to sign buyer tokens: an admin token
    set to the same text (one secret "for simplicity") gave the shop every admin operation."""
    monkeypatch.setenv("FLASHSALE_HOME", str(tmp_path))
    monkeypatch.setenv("FLASHSALE_BUYER_TOKEN_SECRET", "shared-secret-0123456789")
    monkeypatch.setenv("FLASHSALE_ADMIN_TOKEN", "admin-token-0123456789, shared-secret-0123456789")
    result = run_cli("sale", "list")
    said = (
        "FLASHSALE_ADMIN_TOKEN must differ from FLASHSALE_BUYER_TOKEN_SECRET: the storefront "
        "signs buyer tokens with that one, and would hold the admin token"
    )
    assert (result.code, result.err.strip()) == (1, f"flashsale: error: {said}"), result


@pytest.mark.parametrize("argv", [("sale", "list"), ("dev", "up"), ("dev", "env")])
def test_a_state_folder_that_is_a_file_is_one_line_naming_it(
    run_cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: tuple[str, ...]
) -> None:
    """``dev up`` said "/path: File exists" of a FLASHSALE_HOME naming a file."""
    home = tmp_path / "stack.json"
    home.write_text("{}")
    monkeypatch.setenv("FLASHSALE_HOME", str(home))
    result = run_cli(*argv)
    assert (result.code, result.out) == (1, ""), result
    assert result.err == f"flashsale: error: FLASHSALE_HOME: {home} is a file, not a folder\n"


@pytest.mark.parametrize("servers", ["127.0.0.1:abc", "127.0.0.1:9092,", " ", "h:0",
                                     # a URL: aiokafka took "kafka://h" for a host name
                                     "kafka://127.0.0.1:9092", "PLAINTEXT://h:9092"])  # fmt: skip
def test_a_bootstrap_list_that_is_not_host_and_port_is_refused(servers: str) -> None:
    with pytest.raises(ConfigError, match=r"^KAFKA_BOOTSTRAP: .* is not host:port"):
        bootstrap(servers)
    if servers.strip():  # refused with the other settings, not at a first Kafka client
        with pytest.raises(ConfigError, match=r"^KAFKA_BOOTSTRAP: .* is not host:port"):
            Settings.from_env({"FLASHSALE_HOME": "/nonexistent", "KAFKA_BOOTSTRAP": servers})


def test_a_service_given_a_bootstrap_list_that_is_not_host_and_port_does_not_start(
    tmp_path: Path,
) -> None:
    """The gateway served with it, its readiness saying Kafka was down, and the allocator and
    the reconciler ran on, the reconciler warning every pass: a setting that cannot work was
    taken for a broker that is down, whereas a REDIS_URL of the same kind stops the start."""
    env = {
        **os.environ,
        "FLASHSALE_HOME": str(tmp_path),
        "KAFKA_BOOTSTRAP": "127.0.0.1:abc",
        "REDIS_URL": "redis://127.0.0.1:1",
        "DATABASE_URL": "postgresql://127.0.0.1:1/x",
        **{name: f"{name.lower()}-0123456789abcdef" for name in (
            "FLASHSALE_ADMIN_TOKEN", "FLASHSALE_SECRET", "FLASHSALE_BUYER_TOKEN_SECRET")},
    }  # fmt: skip
    said = "KAFKA_BOOTSTRAP: '127.0.0.1:abc' is not host:port (several are separated by commas)"
    port = str(free_ports(1))
    for service in (["gateway", "--port", port], ["allocator", "--ops-port", port],
                    ["reconcile", "--ops-port", port]):  # fmt: skip
        code, _, err = run_bounded([sys.executable, "-m", "flashsale", *service], env, 60)
        assert (code, err.strip()) == (1, f"flashsale: error: {said}"), (service, err[-2000:])


def test_a_bootstrap_list_of_hosts_and_ports_is_taken() -> None:
    servers = "kafka-1.example:9092, 10.0.0.7:19092,[2001:db8::1]:9093,broker"
    assert bootstrap(servers) == servers


def test_the_spaces_and_line_end_around_a_setting_are_not_part_of_it(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, stack: Settings
) -> None:
    """A value from a file keeps its last newline (a Kubernetes secret made with
    ``--from-file``, an env file written by an editor). Kept, it made the database
    "flashsale\\n", which does not exist, and an audience every storefront token missed."""
    env = {"FLASHSALE_HOME": "/nonexistent-flashsale-home",
           "DATABASE_URL": "postgresql://u:p@db.example:5432/flashsale\n",
           "REDIS_URL": " redis://default:p@redis.example:6379/0\r\n",
           "KAFKA_BOOTSTRAP": "kafka.example:9092 ", "FLASHSALE_BUYER_JWT_AUDIENCE": "shop\n",
           "FLASHSALE_CONSUMER_GROUP": "workers\n", "FLASHSALE_ADMIN_TOKEN": "\t",
           "FLASHSALE_REDIS_TIMEOUT": "2 "}  # fmt: skip
    settings = Settings.from_env(env)
    assert settings.database_url == "postgresql://u:p@db.example:5432/flashsale"
    assert settings.redis_url == "redis://default:p@redis.example:6379/0"
    assert settings.kafka_bootstrap == "kafka.example:9092"
    assert settings.buyer_jwt_audience == "shop"
    assert settings.consumer_group == "workers"
    assert not settings.admin_token  # blank: unset, as the empty string is
    assert settings.redis_timeout_s == 2
    # On the stack: the database is found.
    monkeypatch.setenv("DATABASE_URL", stack.require_database() + "\n")
    listed = cli("sale", "list", "--limit", "1")
    assert listed.code == 0, listed.err


def test_a_yes_or_no_setting_says_every_word_it_takes() -> None:
    """It said "must be 1 or 0" while it also took true/false and yes/no."""
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"FLASHSALE_TRUST_FORWARDED": "on"})
    assert refused.value.message == (
        "FLASHSALE_TRUST_FORWARDED must be 1 or 0 (or true/false, yes/no), got 'on'")  # fmt: skip
    assert Settings.from_env({"FLASHSALE_TRUST_FORWARDED": " Yes "}).trust_forwarded


def test_sales_are_archived_a_day_after_their_end_unless_told_otherwise() -> None:
    assert Settings.from_env({}).archive_after_s == 86_400
    assert Settings.from_env({"FLASHSALE_ARCHIVE_AFTER": " Never "}).archive_after_s is None
    assert Settings.from_env({"FLASHSALE_ARCHIVE_AFTER": "0"}).archive_after_s == 0


def test_a_setting_in_seconds_takes_a_duration_as_the_cli_does() -> None:
    """`FLASHSALE_ARCHIVE_AFTER=7d` stopped every service with "must be a number", where the
    CLI's flags in seconds take `7d`."""
    settings = Settings.from_env({
        "FLASHSALE_ARCHIVE_AFTER": "7d", "FLASHSALE_REDIS_TIMEOUT": "0.5s",
        "FLASHSALE_PG_TIMEOUT": "1m", "FLASHSALE_BODY_TIMEOUT": "10s",
        "FLASHSALE_WORKER_SESSION_TIMEOUT": "20s"})  # fmt: skip
    assert (settings.archive_after_s, settings.redis_timeout_s, settings.pg_timeout_s,
            settings.body_timeout_s, settings.worker_session_timeout_s) == (
        604_800, 0.5, 60, 10, 20)  # fmt: skip
    with pytest.raises(ConfigError, match=(
            r"^FLASHSALE_PG_TIMEOUT must be seconds or a duration like 90s, 10m or 1h30m, "
            r"got '10 minutes'$")):  # fmt: skip
        Settings.from_env({"FLASHSALE_PG_TIMEOUT": "10 minutes"})
    with pytest.raises(ConfigError, match=r"^FLASHSALE_WORKER_SESSION_TIMEOUT must be at most "
                                          r"30 seconds, got '1m'$"):  # fmt: skip
        Settings.from_env({"FLASHSALE_WORKER_SESSION_TIMEOUT": "1m"})


def test_joins_and_polls_leave_room_for_admitted_buyers_under_the_in_flight_cap() -> None:
    """FLASHSALE_MAX_IN_FLIGHT lowered to 500 kept the joins' and polls' ceilings at 200 and
    800: polls alone could take every slot, and an admitted buyer's reservation was refused
    503 overloaded, the very request the ceilings are there to keep room for. Unset, the two
    follow the cap (a tenth and two fifths of it); set so that they would fill it, the start
    is refused, naming the three."""
    assert Settings.from_env({}).max_joins_in_flight == 200
    assert Settings.from_env({}).max_polls_in_flight == 800
    lowered = Settings.from_env({"FLASHSALE_MAX_IN_FLIGHT": "500"})
    assert (lowered.max_joins_in_flight, lowered.max_polls_in_flight) == (50, 200)
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"FLASHSALE_MAX_POLLS_IN_FLIGHT": "1900"})
    said = str(refused.value)
    assert said.startswith(
        "FLASHSALE_MAX_JOINS_IN_FLIGHT (200) and FLASHSALE_MAX_POLLS_IN_FLIGHT"
        " (1900) leave no room under FLASHSALE_MAX_IN_FLIGHT (2000)"
    ), said
    taken = Settings.from_env({"FLASHSALE_MAX_POLLS_IN_FLIGHT": "1700"})  # 100 left
    assert taken.max_polls_in_flight == 1700


@pytest.mark.parametrize(
    ("name", "url", "option"),
    [("REDIS_URL", "redis://default:pw@127.0.0.1:9/0?ssl_ca_certs=/etc/ca.pem", "ssl_ca_certs"),
     ("REDIS_URL", "rediss://default:pw@127.0.0.1:9/0?ssl_ca_cert=/etc/ca.pem", "ssl_ca_cert"),
     ("REDIS_URL", "redis://default:pw@127.0.0.1:9/0?socket_timeout=soon", "socket_timeout"),
     ("DATABASE_URL", "postgresql://u:p@127.0.0.1:9/x?sslmode=verify-fulll", "sslmode"),
     ("DATABASE_URL", "postgresql://u:p@127.0.0.1:notaport/x", "notaport"),
     ("DATABASE_URL", "mysql://u:p@127.0.0.1:9/x", '"postgresql"'),  # a short password: kept
     # a TLS file that is not there: named, not "cannot reach ...: No such file or directory"
     ("REDIS_URL", "rediss://default:pw@127.0.0.1:9/0?ssl_ca_certs=/nonexistent/ca.pem",
      "ssl_ca_certs: cannot read /nonexistent/ca.pem"),
     ("REDIS_URL", "rediss://default:pw@127.0.0.1:9/0?ssl_certfile=/tmp&ssl_keyfile=/tmp",
      "ssl_certfile: cannot read /tmp"),
     ("DATABASE_URL", "postgresql://u:p@127.0.0.1:9/x?sslmode=verify-full"
      "&sslrootcert=/nonexistent/db-ca.pem", "sslrootcert: cannot read /nonexistent/db-ca.pem"),
     ("DATABASE_URL", "postgresql://u:p@127.0.0.1:9/x?sslcert=/etc/hostname&sslkey=/nonexistent/k",
      "sslkey: cannot read /nonexistent/k")],
)  # fmt: skip
def test_a_server_url_with_an_option_its_client_refuses_is_one_line_naming_it(
    run_cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, url: str,
    option: str,
) -> None:  # fmt: skip
    """A TLS option on a ``redis://`` URL, a misspelt one, a value of the wrong kind: each
    used to fail at the first connection, a TypeError or ValueError with its traceback (a 500
    in a service), instead of a line saying which setting to fix."""
    monkeypatch.setenv("FLASHSALE_HOME", str(tmp_path))
    monkeypatch.setenv("REDIS_URL", "redis://default:pw@127.0.0.1:9/0")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@127.0.0.1:9/x")
    monkeypatch.setenv(name, url)
    result = run_cli("sale", "list")
    lines = result.err.strip().splitlines()
    assert result.code == 1, result
    assert len(lines) == 1 and lines[0].startswith(f"flashsale: error: {name}"), result.err
    assert option in lines[0] and "pw@" not in lines[0] and ":p@" not in lines[0], lines[0]


GOOD_SECRET = "a-secret-of-twenty-chars"


@pytest.mark.parametrize(
    ("name", "value"),
    [("FLASHSALE_SECRET", f"{GOOD_SECRET},short"),  # a second key, kept for verification
     ("FLASHSALE_BUYER_TOKEN_SECRET", f"{GOOD_SECRET}, short"),
     ("FLASHSALE_ADMIN_TOKEN", "admin"),  # as guessable as a password
     ("FLASHSALE_ADMIN_TOKEN", "admin" + " " * 20)],  # its spaces count for nothing
)  # fmt: skip
@pytest.mark.parametrize("command", [["gateway"], ["up"]])
def test_a_weak_secret_stops_a_service_with_one_line_naming_it(
    tmp_path: Path, name: str, value: str, command: list[str]
) -> None:
    """Every secret is at least 16 characters, the rotation's older keys included: a short
    second key was a ValueError traceback, and an admin token of any length was served."""
    env = {**os.environ, "FLASHSALE_HOME": str(tmp_path),
           "REDIS_URL": "redis://127.0.0.1:9/0", "DATABASE_URL": "postgresql://u:p@127.0.0.1:9/x",
           "KAFKA_BOOTSTRAP": "127.0.0.1:9", "FLASHSALE_SECRET": GOOD_SECRET,
           "FLASHSALE_BUYER_TOKEN_SECRET": GOOD_SECRET, "FLASHSALE_ADMIN_TOKEN": GOOD_SECRET[::-1],
           name: value}  # fmt: skip
    port = str(free_ports(UP_PORTS))
    code, _out, err = run_bounded([sys.executable, "-m", "flashsale", *command, "--port", port],
                                  env, 60)  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith(f"flashsale: error: {name}"), err
    assert "at least 16 characters" in lines[0], lines[0]


def test_a_mistyped_setting_is_said_with_the_one_meant(
    run_cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``FLASHSALE_RATE_PER_IPS=off`` (for ``FLASHSALE_RATE_PER_IP``) was read by nothing and
    said nothing: the engine ran on the default it was meant to change."""
    monkeypatch.setenv("FLASHSALE_HOME", str(tmp_path))
    monkeypatch.setenv("FLASHSALE_RATE_PER_IPS", "off")
    monkeypatch.setenv("FLASHSALE_COLOUR", "blue")
    monkeypatch.setenv("FLASHSALE_TEST_ANYTHING", "1")  # the test suite's own
    result = run_cli("sale", "list")  # no stack here: refused, after the warnings
    warnings = [line for line in result.err.splitlines() if "warning" in line]
    assert warnings == [
        "flashsale: warning: FLASHSALE_COLOUR is set but is not a setting of this engine: ignored",
        "flashsale: warning: FLASHSALE_RATE_PER_IPS is set but is not a setting of this "
        "engine (FLASHSALE_RATE_PER_IP?): ignored",
    ], result.err


def test_the_settings_the_engine_knows_are_the_ones_it_reads() -> None:
    """The names warned about are those no part of the engine reads: the list is the code's."""
    root = Path(__file__).resolve().parent.parent
    read: set[str] = set()
    for package in ("flashsale", "gateway", "allocator", "workers", "reconciler", "loadtest"):
        for path in (root / package).rglob("*.py"):
            read |= set(re.findall(r"FLASHSALE_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    topics = {f"FLASHSALE_TOPIC_{name.upper()}" for name in DEFAULT_TOPICS}
    prefixes = {"FLASHSALE_TOPIC", "FLASHSALE_TEST"}  # FLASHSALE_TOPIC_{name}, the tests' own
    assert read | topics == set(VARIABLES) | prefixes, read ^ set(VARIABLES)
