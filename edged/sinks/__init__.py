"""Where results go: the ``Sink`` interface and the factory that builds a deployment's sinks.

A sink takes a topic suffix relative to ``<prefix>/<device>/`` (``"cam1/result"``,
``"cam1/status"``, ``"stats"``) and a payload (a dict, sent as compact JSON, or raw bytes such as
a JPEG snapshot). The topic contract is in docs/mqtt.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, Protocol

from edged.config import Config

# (stream name or None for device-wide commands, raw payload) -> reply dict to publish.
CommandHandler = Callable[[str | None, bytes], dict[str, Any]]


class Sink(Protocol):
    """One destination for results. ``publish`` never blocks on the network."""

    def publish(self, topic_suffix: str, payload: bytes | dict, retain: bool = False) -> None:
        """Send ``payload`` to ``<prefix>/<device>/<topic_suffix>``."""

    def close(self) -> None:
        """Flush what can be flushed quickly and release resources."""

    def stats(self) -> dict[str, Any]:
        """Counters for the daemon's stats message."""


def encode_payload(payload: bytes | dict) -> bytes:
    """A payload as bytes: dicts become compact JSON, bytes pass through."""
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return json.dumps(payload, separators=(",", ":")).encode()


def open_sinks(config: Config, on_command: CommandHandler | None = None) -> list[Sink]:
    """The started sinks a deployment asks for: MQTT when ``config.mqtt`` is set, stdout when
    ``config.stdout`` is. The MQTT sink connects in the background (a down broker never blocks)."""
    from edged.sinks.mqtt import MqttSink
    from edged.sinks.stdout import StdoutSink

    sinks: list[Sink] = []
    if config.mqtt is not None:
        outbox_dir = config.mqtt.outbox_dir or os.path.join(config.state_dir, "outbox")
        mqtt_sink = MqttSink(config.mqtt, config.device, outbox_dir, on_command=on_command)
        mqtt_sink.start()
        sinks.append(mqtt_sink)
    if config.stdout:
        prefix = config.mqtt.topic_prefix if config.mqtt is not None else "edged"
        sinks.append(StdoutSink(config.device, prefix))
    return sinks
