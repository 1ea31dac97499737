"""edged on aarch64 (Debian bookworm arm64 under qemu-user) gives the same results as on x86.

The same frames go through the same converted models with edged's own runtime code on both
sides: the networks get identical input tensors (so their outputs are compared strictly), and
each side's own preprocessing is compared bit for bit. Then the daemon itself (``edged run``,
stdout sink) runs the first frames of bikes.mp4 per task on both sides. Emulation is ~100x
slower than native: these tests say nothing about speed.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from system.arm64 import REPORT, VENV, Arm64Root, run_measured, runtime_dependencies

MODELS = ("mobilenet_v2_imagenet", "ssd_mobilenet_v2_coco", "ssdlite_mobilenet_v2_person",
          "deeplabv3_mnv2_voc")
PIPELINE_MODELS = {"classify": "mobilenet_v2_imagenet", "detect": "ssd_mobilenet_v2_coco",
                   "segment": "deeplabv3_mnv2_voc"}
FRAME_INDICES = (75, 125)  # of bikes.mp4: cars, a bus, cyclists and people
CLIP_FRAMES = 2  # frames of bikes.mp4 each side decodes
THRESHOLD = 0.3  # low enough for a few detections per frame
LOGIT_TOL = 1e-4
SCORE_TOL = 1e-4
BOX_TOL = 2e-3  # normalized box corners: about one pixel of the 640-wide frame
FRACTION_TOL = 1e-3  # segmentation: a class's share of the frame, 0.1 %
# Decoding: the H.264 decoder is exact, its YUV -> BGR conversion rounds per platform.
DECODE_TOL = 3
WORK = "/mnt/work"  # the inputs folder inside the root
MODEL_DIR = "/mnt/models"


def _probe(request: dict) -> None:
    """Every frame through every model with edged's runtime code; prints JSON. Runs as is on
    both sides (host venv and arm64 root), so it imports only what the device has.

    Each frame's preprocessed tensor is saved to ``request["out"]``. The network then runs on
    the tensor from ``request["reference"]`` when given (the x86 one, so both sides feed the
    model identical input), else on its own.
    """
    import json
    import sys
    from pathlib import Path

    import numpy as np

    from edged.config import standalone_stream
    from edged.model import load_model
    from edged.postprocess import Postprocessor
    from edged.preprocess import Preprocessor

    results = {}
    for name, path in request["models"].items():
        model = load_model(path)
        preprocess = Preprocessor(model.info.input)
        settings = standalone_stream(model.info.task, threshold=request["threshold"])
        postprocess = Postprocessor(model.info, settings)
        frames = []
        for i, frame_path in enumerate(request["frames"]):
            tensor, roi = preprocess(np.load(frame_path))
            np.save(Path(request["out"], f"{name}-{i}.npy"), tensor)
            if request["reference"]:
                tensor = np.load(Path(request["reference"], f"{name}-{i}.npy"))
            outputs = model.run(tensor)
            result = postprocess(outputs, roi)
            if model.info.task == "classify":
                frames.append({"logits": outputs["logits"].reshape(-1).tolist(),
                               "top5": [c.index for c in result.classes]})
            elif model.info.task == "detect":
                frames.append({"detections": [
                    {"label": d.label, "score": d.score, "box_norm": list(d.box_norm)}
                    for d in result.detections]})
            else:
                counts = np.bincount(outputs["labels"].ravel(), minlength=len(model.info.labels))
                frames.append({"fractions": (counts / counts.sum()).tolist()})
        results[name] = frames
    json.dump(results, sys.stdout)


def _script(function) -> str:
    """A function's source plus a call with the JSON request in argv[1]: the same code on both
    sides, no file to ship."""
    return (f"{inspect.getsource(function)}\nimport json, sys\n"
            f"{function.__name__}(json.loads(sys.argv[1]))\n")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, bikes_clip: Path) -> Path:
    """A folder with frames of bikes.mp4 decoded once on the host, so both sides see the same
    pixels (as .npy for the probe, as a folder of PNGs for the daemon), and the clip's first
    frames (stream copy, not re-encoded) for each side to decode."""
    folder = tmp_path_factory.mktemp("arm64-inputs")
    (folder / "frames").mkdir()
    capture = cv2.VideoCapture(str(bikes_clip))
    for index in FRAME_INDICES:
        capture.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, image = capture.read()
        assert ok, f"{bikes_clip}: cannot read frame {index}"
        np.save(folder / f"frame{index}.npy", image)
        assert cv2.imwrite(str(folder / "frames" / f"{index:04d}.png"), image)
    capture.release()
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(bikes_clip), "-c", "copy", "-an",
                    "-frames:v", str(CLIP_FRAMES), str(folder / "clip.mp4")], check=True)
    return folder


@pytest.fixture(scope="module")
def models(converted_model) -> dict[str, Path]:
    """The four catalog models converted from their real checkpoints (one folder, bound into
    the root as one)."""
    paths = {name: converted_model(name) for name in MODELS}
    assert len({p.parent for p in paths.values()}) == 1, "converted models in several folders"
    return paths


def _binds(inputs: Path, models: dict[str, Path]) -> dict[Path, str]:
    return {inputs: WORK, next(iter(models.values())).parent: MODEL_DIR}


@pytest.fixture(scope="module")
def probes(arm64_root: Arm64Root, inputs: Path, models: dict[str, Path]) -> dict[str, dict]:
    """The probe's output on x86 and on arm64 (fed the x86 tensors), for the same frames and
    models; the two sides' tensors are in ``inputs``/x86 and ``inputs``/arm64."""
    def request(work: str, model_dir: str, side: str, reference: str | None) -> str:
        return json.dumps({
            "models": {name: f"{model_dir}/{path.name}" for name, path in models.items()},
            "frames": [f"{work}/frame{i}.npy" for i in FRAME_INDICES],
            "threshold": THRESHOLD, "out": f"{work}/{side}", "reference": reference})

    for side in ("x86", "arm64"):
        (inputs / side).mkdir()
    parent = next(iter(models.values())).parent
    x86 = run_measured([sys.executable, "-c", _script(_probe),
                        request(str(inputs), str(parent), "x86", None)], "x86 probe", 600)[0]
    arm = arm64_root.run([f"{VENV}/bin/python", "-c", _script(_probe),
                          request(WORK, MODEL_DIR, "arm64", f"{WORK}/x86")],
                         binds=_binds(inputs, models), timeout=1200, what="arm64 probe")
    return {"x86": json.loads(x86), "arm64": json.loads(arm)}


