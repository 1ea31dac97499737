"""The MQTT and stdout sinks against a real mosquitto broker and real paho subscribers."""

from __future__ import annotations

import io
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest
from helpers import wait_until
from helpers.broker import (  # noqa: F401 (fixtures)
    Mosquitto,
    Subscriber,
    free_port,
    mosquitto_fixture,
    mqtt_certs_fixture,
    private_mosquitto_fixture,
)
from paho.mqtt.enums import CallbackAPIVersion

from edged.config import Config, MqttConfig, SourceConfig, StreamConfig, TLSConfig
from edged.errors import EdgedError
from edged.sinks import open_sinks
from edged.sinks.mqtt import MqttSink
from edged.sinks.stdout import StdoutSink

RESULT = "edged/{device}/cam/result"
AVAILABILITY = "edged/{device}/availability"


class Sinks:
    """Makes sinks with fast reconnects and closes whatever a test left open."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.open: list[MqttSink] = []

    def __call__(self, config: MqttConfig, device: str, outbox: str = "outbox",
                 **kwargs: Any) -> MqttSink:
        sink = MqttSink(config, device, self.tmp_path / outbox, reconnect_min=0.1,
                        reconnect_max=0.5, **kwargs)
        sink.start()
        self.open.append(sink)
        return sink


@pytest.fixture
def make_sink(tmp_path: Path) -> Iterator[Sinks]:
    sinks = Sinks(tmp_path)
    yield sinks
    for sink in sinks.open:
        sink.close(timeout=0.5)



def sequences(sub: Subscriber, topic: str) -> list[int]:
    return [payload["sequence"] for payload in sub.json(topic)]


def first_occurrences(values: list[int]) -> list[int]:
    """The values in order of first arrival (QoS 1 may deliver a message twice)."""
    seen: set[int] = set()
    return [v for v in values if not (v in seen or seen.add(v))]


def test_results_arrive_in_order_with_qos1(mosquitto: Mosquitto, make_sink: Sinks) -> None:
    topic = RESULT.format(device="order")
    sub = Subscriber(mosquitto, topic)
    sink = make_sink(mosquitto.config(), "order")
    for i in range(300):
        sink.publish("cam/result", {"sequence": i})
    messages = sub.wait_count(topic, 300)
    assert [json.loads(m.payload)["sequence"] for m in messages] == list(range(300))
    assert {m.qos for m in messages} == {1}
    assert wait_until(lambda: sink.stats()["queued"] == 0)
    stats = sink.stats()
    assert stats["sent"] == 300 and stats["dropped"] == 0 and stats["connected"] is True
    sub.close()


def test_availability_status_and_meta_are_retained(mosquitto: Mosquitto,
                                                   make_sink: Sinks) -> None:
    sink = make_sink(mosquitto.config(), "avail")
    sink.publish("cam/status", {"state": "streaming"}, retain=True)
    sink.publish("cam/meta", {"task": "detect", "labels": ["person"]}, retain=True)
    assert wait_until(lambda: sink.connected)
    late = Subscriber(mosquitto, "edged/avail/#")  # subscribes after the fact: retained copies
    assert late.wait(lambda: len(late.messages) >= 3)
    retained = {m.topic: m.payload for m in late.messages if m.retain}
    assert retained["edged/avail/availability"] == b"online"
    assert json.loads(retained["edged/avail/cam/status"]) == {"state": "streaming"}
    assert json.loads(retained["edged/avail/cam/meta"])["task"] == "detect"

    sink.close()
    assert late.wait(lambda: late.on("edged/avail/availability")[-1].payload == b"offline")
    after = Subscriber(mosquitto, "edged/avail/availability")
    assert after.wait(lambda: bool(after.messages))
    assert after.messages[0].payload == b"offline" and after.messages[0].retain
    late.close()
    after.close()


def test_last_will_says_offline_when_the_process_dies(mosquitto: Mosquitto,
                                                      tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from edged.config import MqttConfig\n"
        "from edged.sinks.mqtt import MqttSink\n"
        "sink = MqttSink(MqttConfig(host='127.0.0.1', port=int(sys.argv[1]), keepalive=5),\n"
        "                'victim', sys.argv[2])\n"
        "sink.start()\n"
        "while not sink.connected:\n"
        "    time.sleep(0.01)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    topic = AVAILABILITY.format(device="victim")
    sub = Subscriber(mosquitto, topic)
    child = subprocess.Popen([sys.executable, "-c", script, str(mosquitto.port),
                              str(tmp_path / "outbox")], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
        assert sub.wait(lambda: [m.payload for m in sub.on(topic)] == [b"online"])
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=5)
        assert sub.wait(lambda: sub.on(topic)[-1].payload == b"offline", timeout=5)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    after = Subscriber(mosquitto, topic)
    assert after.wait(lambda: bool(after.messages))
    assert after.messages[0].payload == b"offline" and after.messages[0].retain
    sub.close()
    after.close()


def test_broker_restart_loses_no_result(private_mosquitto: Mosquitto, make_sink: Sinks) -> None:
    topic = RESULT.format(device="restart")
    sub = Subscriber(private_mosquitto, topic, persistent=True)
    sink = make_sink(private_mosquitto.config(), "restart")
    for i in range(20):
        sink.publish("cam/result", {"sequence": i})
    assert wait_until(lambda: sink.stats()["queued"] == 0)

    private_mosquitto.stop()
    assert wait_until(lambda: not sink.connected)
    for i in range(20, 120):  # published while the broker is away
        sink.publish("cam/result", {"sequence": i})
    assert sink.stats()["queued"] == 100
    private_mosquitto.start()
    sub.wait(lambda: len(set(sequences(sub, topic))) >= 120, timeout=15)
    received = sequences(sub, topic)
    assert first_occurrences(received) == list(range(120))
    assert received[:20] == list(range(20))
    assert wait_until(lambda: sink.stats()["queued"] == 0)
    stats = sink.stats()
    assert stats["reconnects"] == 1 and stats["dropped"] == 0 and stats["connected"]
    sub.close()


def test_outbox_survives_a_sink_restart(mosquitto: Mosquitto, make_sink: Sinks,
                                        tmp_path: Path) -> None:
    dead_broker = MqttConfig(host="127.0.0.1", port=free_port())
    first = make_sink(dead_broker, "survive")
    for i in range(40):
        first.publish("cam/result", {"sequence": i})
    first.close(timeout=0.2)
    assert first.stats()["queued"] == 40 and first.stats()["connected"] is False
    first.publish("cam/result", {"sequence": 999})  # after close: counted, not stored
    assert first.stats()["dropped"] == 1

    topic = RESULT.format(device="survive")
    sub = Subscriber(mosquitto, topic)
    second = make_sink(mosquitto.config(), "survive")  # same outbox directory
    sub.wait(lambda: len(sub.on(topic)) >= 40)
    assert sequences(sub, topic) == list(range(40))
    assert wait_until(lambda: second.stats()["queued"] == 0)
    assert len(list((tmp_path / "outbox").glob("*.seg"))) <= 1
    sub.close()


def test_full_outbox_drops_the_oldest(mosquitto: Mosquitto, make_sink: Sinks) -> None:
    dead_broker = MqttConfig(host="127.0.0.1", port=free_port(), outbox_max=10)
    first = make_sink(dead_broker, "full")
    for i in range(25):
        first.publish("cam/result", {"sequence": i})
    stats = first.stats()
    assert stats["queued"] == 10 and stats["dropped"] == 15
    first.close(timeout=0.1)

    topic = RESULT.format(device="full")
    sub = Subscriber(mosquitto, topic)
    make_sink(mosquitto.config(outbox_max=10), "full")
    sub.wait(lambda: len(sub.on(topic)) >= 10)
    assert sequences(sub, topic) == list(range(15, 25))
    sub.close()


@pytest.mark.parametrize("listener", ["auth", "tls", "mtls"])
def test_password_and_tls_listeners(mosquitto: Mosquitto, make_sink: Sinks, listener: str,
                                    caplog: pytest.LogCaptureFixture) -> None:
    device = f"secure-{listener}"
    topic = RESULT.format(device=device)
    sub = Subscriber(mosquitto, topic)
    with caplog.at_level(logging.DEBUG):
        sink = make_sink(mosquitto.config(listener), device)
        for i in range(5):
            sink.publish("cam/result", {"sequence": i})
        sub.wait(lambda: len(sub.on(topic)) >= 5)
    assert sequences(sub, topic) == list(range(5))
    assert mosquitto.password not in caplog.text
    sub.close()


def test_mutual_tls_needs_the_client_certificate(mosquitto: Mosquitto, make_sink: Sinks) -> None:
    """The mTLS listener takes the certificate's name as the user (an ACL can key on it) and
    refuses a client without one."""
    without = mosquitto.config("mtls")
    without = msgspec.structs.replace(without, tls=msgspec.structs.replace(
        without.tls, cert_file=None, key_file=None))
    sink = make_sink(without, "nocert")
    assert wait_until(lambda: sink.stats()["last_error"] is not None)
    assert not sink.connected


def test_wrong_password_is_a_clear_error(mosquitto: Mosquitto, make_sink: Sinks,
                                         caplog: pytest.LogCaptureFixture) -> None:
    config = mosquitto.config("tls", password="wrong-password")
    with caplog.at_level(logging.WARNING, logger="edged.mqtt"):
        sink = make_sink(config, "badpw")
        sink.publish("cam/result", {"sequence": 0})
        assert wait_until(lambda: sink.stats()["last_error"] is not None)
        time.sleep(0.6)  # several retries
    stats = sink.stats()
    assert "refused" in stats["last_error"] and "authorized" in stats["last_error"].lower()
    assert stats["connected"] is False and stats["queued"] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "edged.mqtt"]
    assert len(lines) == 1, lines  # reported once, not at every retry
    assert f"{mosquitto.host}:{mosquitto.tls_port}" in lines[0]
    assert "wrong-password" not in caplog.text


def test_unreadable_tls_file_is_one_line_error(tmp_path: Path) -> None:
    """A missing file is the configuration's problem (resolve_config); one that vanished or is
    not a certificate is still one line here."""
    (tmp_path / "garbage.crt").write_text("not a certificate\n")
    for name in ("nope.crt", "garbage.crt"):
        config = MqttConfig(tls=TLSConfig(ca_file=str(tmp_path / name)))
        with pytest.raises(EdgedError) as info:
            MqttSink(config, "dev", tmp_path / "outbox")
        assert str(info.value).startswith("mqtt.tls: cannot load the certificates: ")
        assert "\n" not in str(info.value)


def test_commands_reach_the_handler_and_get_replies(mosquitto: Mosquitto,
                                                    make_sink: Sinks) -> None:
    calls: list[tuple[str | None, bytes]] = []

    def handler(stream: str | None, payload: bytes) -> dict:
        calls.append((stream, payload))
        if payload == b"boom":
            raise ValueError("bad command")
        return {"ok": True, "stream": stream}

    sink = make_sink(mosquitto.config(), "cmd", on_command=handler)
    sub = Subscriber(mosquitto, "edged/cmd/#")
    assert wait_until(lambda: sink.connected)
    time.sleep(0.2)  # let the sink's subscription settle
    sub.client.publish("edged/cmd/cam/set", b'{"pause": true}', qos=1)
    sub.client.publish("edged/cmd/set", b'{"threshold": 0.4}', qos=1)
    sub.client.publish("edged/cmd/cam/set", b"boom", qos=1)
    assert sub.wait(lambda: len(sub.on("edged/cmd/cam/set/reply")) >= 2
                    and len(sub.on("edged/cmd/set/reply")) >= 1)
    assert calls == [("cam", b'{"pause": true}'), (None, b'{"threshold": 0.4}'),
                     ("cam", b"boom")]
    replies = sub.json("edged/cmd/cam/set/reply")
    assert replies[0] == {"ok": True, "stream": "cam"}
    assert replies[1] == {"ok": False, "error": "ValueError: bad command"}
    assert sub.json("edged/cmd/set/reply") == [{"ok": True, "stream": None}]

    # The failure left the sink working: results and further commands still flow.
    sink.publish("cam/result", {"sequence": 1})
    sub.client.publish("edged/cmd/cam/set", b"{}", qos=1)
    assert sub.wait(lambda: len(sub.on("edged/cmd/cam/set/reply")) >= 3
                    and len(sub.on("edged/cmd/cam/result")) >= 1)
    sub.close()


def test_retained_commands_are_refused(mosquitto: Mosquitto, make_sink: Sinks) -> None:
    calls: list[bytes] = []
    sub = Subscriber(mosquitto, "edged/keep/#")
    # Left retained on the broker before edged subscribes: it would come back at every connect.
    sub.client.publish("edged/keep/cam/set", b'{"pause": true}', qos=1, retain=True)
    time.sleep(0.2)
    sink = make_sink(mosquitto.config(), "keep",
                     on_command=lambda stream, payload: calls.append(payload) or {"ok": True})
    assert sub.wait(lambda: len(sub.on("edged/keep/cam/set/reply")) >= 1)
    assert calls == []
    assert "retained commands are refused" in sub.json("edged/keep/cam/set/reply")[0]["error"]
    # ... and its retained copy is cleared: a later subscriber finds none.
    late = Subscriber(mosquitto, "edged/keep/cam/set")
    time.sleep(0.3)
    assert not [m for m in late.messages if m.retain and m.payload]
    late.close()
    sub.client.publish("edged/keep/cam/set", b'{"resume": true}', qos=1)
    assert sub.wait(lambda: b'{"resume": true}' in calls)
    assert b'{"pause": true}' not in calls and sink.connected
    sub.close()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_command_retained_while_edged_listens(mosquitto: Mosquitto, make_sink: Sinks,
                                                protocol: str) -> None:
    """A retained command published while edged is connected reaches it with the retain flag
    cleared under MQTT 3.1.1 (the broker's rule): applied once, then its retained copy would
    return at the next connect, where it is refused and cleared. MQTT 5 keeps the flag as
    published: refused at once."""
    calls: list[bytes] = []
    device = f"live{protocol.replace('.', '')}"
    sink = make_sink(mosquitto.config(protocol=protocol), device,
                     on_command=lambda stream, payload: calls.append(payload) or {"ok": True})
    sub = Subscriber(mosquitto, f"edged/{device}/cam/set/reply")
    assert wait_until(lambda: sink.connected)
    time.sleep(0.3)  # the sink's subscription settles
    sub.client.publish(f"edged/{device}/cam/set", b'{"pause": true}', qos=1, retain=True)
    assert sub.wait(lambda: sub.on(f"edged/{device}/cam/set/reply"))
    if protocol == "5":
        assert calls == [] and not sub.json(f"edged/{device}/cam/set/reply")[0]["ok"]
    else:
        assert calls == [b'{"pause": true}']
        mosquitto.restart()  # the reconnect brings the retained copy: refused and cleared
        assert sub.wait(lambda: len(sub.on(f"edged/{device}/cam/set/reply")) >= 2, 15)
        assert calls == [b'{"pause": true}']
    late = Subscriber(mosquitto, f"edged/{device}/cam/set")
    time.sleep(0.3)
    assert not [m for m in late.messages if m.payload], "the retained command is still there"
    late.close()
    sub.close()


def test_a_broker_that_never_answers_connect_is_reported(make_sink: Sinks,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A server that accepts the TCP connection and says nothing: one line at the keepalive."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        config = MqttConfig(host="127.0.0.1", port=port, keepalive=5)
        with caplog.at_level(logging.WARNING, logger="edged.mqtt"):
            sink = make_sink(config, "silent")
            assert wait_until(lambda: sink.stats()["last_error"] is not None, 8)
        assert "no answer to CONNECT within 5 s" in sink.stats()["last_error"]
        assert [r for r in caplog.records if "no answer to CONNECT" in r.getMessage()]


def test_snapshots_and_stats_skip_the_outbox(mosquitto: Mosquitto, make_sink: Sinks) -> None:
    sub = Subscriber(mosquitto, "edged/snap/#")
    sink = make_sink(mosquitto.config(), "snap")
    assert wait_until(lambda: sink.connected)
    jpeg = b"\xff\xd8\xff\xe0fake-but-binary\xff\xd9"
    sink.publish("cam/snapshot", jpeg)
    sink.publish("stats", {"fps": 9.5})
    assert sub.wait(lambda: bool(sub.on("edged/snap/cam/snapshot") and sub.on("edged/snap/stats")))
    assert sub.on("edged/snap/cam/snapshot")[0].payload == jpeg
    assert sub.json("edged/snap/stats") == [{"fps": 9.5}]
    assert sink.stats()["queued"] == 0 and sink.stats()["sent"] == 0
    with pytest.raises(EdgedError, match="invalid topic"):
        sink.publish("cam/#", {})
    sub.close()


def test_stdout_sink_writes_json_lines() -> None:
    out = io.StringIO()
    sink = StdoutSink("dev", "edged", stream=out)
    sink.publish("cam/result", {"sequence": 3, "labels": ["person"]})
    sink.publish("cam/status", {"state": "streaming"}, retain=True)
    sink.publish("cam/snapshot", b"\xff\xd8binary")
    sink.close()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines == [
        {"topic": "edged/dev/cam/result", "payload": {"sequence": 3, "labels": ["person"]}},
        {"topic": "edged/dev/cam/status", "payload": {"state": "streaming"}, "retain": True},
    ]
    assert sink.stats() == {"written": 2, "skipped_binary": 1}


def test_stdout_sink_survives_a_closed_pipe(caplog: pytest.LogCaptureFixture) -> None:
    out = io.StringIO()
    sink = StdoutSink("dev", stream=out)
    out.close()
    with caplog.at_level(logging.WARNING, logger="edged.stdout"):
        sink.publish("cam/result", {"sequence": 0})
        sink.publish("cam/result", {"sequence": 1})
    assert len(caplog.records) == 1 and "output closed" in caplog.records[0].getMessage()
    assert sink.stats()["written"] == 0
    sink.close()


def test_open_sinks_builds_what_the_config_asks(mosquitto: Mosquitto, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    config = Config(
        device="factory",
        streams=[StreamConfig(name="cam", source=SourceConfig(uri="x.mp4"), task="detect")],
        mqtt=mosquitto.config(),
        stdout=True,
        state_dir=str(tmp_path),
    )
    topic = RESULT.format(device="factory")
    sub = Subscriber(mosquitto, topic)
    sinks = open_sinks(config)
    assert [type(s) for s in sinks] == [MqttSink, StdoutSink]
    for sink in sinks:
        sink.publish("cam/result", {"sequence": 7})
    assert sub.wait(lambda: bool(sub.on(topic)))
    for sink in sinks:
        sink.close()
    assert (tmp_path / "outbox" / "acked").exists()
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line == {"topic": topic, "payload": {"sequence": 7}}
    assert sequences(sub, topic) == [7]
    sub.close()


def test_mqtt5_expiry_schema_and_request_response(mosquitto: Mosquitto, make_sink: Sinks) -> None:
    """With protocol 5: a result expires when the outbox would have dropped it and names its
    schema; a command asking for a response (response topic + correlation data) gets one."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    got: list[Any] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                         client_id="test-v5")
    client.on_message = lambda c, u, message: got.append(message)
    client.connect(mosquitto.host, mosquitto.port)
    client.subscribe([("edged/v5/cam/result", 1), ("answers/me", 1)])
    client.loop_start()
    try:
        sink = make_sink(mosquitto.config(protocol="5", outbox_max_age=3600), "v5",
                         on_command=lambda stream, payload: {"ok": True, "stream": stream})
        assert wait_until(lambda: sink.connected)
        time.sleep(0.3)
        sink.publish("cam/result", {"sequence": 1})
        assert wait_until(lambda: any(m.topic == "edged/v5/cam/result" for m in got))
        result = next(m for m in got if m.topic == "edged/v5/cam/result")
        assert ("schema", "1") in result.properties.UserProperty
        assert 3590 <= result.properties.MessageExpiryInterval <= 3600
        ask = Properties(PacketTypes.PUBLISH)
        ask.ResponseTopic, ask.CorrelationData = "answers/me", b"req-42"
        client.publish("edged/v5/cam/set", b'{"pause": true}', qos=1, properties=ask)
        assert wait_until(lambda: any(m.topic == "answers/me" for m in got))
        answer = next(m for m in got if m.topic == "answers/me")
        assert answer.properties.CorrelationData == b"req-42"
        assert json.loads(answer.payload) == {"ok": True, "stream": "cam"}
    finally:
        client.loop_stop()
        client.disconnect()
