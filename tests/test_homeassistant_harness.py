"""The Home Assistant harness end to end, no edged code involved: MQTT discovery messages
published to the test broker become entities in a real Home Assistant (2024.3.3), a service call
there comes back as an MQTT command, and an empty retained config removes the entity."""

from __future__ import annotations

import json
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from helpers.broker import Mosquitto, Subscriber
from helpers.homeassistant import HomeAssistant
from paho.mqtt.enums import CallbackAPIVersion

pytest_plugins = ["helpers.broker", "helpers.homeassistant"]

DEVICE = {"identifiers": ["edged-harness-device"], "name": "Edged Harness",
          "manufacturer": "edged tests", "model": "harness"}
SENSOR_CONFIG = "homeassistant/sensor/edged-harness/count/config"
SWITCH_CONFIG = "homeassistant/switch/edged-harness/paused/config"


def publish(broker: Mosquitto, topic: str, payload: str | bytes, retain: bool = False) -> None:
    """One QoS 1 message, delivered to the broker before this returns."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="edged-harness-publisher")
    client.connect(broker.host, broker.port, keepalive=10)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture
def discovered(mosquitto: Mosquitto, homeassistant: HomeAssistant) -> Iterator[int]:
    """The sensor and the switch, announced; removed again afterwards. Gives the log mark
    taken before the announcement (for ``wait_subscribed``)."""
    mark = homeassistant.log_mark()
    publish(mosquitto, SENSOR_CONFIG, json.dumps({
        "name": "Count", "unique_id": "edged-harness-count", "state_topic": "edged-test/count",
        "device": DEVICE}), retain=True)
    publish(mosquitto, SWITCH_CONFIG, json.dumps({
        "name": "Paused", "unique_id": "edged-harness-paused",
        "command_topic": "edged-test/paused/set", "state_topic": "edged-test/paused",
        "payload_on": "PAUSE", "payload_off": "RESUME", "state_on": "PAUSE",
        "state_off": "RESUME", "device": DEVICE}), retain=True)
    yield mark
    for topic in (SENSOR_CONFIG, SWITCH_CONFIG):
        publish(mosquitto, topic, b"", retain=True)
    # Gone before the next test announces them again.
    homeassistant.wait_for(lambda: not {"sensor.edged_harness_count", "switch.edged_harness_paused"}
                           & {s["entity_id"] for s in homeassistant.states()}, 10,
                           "the harness entities are removed")


def test_discovered_sensor_shows_published_state(mosquitto: Mosquitto,
                                                 homeassistant: HomeAssistant,
                                                 discovered: int) -> None:
    ha = homeassistant
    # has_entity_name: "<device name> <entity name>" slugified.
    sensor = ha.wait_for(lambda: ha.state("sensor.edged_harness_count"), 20,
                         "sensor.edged_harness_count appears")
    assert sensor["state"] == "unknown"
    assert sensor["attributes"]["friendly_name"] == "Edged Harness Count"
    assert ha.entity_id("edged-harness-count") == "sensor.edged_harness_count"

    ha.wait_subscribed("edged-test/count", since=discovered)
    publish(mosquitto, "edged-test/count", "1")
    ha.wait_for(lambda: ha.state("sensor.edged_harness_count")["state"] == "1", 10,
                "sensor.edged_harness_count is 1")

    device = next(d for d in ha.ws("config/device_registry/list")
                  if ["mqtt", "edged-harness-device"] in d["identifiers"])
    assert (device["name"], device["manufacturer"], device["model"]) == (
        "Edged Harness", "edged tests", "harness")
    assert "ERROR" not in ha.log(500), ha.log()


def test_switch_service_call_publishes_command(mosquitto: Mosquitto,
                                               homeassistant: HomeAssistant,
                                               discovered: int) -> None:
    ha = homeassistant
    ha.wait_for(lambda: ha.state("switch.edged_harness_paused"), 20,
                "switch.edged_harness_paused appears")
    ha.wait_subscribed("edged-test/paused", since=discovered)
    publish(mosquitto, "edged-test/paused", "PAUSE")
    ha.wait_for(lambda: ha.state("switch.edged_harness_paused")["state"] == "on", 10,
                "switch.edged_harness_paused is on")

    commands = Subscriber(mosquitto, "edged-test/paused/set")
    try:
        ha.call_service("switch", "turn_off", {"entity_id": "switch.edged_harness_paused"})
        received = commands.wait_count("edged-test/paused/set", 1, timeout=10)
        assert [m.payload for m in received] == [b"RESUME"], ha.log()
    finally:
        commands.close()
    # Not optimistic (it has a state topic): the state follows the device, not the command.
    assert ha.state("switch.edged_harness_paused")["state"] == "on"
    publish(mosquitto, "edged-test/paused", "RESUME")
    ha.wait_for(lambda: ha.state("switch.edged_harness_paused")["state"] == "off", 10,
                "switch.edged_harness_paused is off")


def test_empty_retained_config_removes_the_entity(mosquitto: Mosquitto,
                                                  homeassistant: HomeAssistant,
                                                  discovered: int) -> None:
    ha = homeassistant
    for entity_id in ("sensor.edged_harness_count", "switch.edged_harness_paused"):
        ha.wait_for(lambda entity_id=entity_id: ha.state(entity_id), 20, f"{entity_id} appears")
    publish(mosquitto, SENSOR_CONFIG, b"", retain=True)
    ha.wait_for(lambda: ha.state("sensor.edged_harness_count") is None, 10,
                "sensor.edged_harness_count is removed")
    assert ha.entity_id("edged-harness-count") is None
    assert not [s for s in ha.states() if s["entity_id"] == "sensor.edged_harness_count"]
    # The switch of the same device stays.
    assert ha.state("switch.edged_harness_paused") is not None


def test_home_assistant_stays_on_loopback(homeassistant: HomeAssistant) -> None:
    assert homeassistant.network_attempts() == []
