"""Home Assistant MQTT discovery: what edged announces on a real broker (retained, stable ids,
removed when the configuration drops an entity, again when Home Assistant comes back)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import skimage.data
from helpers.broker import Subscriber
from helpers.daemon import write_config

from edged.config import load_config
from edged.homeassistant import Discovery
from edged.server import Server

if TYPE_CHECKING:
    from helpers.broker import Mosquitto
    from helpers.homeassistant import HomeAssistant

pytest_plugins = ["helpers.broker", "helpers.homeassistant"]


def deployment(tmp_path: Path, broker: Mosquitto, model: Path, images: Path,
               streams: tuple[str, ...] = ("porch", "gate")) -> dict:
    return {
        "device": "ha-pi", "state_dir": str(tmp_path / "state"), "stats_interval": 1,
        "mqtt": {"host": broker.host, "port": broker.port, "keepalive": 5},
        "home_assistant": {},
        "streams": [{"name": name, "task": "detect", "model": str(model), "fps": 2,
                     "labels": ["person", "car"],
                     "zones": {"drive": {"polygon": [[0, 0], [1, 0], [1, 1]]}},
                     "lines": {"gate": {"points": [[0.5, 0], [0.5, 1]]}},
                     "source": {"uri": str(images), "loop": True}} for name in streams],
    }


def configs(sub: Subscriber) -> dict[str, bytes]:
    """The latest discovery message per topic."""
    latest: dict[str, bytes] = {}
    for message in list(sub.messages):
        if message.topic.startswith("homeassistant/") and message.topic.endswith("/config"):
            latest[message.topic] = message.payload
    return latest


def test_discovery_on_a_real_broker(tmp_path: Path, mosquitto: Mosquitto,
                                    converted_model) -> None:
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "astronaut.png"), np.ascontiguousarray(
        skimage.data.astronaut()[..., ::-1]))
    model = converted_model("ssd_mobilenet_v2_coco")
    path = write_config(tmp_path, deployment(tmp_path, mosquitto, model, images))
    sub = Subscriber(mosquitto, "homeassistant/#")
    server = Server(load_config(path), path)
    try:
        server.start()
        expected = set(Discovery(server.config).messages())
        assert len(expected) > 20
        assert sub.wait(lambda: set(configs(sub)) == expected, 15), set(configs(sub)) ^ expected
        announced = {t: json.loads(p) for t, p in configs(sub).items()}
        ids = [c["unique_id"] for c in announced.values()]
        assert len(ids) == len(set(ids)), "unique ids repeat"
        assert {c["availability_topic"] for c in announced.values()} == {
            "edged/ha-pi/availability"}
        kinds = {t.split("/")[1] for t in announced}
        assert kinds == {"sensor", "binary_sensor", "camera", "switch", "number"}
        porch = "homeassistant/sensor/edged_ha_pi/porch_person_count/config"
        assert announced[porch]["state_topic"] == "edged/ha-pi/porch/result"
        assert "homeassistant/sensor/edged_ha_pi/porch_gate_car_out/config" in announced
        assert announced["homeassistant/switch/edged_ha_pi/porch_running/config"][
            "command_topic"] == "edged/ha-pi/porch/set"

        # A late subscriber (Home Assistant starting after edged) finds them retained.
        late = Subscriber(mosquitto, "homeassistant/#")
        assert late.wait(lambda: set(configs(late)) == set(announced), 10), (
            set(configs(late)) ^ set(announced))
        late.close()

        # Home Assistant announces itself: everything is published again.
        before = len(sub.messages)
        sub.client.publish("homeassistant/status", "online", qos=1)
        assert sub.wait(lambda: len(sub.messages) >= before + len(announced), 10)

        # A stream leaves the configuration: its entities are removed (empty retained config).
        write_config(tmp_path, deployment(tmp_path, mosquitto, model, images, ("porch",)))
        assert server.reload()
        gate = [t for t in announced if "/gate_" in t]
        assert gate and sub.wait(lambda: all(configs(sub)[t] == b"" for t in gate), 10)
        assert configs(sub)[porch] != b""
    finally:
        server.stop()
        sub.close()

    # Across a restart: the list of what was announced is kept, so what a new configuration
    # lacks is removed even by a fresh edged.
    write_config(tmp_path, {**deployment(tmp_path, mosquitto, model, images, ("porch",)),
                            "home_assistant": None})
    sub = Subscriber(mosquitto, "homeassistant/#")
    server = Server(load_config(path), path)
    try:
        server.start()
        porch_topics = [t for t in announced if "/porch_" in t or "edged_ha_pi/cpu" in t]
        assert sub.wait(lambda: all(configs(sub).get(t) == b"" for t in porch_topics), 10)
    finally:
        server.stop()
        sub.close()


def test_a_real_home_assistant_shows_and_drives_edged(tmp_path: Path, mosquitto: Mosquitto,
                                                     homeassistant: HomeAssistant,
                                                     converted_model) -> None:
    """Home Assistant 2024.3.3, headless on loopback, its MQTT integration on the test broker:
    edged's entities appear, a person count of 1 on a frame with one person, and the switch
    toggled in Home Assistant pauses the stream."""
    ha = homeassistant
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "astronaut.png"), np.ascontiguousarray(
        skimage.data.astronaut()[..., ::-1]))
    data = deployment(tmp_path, mosquitto, converted_model("ssd_mobilenet_v2_coco"), images,
                      ("porch",))
    data["device"] = "ha-real"
    path = write_config(tmp_path, data)
    server = Server(load_config(path), path)
    try:
        server.start()
        count = ha.wait_for(lambda: ha.entity_id("edged_ha_real_porch_person_count"), 30,
                            "the person count appears")
        assert count == "sensor.edged_ha_real_porch_person_count"
        ha.wait_for(lambda: ha.state(count)["state"] == "1", 30, "one person counted")
        presence = ha.entity_id("edged_ha_real_porch_presence")
        ha.wait_for(lambda: ha.state(presence)["state"] == "on", 20, "presence is on")
        switch = ha.entity_id("edged_ha_real_porch_running")
        ha.wait_for(lambda: ha.state(switch)["state"] == "on", 20, "the stream runs")
        for unique in ("edged_ha_real_porch_threshold", "edged_ha_real_porch_snapshot",
                       "edged_ha_real_porch_drive_person", "edged_ha_real_porch_gate_car_in",
                       "edged_ha_real_cpu_temperature", "edged_ha_real_outbox",
                       "edged_ha_real_porch_fps"):
            assert ha.entity_id(unique), unique
        threshold = ha.entity_id("edged_ha_real_porch_threshold")
        ha.wait_for(lambda: ha.state(threshold)["state"] == "0.5", 20, "the threshold shows")

        ha.call_service("switch", "turn_off", {"entity_id": switch})
        pipeline = server.streams["porch"].pipeline
        ha.wait_for(lambda: pipeline.paused, 10, "the stream is paused")
        ha.wait_for(lambda: ha.state(switch)["state"] == "off", 10, "the switch shows off")
        ha.call_service("number", "set_value", {"entity_id": threshold, "value": 0.7})
        ha.wait_for(lambda: pipeline.config.threshold == 0.7, 10, "the threshold is 0.7")
        assert "ERROR" not in ha.log(500), ha.log()
    finally:
        server.stop()
    # edged's last word: every entity unavailable.
    ha.wait_for(lambda: ha.state(count)["state"] == "unavailable", 20, "unavailable")
