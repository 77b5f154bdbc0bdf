"""Broker.reconfigure: the settings mpubsubd's reload changes while the broker serves."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from mpubsub import Broker, NetPubSub

from .conftest import wait_closed, wait_for


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[Broker]:
    """A broker serving in a thread of this process, stopped at the end."""
    # A handshake timeout far above the tests' waits: a cap, not the timeout, must act.
    broker = Broker(str(tmp_path / "broker.sock"), b"k" * 16, timeout=120)
    thread = threading.Thread(target=broker.start, daemon=True)
    thread.start()
    try:
        yield broker
    finally:
        broker.stop()
        thread.join(10)


def reconfigured(broker: Broker, **changes: Any) -> None:
    """reconfigure(**changes) in the broker's loop; back once it ran there."""
    done = threading.Event()

    def change() -> None:
        broker.reconfigure(**changes)
        done.set()

    broker.schedule(change)
    assert done.wait(10)


def test_bad_values_change_nothing(tmp_path: Path) -> None:
    """What the constructor refuses, reconfigure refuses, and keeps what it had."""
    broker = Broker(
        str(tmp_path / "broker.sock"), b"k" * 16, max_message_size=1000, max_topic_size=100
    )
    try:
        with pytest.raises(ValueError, match="max_buffer must be at least max_message_size"):
            broker.reconfigure(max_buffer=999, max_connections=5)
        with pytest.raises(ValueError, match="max_connections must be at least 1"):
            broker.reconfigure(max_connections=0)
        with pytest.raises(TypeError, match="max_message_size"):
            broker.reconfigure(max_message_size=10)  # announced to clients: not live
        assert broker._clients.settings.max_connections != 5
        broker.reconfigure(max_connections=5)
        assert broker._clients.settings.max_connections == 5
    finally:
        broker.close()


def test_a_new_handshake_cap_holds_for_the_next_peer(serving: Broker) -> None:
    """max_handshakes_per_peer lowered to 1: a second connection still authenticating
    from the same user closes the first, as the cap says."""
    reconfigured(serving, max_handshakes_per_peer=1)
    first = socket.socket(socket.AF_UNIX)
    second = socket.socket(socket.AF_UNIX)
    with first, second:
        first.connect(serving.address)
        assert first.recv(1)  # accepted: the challenge begins
        second.connect(serving.address)
        wait_closed(first, what="the first handshake to make room")


def test_a_smaller_route_cache_starts_afresh(
    serving: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """route_cache_bytes lowered: routes past it make the cache start afresh, said at INFO."""
    caplog.set_level(logging.INFO, "mpubsub.broker")
    reconfigured(serving, route_cache_bytes=64)
    with NetPubSub(serving.address, b"k" * 16) as pubsub:
        for number in range(50):
            pubsub.publish(("topic", str(number)), n=number)
        assert pubsub.flush()
    wait_for(lambda: "starting afresh" in caplog.text, what="the cache's line")
