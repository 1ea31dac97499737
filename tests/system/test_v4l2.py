"""edged on a real V4L2 device: the vivid driver's camera in a QEMU VM (no network).

The VM's init loads nothing itself; the scenario below (the VM's last init step) loads vivid,
runs ``edged run`` with the JSON-lines sink, takes the device away under it (driver unbind, then
rmmod) and brings it back (modprobe), and reports every step and every line edged prints on
the serial console for the assertions here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from system.systemd_container import REPORT
from system.vm import MARK, TEST_DIR, Boot

WIDTH, HEIGHT, FPS, FOURCC = 640, 480, 15, "UYVY"
RESULTS_EACH_SIDE = 1
DEPLOYMENT = {
    "device": "vm",
    "stdout": True,
    "state_dir": "/var/lib/edged",
    "stats_interval": 60,
    "streams": [{
        "name": "cam", "task": "classify", "threads": 2, "stall_timeout": 300,
        "model": f"/{TEST_DIR}/mobilenet_v2_imagenet.onnx",
        "source": {"uri": "/dev/video0", "width": WIDTH, "height": HEIGHT, "fps": FPS,
                   "fourcc": FOURCC, "read_timeout": 5, "reconnect_max": 1},
    }],
}

# Runs in the VM as PID 1 (exec'd by /init), standard library only.
SCENARIO = f"""import json, os, queue, subprocess, sys, threading, time
T0 = time.monotonic()
VIVID = ["modprobe", "vivid", "n_devs=1", "node_types=0x1"]
UNBIND = "/sys/bus/platform/drivers/vivid/unbind"
seen = queue.Queue()

def say(event, **data):
    data = {{"event": event, "t": round(time.monotonic() - T0, 2), **data}}
    sys.stdout.write({MARK!r} + json.dumps(data) + "\\n")
    sys.stdout.flush()

def run(*argv):
    proc = subprocess.run(argv, capture_output=True, text=True)
    say("command", argv=list(argv), rc=proc.returncode, output=(proc.stdout + proc.stderr)[-300:])
    return proc.returncode == 0

def pump(stream, kind):
    for line in stream:
        line = line.rstrip("\\n")
        if kind == "stdout":
            try:
                message = json.loads(line)
            except ValueError:
                say("garbage", line=line)
                continue
            say("message", message=message)
            seen.put(message)
        else:
            say("log", line=line)

def wait_for(phase, predicate, timeout):
    deadline = time.monotonic() + timeout
    while True:
        try:
            message = seen.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            say("timeout", phase=phase)
            return False
        if predicate(message):
            say("reached", phase=phase)
            return True

def results(n):
    count = [0]
    def predicate(message):
        count[0] += message["topic"].endswith("/cam/result")
        return count[0] >= n
    return predicate

def status(state):
    return lambda m: m["topic"].endswith("/cam/status") and m["payload"]["state"] == state

def scenario():
    if not run(*VIVID) or not os.path.exists("/dev/video0"):
        return
    edged = subprocess.Popen(["/opt/edged/bin/edged", "run", "--config", "/etc/edged/vm.yaml"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={{"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
                                  "PYTHONUNBUFFERED": "1", "EDGED_CACHE": "/tmp"}})
    pumps = [threading.Thread(target=pump, args=(edged.stdout, "stdout")),
             threading.Thread(target=pump, args=(edged.stderr, "stderr"))]
    for thread in pumps:
        thread.start()
    if wait_for("results before", results({RESULTS_EACH_SIDE}), 150):
        say("unbind")
        with open(UNBIND, "w") as f:
            f.write("vivid.0")
        if wait_for("reconnecting", status("reconnecting"), 30):
            # The reader closed the device: now the module itself can go and come back.
            for _ in range(20):
                if run("rmmod", "vivid"):
                    break
                time.sleep(0.5)
            say("device", present=os.path.exists("/dev/video0"))
            run(*VIVID)
            wait_for("streaming again", status("streaming"), 60)
            wait_for("results after", results({RESULTS_EACH_SIDE}), 90)
    edged.terminate()
    say("exit", rc=edged.wait(60))
    for thread in pumps:
        thread.join(10)

try:
    scenario()
except Exception as exc:
    say("error", error=repr(exc))
os.sync()
with open("/proc/sysrq-trigger", "w") as f:
    f.write("o")
time.sleep(30)
"""


def messages(boot: Boot, kind: str) -> list[tuple[int, Any]]:
    """(event index, payload) of edged's ``cam/<kind>`` lines, in order."""
    return [(i, e["message"]["payload"]) for i, e in enumerate(boot.events)
            if e["event"] == "message" and e["message"]["topic"] == f"edged/vm/cam/{kind}"]


def test_v4l2_camera_in_vm(make_vm_image: Callable[[dict[str, bytes]], Any],
                           converted_model: Callable[..., Path]) -> None:
    model = converted_model("mobilenet_v2_imagenet")
    image = make_vm_image({
        f"{TEST_DIR}/scenario.py": SCENARIO.encode(),
        f"{TEST_DIR}/{model.name}": model.read_bytes(),
        "etc/edged/vm.yaml": yaml.safe_dump(DEPLOYMENT).encode(),
    })
    boot = image.boot()
    REPORT["VM run (boot, scenario, power-off)"] = f"{boot.seconds:.0f} s"
    steps = [(e["event"], e.get("phase"), e.get("rc")) for e in boot.events
             if e["event"] not in ("message", "log")]
    print(f"\nVM run {boot.seconds:.0f} s; steps: {steps}")
    problems = boot.named("timeout") + boot.named("error") + boot.named("garbage")
    assert not problems, f"{problems}\nconsole tail:\n{boot.console[-3000:]}"
    commands = boot.named("command")
    assert [c["argv"][0] for c in commands] == ["modprobe", *["rmmod"] * (len(commands) - 2),
                                                "modprobe"]
    assert commands[0]["rc"] == 0 and commands[-2]["rc"] == 0 and commands[-1]["rc"] == 0
    assert boot.named("device") == [{"event": "device", "t": boot.named("device")[0]["t"],
                                     "present": False}]
    logs = [e["line"] for e in boot.named("log")][-8:]
    assert [e["rc"] for e in boot.named("exit")] == [0], "\n".join(logs)

    # The device opened with the requested size, rate and pixel format.
    statuses = messages(boot, "status")
    streaming = [s["detail"] for _, s in statuses if s["state"] == "streaming"]
    asked = f"{WIDTH}x{HEIGHT} @ {FPS} fps {FOURCC}"
    assert len(streaming) == 2, statuses
    assert all(detail == f"{asked} (asked {asked})" for detail in streaming), streaming

    # Results before the device went away, the reader reconnecting, results after it came back.
    unbound = next(i for i, e in enumerate(boot.events) if e["event"] == "unbind")
    results = messages(boot, "result")
    before = [r for i, r in results if i < unbound]
    reconnected = next(i for i, s in statuses if i > unbound and s["state"] == "streaming")
    after = [r for i, r in results if i > reconnected]
    assert len(before) >= RESULTS_EACH_SIDE and len(after) >= RESULTS_EACH_SIDE
    assert any(s["state"] == "reconnecting" for i, s in statuses if unbound < i < reconnected)
    for result in before + after:
        assert (result["frame"]["width"], result["frame"]["height"]) == (WIDTH, HEIGHT)
        assert result["model"] == "mobilenet_v2_imagenet"
        assert len(result["classes"]) == 5
    assert [r["seq"] for _, r in results] == list(range(1, len(results) + 1))
