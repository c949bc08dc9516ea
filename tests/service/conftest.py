"""Real servers for service tests: one Kafka broker per session, a fresh Redis per test.

Both run on free loopback ports with their own temp dirs, started and stopped by service.local.infra
(the same code CI and ``ctp up`` use). Tests that use them are marked ``integration`` here, so
``-m "not integration"`` leaves them out without each file having to say so.
"""

from collections.abc import Iterator

import pytest

from service.local.infra import KafkaServer, RedisServer

SERVER_FIXTURES = {"kafka", "redis_server"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaServer]:
    """A running single-node Kafka (KRaft), shared by the session: startup dominates test time.

    Tests isolate themselves by topic and consumer-group names, never by restarting it.
    """
    with KafkaServer(num_partitions=1) as server:
        yield server


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server with AOF on (``restart()`` keeps the data), stopped after the test."""
    with RedisServer(aof=True) as server:
        yield server
