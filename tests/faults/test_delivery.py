"""Delivery under broker and network faults, with the real daemon: a broker killed with
SIGKILL, a network partition (a network namespace the test makes: traffic stays inside it),
and edged itself killed with SIGKILL while results wait on disk."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.broker import Mosquitto, Subscriber, free_port
from helpers.daemon import Daemon, write_config

from edged.outbox import Outbox

pytest_plugins = ["helpers.broker"]


def deployment(tmp_path: Path, host: str, port: int, clip: Path, model: Path,
               stream: str = "cam", fps: float = 5) -> dict:
    return {
        "device": "fault", "state_dir": str(tmp_path / "state"), "stats_interval": 1,
        "stdout": True,
        "mqtt": {"host": host, "port": port, "keepalive": 5},
        "streams": [{"name": stream, "task": "classify", "model": str(model), "fps": fps,
                     "source": {"uri": str(clip), "loop": True}}],
    }


def produced(daemon: Daemon, stream: str = "cam") -> list[int]:
    """The seqs of the results the daemon printed (its stdout sink mirrors every result)."""
    seqs = []
    for line in list(daemon.stdout):
        message = json.loads(line)
        if message.get("topic", "").endswith(f"/{stream}/result"):
            seqs.append(message["payload"]["seq"])
    return seqs


def delivered(sub: Subscriber, stream: str = "cam") -> set[int]:
    return {r["seq"] for r in sub.json(f"edged/fault/{stream}/result")}


def mqtt_stats(daemon: Daemon) -> dict | None:
    """The MQTT sink's figures in the daemon's latest stats message."""
    for line in reversed(list(daemon.stdout)):
        message = json.loads(line)
        if message["topic"].endswith("/stats"):
            return next(s for s in message["payload"]["sinks"] if "queued" in s)
    return None


def test_broker_killed_mid_run_loses_no_result(private_mosquitto: Mosquitto, bikes_clip: Path,
                                               converted_model, tmp_path: Path) -> None:
    """kill -9 of the broker: results wait in the outbox and every one is acknowledged once
    it is back (the subscriber's own session dies with the broker, so edged's side is what is
    checked: nothing dropped, nothing left)."""
    model = converted_model("mobilenet_v2_imagenet")
    config = write_config(tmp_path, deployment(tmp_path, private_mosquitto.host,
                                               private_mosquitto.port, bikes_clip, model))
    sub = Subscriber(private_mosquitto, "edged/fault/+/result")
    daemon = Daemon("run", "--config", str(config))
    try:
        assert sub.wait(lambda: len(delivered(sub)) >= 5, 60), daemon.log()
        private_mosquitto.kill()
        assert daemon.wait_for(lambda: (mqtt_stats(daemon) or {}).get("queued", 0) >= 10, 30)
        private_mosquitto.start()
        assert daemon.wait_log(r"mqtt .*: connected", 30), daemon.log()
        assert daemon.wait_for(lambda: (mqtt_stats(daemon) or {}).get("queued") == 0, 30)
        daemon.send(signal.SIGTERM)
        assert daemon.wait(30) == 0, daemon.log()
        assert mqtt_stats(daemon)["dropped"] == 0
        assert max(produced(daemon)) in delivered(sub) or sub.wait(
            lambda: max(produced(daemon)) in delivered(sub), 10)
    finally:
        daemon.close()
        sub.close()
    outbox = Outbox(tmp_path / "state" / "outbox")
    try:
        assert len(outbox) == 0, "results left undelivered"
    finally:
        outbox.close()


def test_edged_killed_with_results_on_disk_delivers_them_after_restart(
        private_mosquitto: Mosquitto, bikes_clip: Path, converted_model,
        tmp_path: Path) -> None:
    """kill -9 while the broker is away: the next edged (same state_dir) delivers them all,
    in order, to the topics they were produced for."""
    model = converted_model("mobilenet_v2_imagenet")
    private_mosquitto.stop()
    host, port = private_mosquitto.host, private_mosquitto.port
    config = write_config(tmp_path, deployment(tmp_path, host, port, bikes_clip, model))
    first = Daemon("run", "--config", str(config))
    try:
        assert first.wait_for(lambda: len(produced(first)) >= 15, 60), first.log()
        first.send(signal.SIGKILL)
        first.wait(10)
        pending = produced(first)
    finally:
        first.close()
    private_mosquitto.start()
    sub = Subscriber(private_mosquitto, "edged/fault/+/result")
    # The second edged runs another stream: what arrives on cam can only be the first's.
    write_config(tmp_path, deployment(tmp_path, host, port, bikes_clip, model, stream="cam2"))
    second = Daemon("run", "--config", str(config))
    try:
        assert sub.wait(lambda: delivered(sub) >= set(pending), 30), (pending, delivered(sub))
        seqs = [r["seq"] for r in sub.json("edged/fault/cam/result")]
        first_seen = list(dict.fromkeys(seqs))  # QoS 1 may repeat one; order must hold
        assert first_seen[:len(pending)] == pending
    finally:
        second.send(signal.SIGTERM)
        second.wait(30)
        second.close()
        sub.close()


class Partition:
    """Two network namespaces' worth of wiring: edged runs in its own namespace, joined to the
    test's by a veth pair on addresses of its own; ``cut()`` takes the link down (packets to
    the broker vanish without an answer, as in a real partition), ``heal()`` brings it up."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.namespace = f"edged-f{tag}"
        self.outer, self.inner = f"ef{tag}o", f"ef{tag}i"
        self.broker_address, self.edged_address = "10.213.77.1", "10.213.77.2"
        for command in (
            f"ip netns add {self.namespace}",
            f"ip link add {self.outer} type veth peer name {self.inner}",
            f"ip link set {self.inner} netns {self.namespace}",
            f"ip addr add {self.broker_address}/30 dev {self.outer}",
            f"ip link set {self.outer} up",
            f"ip -n {self.namespace} addr add {self.edged_address}/30 dev {self.inner}",
            f"ip -n {self.namespace} link set {self.inner} up",
            f"ip -n {self.namespace} link set lo up",
        ):
            subprocess.run(command.split(), check=True, capture_output=True)

    def run_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace]

    def cut(self) -> None:
        subprocess.run(["ip", "link", "set", self.outer, "down"], check=True)

    def heal(self) -> None:
        subprocess.run(["ip", "link", "set", self.outer, "up"], check=True)

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)