def _device_facts(request: dict) -> None:
    """What the device install is: machine, versions, torch absent, the venv's disk usage."""
    import importlib.metadata
    import importlib.util
    import json
    import os
    import platform
    import sys

    def usage(path: str) -> int:
        return sum(os.lstat(os.path.join(folder, name)).st_blocks * 512
                   for folder, _, names in os.walk(path) for name in names)

    site = next(p for p in sys.path if p.endswith("site-packages"))
    largest = sorted(((usage(os.path.join(site, n)), n) for n in os.listdir(site)
                      if os.path.isdir(os.path.join(site, n))), reverse=True)[:4]
    json.dump({
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": importlib.util.find_spec("torch") is not None,
        "versions": {n: importlib.metadata.version(n) for n in request["packages"]},
        "venv_bytes": usage(request["venv"]),
        "largest": largest,
    }, sys.stdout)


def test_device_install_is_aarch64_without_torch(arm64_root: Arm64Root) -> None:
    """The root runs aarch64 Python 3.11; the venv has the host's runtime versions and no
    torch; the edged command works. Reports the install footprint."""
    packages = ["edged", *runtime_dependencies()]
    facts = json.loads(arm64_root.run(
        [f"{VENV}/bin/python", "-c", _script(_device_facts),
         json.dumps({"packages": packages, "venv": VENV})], what="arm64 device facts"))
    assert facts["machine"] == "aarch64"
    assert facts["python"].startswith("3.11.")
    assert not facts["torch"], "torch is installed on the device side"
    import importlib.metadata

    host = {n: importlib.metadata.version(n) for n in packages if n != "edged"}
    assert {n: v for n, v in facts["versions"].items() if n != "edged"} == host
    import edged

    assert facts["versions"]["edged"] == edged.__version__
    version = arm64_root.run([f"{VENV}/bin/edged", "--version"])
    assert version.strip() == f"edged {edged.__version__}"
    size = facts["venv_bytes"] / 1e6
    REPORT["device venv (no torch)"] = (
        f"{size:.0f} MB; largest: "
        + ", ".join(f"{name} {used / 1e6:.0f} MB" for used, name in facts["largest"]))
    assert 50 < size < 500, f"device venv is {size:.0f} MB"


