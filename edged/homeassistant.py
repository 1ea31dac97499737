"""Home Assistant MQTT discovery: the entities edged's device and streams offer, as retained
``<prefix>/<component>/<node>/<object>/config`` messages (per-entity discovery, which every Home
Assistant release in use reads).

One Home Assistant device per edged device. Per stream: a count sensor per label it reports
(its ``labels``, else the labels its zones and lines name, else one count of all objects), a
presence binary sensor, a camera fed by the snapshot topic, a switch that pauses and resumes
it and a number for its threshold (both through the stream's ``set`` commands); per zone an
occupancy sensor per label; per line a count per label and direction. Device sensors: frames
per second and inference time per stream, CPU temperature, outbox depth. Every entity follows
edged's availability topic (its last will says "offline").

Unique ids are ``edged_<device>_<what>``: stable across restarts. The set published last is
kept in the state directory, so an entity whose stream, zone or line left the configuration
is removed (an empty retained config) even across a restart.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from edged import __version__
from edged.config import Config, StreamConfig

log = logging.getLogger(__name__)

DEVICE_SENSORS = {
    "cpu_temperature": ("CPU temperature", "temperature", "°C",
                        "{{ (value_json.process.temperature_c.values() | list | max) "
                        "if value_json.process.temperature_c else None }}"),
    "outbox": ("Outbox", None, "results",
               "{{ value_json.sinks | map(attribute='queued') | select('number') | sum }}"),
}


def _slug(*parts: str) -> str:
    return "_".join(p.replace("-", "_").replace(".", "_").replace(" ", "_").replace(",", "")
                    for p in parts)


class Discovery:
    """The discovery messages of one deployment, and what it takes to keep Home Assistant in
    step: ``messages()`` (topic -> payload), ``removed(previous)``; the MQTT sink publishes
    them on every connect and when Home Assistant announces itself."""

    def __init__(self, config: Config, state_dir: str | None = None) -> None:
        assert config.home_assistant is not None and config.mqtt is not None
        self.config = config
        self.prefix = config.home_assistant.prefix
        self.base = f"{config.mqtt.topic_prefix}/{config.device}"
        self.node = _slug("edged", config.device)
        self.record = record_path(state_dir) if state_dir else None

    @property
    def status_topic(self) -> str:
        """Where Home Assistant announces itself (its birth message: "online")."""
        return f"{self.prefix}/status"

    def messages(self) -> dict[str, bytes]:
        """Every discovery config, by topic."""
        entities: list[tuple[str, str, dict[str, Any]]] = []
        for key, (name, device_class, unit, template) in DEVICE_SENSORS.items():
            entities.append(("sensor", key, {
                "name": name, "state_topic": f"{self.base}/stats",
                "value_template": template, "unit_of_measurement": unit,
                "device_class": device_class, "state_class": "measurement",
                "entity_category": "diagnostic"}))
        for stream in self.config.streams:
            entities.extend(self._stream_entities(stream))
        device = {"identifiers": [self.node], "name": f"edged {self.config.device}",
                  "manufacturer": "edged", "model": "edge inference daemon",
                  "sw_version": __version__}
        out = {}
        for component, object_id, entity in entities:
            entity = {k: v for k, v in entity.items() if v is not None}
            unique = _slug(self.node, object_id)
            entity.update(unique_id=unique, object_id=unique, device=device,
                          availability_topic=f"{self.base}/availability")
            topic = f"{self.prefix}/{component}/{self.node}/{_slug(object_id)}/config"
            out[topic] = json.dumps(entity, separators=(",", ":")).encode()
        return out

    def _stream_entities(self, stream: StreamConfig) -> list[tuple[str, str, dict[str, Any]]]:
        name, base = stream.name, f"{self.base}/{stream.name}"
        result, stats = f"{base}/result", f"{self.base}/stats"
        entities: list[tuple[str, str, dict[str, Any]]] = [
            ("sensor", f"{name}_fps", {
                "name": f"{name} fps", "state_topic": stats, "unit_of_measurement": "fps",
                "value_template": f"{{{{ value_json.streams['{name}'].fps }}}}",
                "state_class": "measurement", "entity_category": "diagnostic"}),
            ("sensor", f"{name}_inference", {
                "name": f"{name} inference", "state_topic": stats, "unit_of_measurement": "ms",
                "device_class": "duration", "state_class": "measurement",
                "entity_category": "diagnostic",
                "value_template": f"{{{{ (value_json.streams['{name}'].latency_ms.inference "
                                  "or {}).mean }}"}),
            ("switch", f"{name}_running", {
                "name": f"{name} running", "command_topic": f"{base}/set",
                "payload_on": '{"resume": true}', "payload_off": '{"pause": true}',
                "state_topic": f"{base}/status", "state_on": "ON", "state_off": "OFF",
                "value_template": "{{ 'OFF' if value_json.paused else 'ON' }}",
                "icon": "mdi:play-pause"}),
            ("number", f"{name}_threshold", {
                "name": f"{name} threshold", "command_topic": f"{base}/set",
                "command_template": '{"threshold": {{ value }}}',
                "state_topic": f"{base}/meta", "value_template": "{{ value_json.threshold }}",
                "min": 0, "max": 1, "step": 0.05, "mode": "slider",
                "entity_category": "config"}),
        ]
        if stream.task != "detect":
            return entities
        labels = stream.labels or sorted(
            {label for zone in stream.zones.values() for label in zone.labels or []}
            | {label for line in stream.lines.values() for label in line.labels or []})
        for label in labels:
            entities.append(("sensor", f"{name}_{label}_count", {
                "name": f"{name} {label} count", "state_topic": result,
                "value_template": "{{ value_json.detections | selectattr('label', 'eq', '"
                                  f"{label}') | list | count }}}}",
                "state_class": "measurement", "icon": "mdi:counter"}))
        if not labels:
            entities.append(("sensor", f"{name}_count", {
                "name": f"{name} objects", "state_topic": result, "state_class": "measurement",
                "value_template": "{{ value_json.detections | count }}", "icon": "mdi:counter"}))
        wanted = ", ".join(f"'{label}'" for label in labels)
        present = (f"value_json.detections | selectattr('label', 'in', [{wanted}]) | list"
                   if labels else "value_json.detections")
        entities.append(("binary_sensor", f"{name}_presence", {
            "name": f"{name} presence", "state_topic": result, "device_class": "occupancy",
            "value_template": f"{{{{ 'ON' if ({present}) else 'OFF' }}}}"}))
        entities.append(("camera", f"{name}_snapshot", {
            "name": f"{name} snapshot", "topic": f"{base}/snapshot"}))
        for zone, settings in stream.zones.items():
            for label in settings.labels or labels or ["person"]:
                entities.append(("sensor", f"{name}_{zone}_{label}", {
                    "name": f"{name} {zone} {label}", "state_topic": f"{base}/zones/{zone}",
                    "value_template": f"{{{{ value_json.occupancy['{label}'] | default(0) }}}}",
                    "state_class": "measurement", "icon": "mdi:account-group"}))
        for line, settings in stream.lines.items():
            for label in settings.labels or labels or ["person"]:
                for direction in settings.directions:
                    entities.append(("sensor", f"{name}_{line}_{label}_{direction}", {
                        "name": f"{name} {line} {label} {direction}",
                        "state_topic": f"{base}/lines/{line}", "state_class": "total",
                        "value_template": f"{{{{ (value_json.counts['{label}'] | default({{}}))"
                                          f"['{direction}'] | default(0) }}}}",
                        "icon": "mdi:counter"}))
        return entities

    def removed(self, current: dict[str, bytes]) -> list[str]:
        """Topics published before (this run or a previous one) that ``current`` lacks; the
        record becomes ``current``."""
        return replace_record(self.record, current)


def replace_record(record: Path | None, current: dict[str, bytes]) -> list[str]:
    """The topics in ``record`` (the discovery topics published last) that ``current`` lacks;
    ``record`` then lists ``current``'s."""
    if record is None:
        return []
    try:
        previous = json.loads(record.read_text())
    except (OSError, ValueError):
        previous = []
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(current)))
        os.replace(tmp, record)
    except OSError as exc:
        log.warning("cannot keep the Home Assistant entity list in %s: %s", record,
                    exc.strerror or exc)
    return [t for t in previous if isinstance(t, str) and t not in current]


def record_path(state_dir: str) -> Path:
    """Where the topics published last are kept."""
    return Path(state_dir) / "homeassistant.json"
