"""The MQTT sink: results through the on-disk outbox, retained status/meta, availability, commands.

Threads: the MQTT client's network thread (``loop_start``) runs the callbacks; one sender
thread moves results from the outbox to the client, at most ``max_inflight`` unacknowledged at a
time, and removes each from the outbox once the broker acknowledged it (PUBACK for QoS 1; for
QoS 0 once written to the socket). Callbacks never take a lock that is held while calling into
the client, so the two threads cannot deadlock.

Order across reconnects: the client re-sends its unacknowledged messages right after a new
CONNACK, so after a reconnect the sender sends nothing new until the oldest of those is
acknowledged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edged.config import MqttConfig
from edged.errors import EdgedError
from edged.outbox import Entry, Outbox
from edged.results import SCHEMA_VERSION
from edged.sinks import CommandHandler, encode_payload

log = logging.getLogger("edged.mqtt")

QUEUED = ("result", "events")  # the topic levels whose messages go through the outbox
SET = "set"  # command topic level; replies go to ".../set/reply"


class MqttSink:
    """Publishes to ``<prefix>/<device>/...`` on the configured broker (see docs/mqtt.md).

    ``start()`` connects in the background and never blocks; results published while the broker
    is away wait in the outbox at ``outbox_dir`` (which also outlives a restart of the process).
    """

    def __init__(self, config: MqttConfig, device: str, outbox_dir: str | os.PathLike, *,
                 on_command: CommandHandler | None = None, max_inflight: int = 16,
                 reconnect_min: float = 1.0, reconnect_max: float = 30.0) -> None:
        self.config = config
        self.device = device
        self.prefix = f"{config.topic_prefix}/{device}"
        self.availability_topic = f"{self.prefix}/availability"
        self._on_command = on_command
        self._max_inflight = max_inflight
        self._outbox = Outbox(outbox_dir, config.outbox_max, max_bytes=config.outbox_max_mb << 20,
                              max_age=config.outbox_max_age, full=config.outbox_full)
        self._retained: dict[str, bytes] = {}  # topic -> latest retained payload, resent on connect
        self._watched: dict[str, Callable[[bytes], None]] = {}  # topic -> callback (watch())
        self._retained_lock = threading.Lock()
        self._acked_mids: set[int] = set()  # filled by the network thread, drained by the sender
        self._acked_lock = threading.Lock()
        self._kick = threading.Event()  # wakes the sender
        self._stop = threading.Event()
        self._sender: threading.Thread | None = None
        self._connected = False
        self._generation = 0  # successful connections so far
        self._closing = False
        self._sent = 0
        self._lost = 0  # results the outbox could not store
        self._lost_streak = False
        self._inflight_count = 0
        self._last_error: str | None = None
        self._client = self._build_client(reconnect_min, reconnect_max)

    # -- setup ------------------------------------------------------------------------------

    def _build_client(self, reconnect_min: float, reconnect_max: float) -> mqtt.Client:
        config = self.config
        protocol = mqtt.MQTTv5 if config.protocol == "5" else mqtt.MQTTv311
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=protocol,
                             client_id=config.client_id or f"edged-{self.device}")
        client.suppress_exceptions = True  # a bug in a callback must not end the network thread
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        if config.tls is not None:
            tls = config.tls  # its files were checked when the configuration was resolved
            try:
                client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file,
                               keyfile=tls.key_file)
            except (ssl.SSLError, OSError) as exc:
                raise EdgedError(f"mqtt.tls: cannot load the certificates: {exc}") from None
            client.tls_insecure_set(tls.insecure)
        client.will_set(self.availability_topic, "offline", qos=1, retain=True)
        client.reconnect_delay_set(reconnect_min, reconnect_max)
        client.max_inflight_messages_set(0)  # the sender bounds what is in flight
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        return client

    def start(self) -> None:
        """Connect in the background and start sending; returns at once."""
        self._client.connect_async(self.config.host, self.config.port, self.config.keepalive)
        self._client.loop_start()
        self._sender = threading.Thread(target=self._send_loop, name="edged-mqtt-sender",
                                        daemon=True)
        self._sender.start()

    # -- the Sink interface ---------------------------------------------------------------------

    def publish(self, topic_suffix: str, payload: bytes | dict, retain: bool = False) -> None:
        """Results and events (``<stream>/result``, ``<stream>/events``) go to the outbox and
        are sent in order with the configured QoS; retained messages are remembered and resent
        on every connect; anything else (snapshots, stats) is sent at QoS 0 when connected and
        skipped otherwise."""
        if not topic_suffix or any(c in topic_suffix for c in "+#\0"):
            raise EdgedError(f"mqtt: invalid topic suffix {topic_suffix!r}")
        topic = f"{self.prefix}/{topic_suffix}"
        data = encode_payload(payload)
        if topic_suffix.rsplit("/", 1)[-1] in QUEUED:
            try:
                self._outbox.append(topic, data, self.config.qos)
            except EdgedError as exc:
                if not self._lost_streak:  # once per failing stretch, not per result
                    log.warning("%s", exc)
                self._lost += 1
                self._lost_streak = True
                return
            self._lost_streak = False
            self._kick.set()
            return
        if retain:
            self.publish_retained(topic, data)
        elif self._connected:
            self._client.publish(topic, data, qos=0)

    def publish_retained(self, topic: str, data: bytes) -> None:
        """Publish a retained message on any topic (not only under the device's prefix, e.g.
        Home Assistant's discovery), again after every reconnect."""
        with self._retained_lock:
            self._retained[topic] = data
        if self._connected:
            self._client.publish(topic, data, qos=1, retain=True)

    def watch(self, topic: str, callback: Callable[[bytes], None]) -> None:
        """Call ``callback(payload)`` (on the network thread: keep it quick) for each message
        on ``topic``; subscribed on every connect."""
        self._watched[topic] = callback
        if self._connected:
            self._client.subscribe(topic, 1)

    def close(self, timeout: float = 2.0) -> None:
        """Deliver what the broker takes within ``timeout`` seconds, publish "offline", disconnect.

        Results not delivered by then stay in the outbox for the next start."""
        if self._closing:
            return
        self._closing = True
        deadline = time.monotonic() + timeout
        while self._connected and len(self._outbox) and time.monotonic() < deadline:
            self._kick.set()
            time.sleep(0.02)
        self._stop.set()
        self._kick.set()
        if self._sender is not None:
            self._sender.join(timeout)
        if self._connected:
            info = self._client.publish(self.availability_topic, "offline", qos=1, retain=True)
            # Losing the connection meanwhile is fine: the broker then sends the will instead.
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        self._client.disconnect()
        self._client.loop_stop()
        self._outbox.close()

    def stats(self) -> dict[str, Any]:
        """Counters: results delivered, waiting in the outbox, lost (``dropped``: for any reason,
        ``expired`` and ``quarantined`` among them); connection state."""
        outbox = self._outbox
        age = outbox.oldest_age()
        return {
            "connected": self._connected,
            "sent": self._sent,
            "queued": len(outbox),
            "queued_bytes": outbox.nbytes,
            "oldest_age_s": None if age is None else round(age, 1),
            "inflight": self._inflight_count,
            "dropped": (outbox.dropped + outbox.expired + outbox.corrupt + outbox.quarantined
                        + self._lost),
            "expired": outbox.expired,
            "quarantined": outbox.quarantined,
            "reconnects": max(0, self._generation - 1),
            "last_error": self._last_error,
        }

    @property
    def connected(self) -> bool:
        """Whether the broker accepted the current connection."""
        return self._connected

    # -- network-thread callbacks ---------------------------------------------------------------

    def _report(self, message: str) -> None:
        """Log a connection problem once, not at every retry."""
        if message != self._last_error:
            log.warning("mqtt %s:%d: %s", self.config.host, self.config.port, message)
        self._last_error = message

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                    reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._report(f"connection refused: {reason_code}")
            return
        self._last_error = None
        self._connected = True
        self._generation += 1
        log.info("mqtt %s:%d: connected", self.config.host, self.config.port)
        client.publish(self.availability_topic, "online", qos=1, retain=True)
        with self._retained_lock:
            retained = list(self._retained.items())
        for topic, data in retained:
            client.publish(topic, data, qos=1, retain=True)
        if self._on_command is not None:
            # MQTT 5 keeps the retain flag of a message as published (3.1.1 clears it for a
            # subscriber that was connected when it came): a retained command is always seen.
            options = SubscribeOptions(qos=1, retainAsPublished=True) \
                if self.config.protocol == "5" else 1
            client.subscribe([(f"{self.prefix}/{SET}", options),
                              (f"{self.prefix}/+/{SET}", options)])
        for topic in list(self._watched):
            client.subscribe(topic, 1)
        self._kick.set()

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # A broker that accepts the connection but never answers CONNECT leaves paho waiting
        # without a word: say so once the keepalive has passed.
        generation = self._generation
        timer = threading.Timer(self.config.keepalive, self._check_answered, (generation,))
        timer.daemon = True
        timer.start()

    def _check_answered(self, generation: int) -> None:
        if self._generation == generation and not self._connected and not self._closing:
            self._report(f"no answer to CONNECT within {self.config.keepalive} s (the broker "
                         "accepted the connection but says nothing), retrying")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._report("cannot reach the broker, retrying")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason_code: Any, properties: Any) -> None:
        was_connected, self._connected = self._connected, False
        if was_connected and not self._closing:
            self._report(f"disconnected ({reason_code}), retrying")
        self._kick.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int,
                    reason_code: Any, properties: Any) -> None:
        with self._acked_lock:
            self._acked_mids.add(mid)
        self._kick.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        watcher = self._watched.get(message.topic)
        if watcher is not None:
            try:
                watcher(message.payload)
            except Exception:  # a broken watcher must never stop the network thread
                log.exception("mqtt: handling %s failed", message.topic)
            return
        levels = message.topic[len(self.prefix) + 1:].split("/")
        stream = levels[0] if len(levels) == 2 else None
        if not message.payload:
            return  # an empty message clears a retained one: never a command
        if message.retain:
            # A retained command would be applied again at every reconnect (undoing a later
            # "resume", say): commands are one-shot, so a retained one is refused, and its
            # retained copy cleared so that it cannot come back.
            log.warning("mqtt: refusing a retained command on %s (and clearing it)",
                        message.topic)
            client.publish(message.topic, b"", qos=1, retain=True)
            client.publish(f"{message.topic}/reply", encode_payload(
                {"ok": False, "error": "retained commands are refused; publish without retain"}),
                qos=1)
            return
        try:
            reply = self._on_command(stream, message.payload)  # type: ignore[misc]
            if not isinstance(reply, dict):
                raise TypeError(f"the command handler returned {type(reply).__name__}, not dict")
            data = encode_payload(reply)
        except Exception as exc:  # a failing command must never stop the network thread
            log.warning("mqtt command on %s failed: %s: %s", message.topic,
                        type(exc).__name__, exc)
            data = encode_payload({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        client.publish(f"{message.topic}/reply", data, qos=1)
        request = getattr(message, "properties", None)
        response_topic = getattr(request, "ResponseTopic", None)
        if response_topic:  # MQTT 5 request / response: the asker names where, and what to echo
            properties = Properties(PacketTypes.PUBLISH)
            correlation = getattr(request, "CorrelationData", None)
            if correlation is not None:
                properties.CorrelationData = correlation
            client.publish(response_topic, data, qos=1, properties=properties)

    # -- the sender thread ----------------------------------------------------------------------

    def _send_loop(self) -> None:
        inflight: deque[tuple[int, int]] = deque()  # (outbox id, client message id), oldest first
        acked: set[int] = set()
        generation = 0
        hold = False  # after a reconnect: wait until the client's re-sends are acknowledged
        while not self._stop.is_set():
            self._kick.wait(0.5)
            self._kick.clear()
            try:
                if self._generation != generation:
                    generation = self._generation
                    if self.config.qos == 0:
                        inflight.clear()  # QoS 0 messages are not re-sent by the client
                    hold = bool(inflight)
                with self._acked_lock:
                    acked |= self._acked_mids
                    self._acked_mids.clear()
                while inflight and inflight[0][1] in acked:
                    entry_id, mid = inflight.popleft()
                    acked.discard(mid)
                    self._outbox.ack(entry_id)
                    self._sent += 1
                    hold = False
                acked &= {mid for _, mid in inflight}  # forget acks of non-result messages
                if self._connected and not hold:
                    self._send_more(inflight)
                self._inflight_count = len(inflight)
                self._outbox.maybe_sync()
            except Exception as exc:  # keep sending whatever one bad step did
                log.error("mqtt sender: %s: %s", type(exc).__name__, exc)
                time.sleep(0.5)

    def _send_more(self, inflight: deque[tuple[int, int]]) -> None:
        room = self._max_inflight - len(inflight)
        if room <= 0:
            return
        after = inflight[-1][0] if inflight else None
        for entry in self._outbox.peek(room, after=after):
            # A record the client refuses would be refused again forever and hold up every
            # one behind it: it leaves the queue for the outbox's quarantine file.
            try:
                info = self._client.publish(entry.topic, entry.payload, qos=entry.qos,
                                            properties=self._properties(entry))
            except (ValueError, TypeError) as exc:
                self._quarantine(entry, str(exc))
                continue
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and entry.qos == 0:
                return  # not queued by the client: retry from the outbox after reconnecting
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                self._quarantine(entry, mqtt.error_string(info.rc))
                continue
            # QoS 1/2 with NO_CONN: the client keeps the message and sends it on reconnecting.
            inflight.append((entry.id, info.mid))

    def _properties(self, entry: Entry) -> Properties | None:
        """MQTT 5: the result expires when the outbox would have dropped it (its remaining
        ``outbox_max_age``), and says which result schema it follows."""
        if self.config.protocol != "5":
            return None
        age = 0.0 if entry.stored is None else max(0.0, time.time() - entry.stored)
        properties = Properties(PacketTypes.PUBLISH)
        properties.MessageExpiryInterval = max(1, int(self.config.outbox_max_age - age))
        properties.UserProperty = [("schema", str(SCHEMA_VERSION))]
        return properties

    def _quarantine(self, entry: Entry, reason: str) -> None:
        self._outbox.quarantine(entry, reason)
        self._kick.set()  # its place in flight is free: send the next one without waiting