def test_classify_logits_and_top5_match_x86(probes: dict[str, dict]) -> None:
    worst = 0.0
    for x86, arm in zip(probes["x86"]["mobilenet_v2_imagenet"],
                        probes["arm64"]["mobilenet_v2_imagenet"], strict=True):
        diff = np.abs(np.array(x86["logits"]) - np.array(arm["logits"])).max()
        worst = max(worst, float(diff))
        assert diff <= LOGIT_TOL, f"logits differ by {diff:.2e}"
        assert arm["top5"] == x86["top5"]
    REPORT["classify: largest logit difference arm64 vs x86"] = f"{worst:.1e}"


@pytest.mark.parametrize("name", ["ssd_mobilenet_v2_coco", "ssdlite_mobilenet_v2_person"])
def test_detections_match_x86(probes: dict[str, dict], name: str) -> None:
    found = 0
    for x86, arm in zip(probes["x86"][name], probes["arm64"][name], strict=True):
        want, got = x86["detections"], arm["detections"]
        assert [d["label"] for d in got] == [d["label"] for d in want]
        for a, b in zip(got, want, strict=True):
            assert abs(a["score"] - b["score"]) <= SCORE_TOL, (a, b)
            assert np.allclose(a["box_norm"], b["box_norm"], atol=BOX_TOL, rtol=0), (a, b)
        found += len(want)
    assert found > 0, f"{name} found nothing in bikes.mp4: nothing was compared"


def test_segmentation_fractions_match_x86(probes: dict[str, dict]) -> None:
    for x86, arm in zip(probes["x86"]["deeplabv3_mnv2_voc"],
                        probes["arm64"]["deeplabv3_mnv2_voc"], strict=True):
        want, got = np.array(x86["fractions"]), np.array(arm["fractions"])
        assert (want[1:] > 0.01).any(), "no foreground class: nothing was compared"
        assert np.abs(got - want).max() <= FRACTION_TOL, (got.round(4), want.round(4))


@pytest.mark.parametrize("name", MODELS)
def test_preprocessing_matches_x86(probes: dict[str, dict], inputs: Path, name: str) -> None:
    """edged's preprocessing (resize, normalize) gives bit-identical tensors on both sides."""
    for i in range(len(FRAME_INDICES)):
        x86 = np.load(inputs / "x86" / f"{name}-{i}.npy")
        arm = np.load(inputs / "arm64" / f"{name}-{i}.npy")
        differ = x86 != arm
        assert not differ.any(), (
            f"frame {FRAME_INDICES[i]}: {differ.mean():.1%} of the {x86.shape} input differs, "
            f"by up to {np.abs(x86 - arm).max():.4f}")


def _decode(request: dict) -> None:
    """Decode a clip with OpenCV as edged's file source does; save the frames as one array."""
    import cv2
    import numpy as np

    capture = cv2.VideoCapture(request["clip"])
    frames = []
    while (frame := capture.read())[0]:
        frames.append(frame[1])
    np.save(request["out"], np.stack(frames))


def test_video_decoding_matches_x86(arm64_root: Arm64Root, inputs: Path,
                                    models: dict[str, Path]) -> None:
    """Both sides decode the clip's frames alike, up to the colour conversion's rounding."""
    run_measured([sys.executable, "-c", _script(_decode), json.dumps(
        {"clip": str(inputs / "clip.mp4"), "out": str(inputs / "decoded-x86.npy")})],
        "x86 decode", 120)
    arm64_root.run([f"{VENV}/bin/python", "-c", _script(_decode), json.dumps(
        {"clip": f"{WORK}/clip.mp4", "out": f"{WORK}/decoded-arm64.npy"})],
        binds=_binds(inputs, models), what="arm64 decode")
    x86 = np.load(inputs / "decoded-x86.npy").astype(np.int16)
    arm = np.load(inputs / "decoded-arm64.npy").astype(np.int16)
    assert arm.shape == x86.shape == (CLIP_FRAMES, 272, 640, 3)
    worst = int(np.abs(arm - x86).max())
    REPORT["video decoding arm64 vs x86"] = (
        f"{(arm != x86).mean():.0%} of pixel values differ, by at most {worst} levels")
    assert worst <= DECODE_TOL