@pytest.fixture
def partition() -> Iterator[Partition]:
    wiring = Partition()
    yield wiring
    wiring.close()


class PartitionBroker:
    """A mosquitto listening only on the test side of the veth pair."""

    def __init__(self, workdir: Path, address: str) -> None:
        self.host, self.port = address, free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} {address}\nallow_anonymous true\n"
                        f"log_dest file {workdir}/mosquitto.log\n")
        self.process = subprocess.Popen(["mosquitto", "-c", str(conf)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while subprocess.run(["mosquitto_pub", "-h", address, "-p", str(self.port), "-t", "x",
                              "-m", "x"], capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "partition broker did not start"
            time.sleep(0.1)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def test_network_partition_loses_no_result(partition: Partition, bikes_clip: Path,
                                           converted_model, tmp_path: Path) -> None:
    """A partition of 20 s: edged notices at the keepalive, keeps results on disk, and
    delivers every one of them, in order, once the link is back."""
    model = converted_model("mobilenet_v2_imagenet")
    broker = PartitionBroker(tmp_path / "broker", partition.broker_address)
    sub = Subscriber(broker, "edged/fault/+/result")  # type: ignore[arg-type]
    config = write_config(tmp_path, deployment(tmp_path, broker.host, broker.port, bikes_clip,
                                               model))
    daemon = Daemon("run", "--config", str(config), prefix=partition.run_prefix())
    try:
        assert sub.wait(lambda: len(delivered(sub)) >= 5, 60), daemon.log()
        partition.cut()
        assert daemon.wait_log(r"mqtt .*disconnected", 20), daemon.log()
        time.sleep(10)
        during = len(produced(daemon))
        partition.heal()
        assert daemon.wait_log(r"mqtt .*: connected", 40), daemon.log()
        assert sub.wait(lambda: len(delivered(sub)) >= during, 30)
        daemon.send(signal.SIGTERM)
        assert daemon.wait(30) == 0, daemon.log()
        seqs = produced(daemon)
        assert sub.wait(lambda: delivered(sub) == set(seqs), 15), \
            f"lost: {sorted(set(seqs) - delivered(sub))}"
        arrived = list(dict.fromkeys(r["seq"] for r in sub.json("edged/fault/cam/result")))
        assert arrived == sorted(arrived), "results arrived out of order"
    finally:
        daemon.close()
        sub.close()
        broker.close()