def _daemon_config(task: str, clip: str, model: str, state_dir: str) -> str:
    return yaml.safe_dump({
        "device": "arm64-test", "stdout": True, "state_dir": state_dir,
        "streams": [{"name": "main", "task": task, "model": model, "threshold": THRESHOLD,
                     "source": {"uri": clip, "realtime": False}}]})


def _results(stdout: str) -> list[dict]:
    """The daemon's result messages, their times left out (the rest must match)."""
    results = []
    for line in stdout.splitlines():
        message = json.loads(line)
        if message["topic"].endswith("/result"):
            payload = message["payload"]
            del payload["latency_ms"]
            payload["frame"] = {k: payload["frame"][k] for k in ("index", "width", "height")}
            results.append(payload)
    return results


def _same_result(arm: dict, x86: dict) -> None:
    """The two sides' result messages agree (values are rounded to 4 decimals in JSON)."""
    assert {k: v for k, v in arm.items() if k not in ("classes", "detections", "segmentation")} \
        == {k: v for k, v in x86.items() if k not in ("classes", "detections", "segmentation")}
    if "classes" in x86:
        assert [c["label"] for c in arm["classes"]] == [c["label"] for c in x86["classes"]]
        pairs = [(a["probability"], b["probability"]) for a, b in
                 zip(arm["classes"], x86["classes"], strict=True)]
    elif "detections" in x86:
        assert [d["label"] for d in arm["detections"]] == [d["label"] for d in x86["detections"]]
        pairs = [(a["score"], b["score"]) for a, b in
                 zip(arm["detections"], x86["detections"], strict=True)]
        for a, b in zip(arm["detections"], x86["detections"], strict=True):
            assert np.allclose(a["box"], b["box"], atol=1, rtol=0), (a, b)
    else:
        got = {c["label"]: c["fraction"] for c in arm["segmentation"]["classes"]}
        want = {c["label"]: c["fraction"] for c in x86["segmentation"]["classes"]}
        pairs = [(got.get(label, 0.0), want.get(label, 0.0)) for label in got | want]
        for a, b in pairs:
            assert abs(a - b) <= FRACTION_TOL, (got, want)
        return
    for a, b in pairs:  # 4-decimal rounding of values within 1e-4 differs by at most 1e-4
        assert abs(a - b) <= SCORE_TOL + 1e-9, (arm, x86)


@pytest.mark.parametrize("task", sorted(PIPELINE_MODELS))
def test_daemon_results_match_x86(arm64_root: Arm64Root, inputs: Path, models: dict[str, Path],
                                  tmp_path: Path, task: str) -> None:
    """``edged run`` (folder source, stdout sink) on frames of bikes.mp4 gives the same results
    on arm64 as on x86; reports the daemon's peak RSS for the task on both."""
    model = models[PIPELINE_MODELS[task]]
    host_config = tmp_path / "x86.yaml"
    host_config.write_text(_daemon_config(task, str(inputs / "frames"), str(model),
                                          str(tmp_path / "state")))
    (inputs / f"{task}.yaml").write_text(_daemon_config(
        task, f"{WORK}/frames", f"{MODEL_DIR}/{model.name}", "/tmp/edged-state"))
    x86_out, x86_rss = run_measured(
        [sys.executable, "-m", "edged", "run", "--config", str(host_config), "--log-level",
         "warning"], f"x86 edged run {task}", 300)
    arm_out, arm_rss = arm64_root.run_measured(
        [f"{VENV}/bin/edged", "run", "--config", f"{WORK}/{task}.yaml", "--log-level",
         "warning"], binds=_binds(inputs, models), timeout=900, what=f"arm64 edged run {task}")
    REPORT[f"daemon peak RSS, {task} ({model.stem})"] = (
        f"{arm_rss:.0f} MB on arm64 under qemu-user (emulator included), {x86_rss:.0f} MB on x86")
    x86, arm = _results(x86_out), _results(arm_out)
    assert len(x86) == len(FRAME_INDICES), f"x86 daemon published {len(x86)} results"
    assert len(arm) == len(FRAME_INDICES), f"arm64 daemon published {len(arm)} results"
    for a, b in zip(arm, x86, strict=True):
        _same_result(a, b)
