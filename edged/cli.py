"""The ``edged`` command line: argument parsing and dispatch, nothing else.

Each subcommand is added by its own ``_add_*`` function and runs a library function; every
``EdgedError`` becomes one ``edged: <message>`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import ModuleType

from edged import __version__
from edged.errors import EdgedError

EPILOG = """examples:
  edged run --task detect --source /dev/video0
  edged run --config /etc/edged/edged.yaml
  edged check --config config/detect-camera.yaml
  edged config schema > /etc/edged/edged.schema.json
  edged models list
  edged models fetch ssd_mobilenet_v2_coco --mirror ../shared/weights
  edged convert ssd_mobilenet_v2_coco -o ssd.onnx
"""


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    """``edged run`` and ``edged check`` (the daemon)."""
    # Imported here: `edged models ...` need not load ONNX Runtime and OpenCV.
    from edged.config import TASKS, Config, load_config, single_stream_config

    def _config(args: argparse.Namespace) -> Config:
        if args.config:
            return load_config(args.config)
        if not (args.task and args.source):
            raise EdgedError(f"{args.command}: give --config FILE, or --task and --source")
        return single_stream_config(
            args.task, args.source, model=args.model, mqtt=args.mqtt, device=args.device,
            stdout=args.stdout, fps=args.fps, threshold=args.threshold, name=args.name,
            realtime=not args.fast, state_dir=args.state_dir)

    def run(args: argparse.Namespace) -> int:
        from edged.server import Server, setup_logging

        config = _config(args)
        setup_logging(args.log_level or config.logging.level)
        return Server(config, config_path=args.config).run()

    def check(args: argparse.Namespace) -> int:
        from pathlib import Path

        from edged.server import check as check_deployment
        from edged.server import setup_logging

        config = _config(args)
        setup_logging(args.log_level or "warning")
        return check_deployment(config, draw=Path(args.draw) if args.draw else None)

    for name, func, text in (
        ("run", run, "run the daemon: one stream from flags, or a whole --config"),
        ("check", check, "validate a deployment: open sources, load models, estimate capacity"),
    ):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("--config", metavar="FILE", help="deployment YAML (see config/)")
        one = cmd.add_argument_group("one stream without a config file")
        one.add_argument("--task", choices=TASKS)
        one.add_argument("--source", metavar="SRC",
                         help="/dev/videoN, rtsp://..., http://... (MJPEG), a file or a folder")
        one.add_argument("--model", metavar="FILE|NAME",
                         help="ONNX file or catalog name (default: the task's catalog model)")
        one.add_argument("--mqtt", metavar="HOST[:PORT]", help="broker (default: none, stdout)")
        one.add_argument("--device", metavar="ID", help="device id in topics (default: host name)")
        one.add_argument("--name", default="main", help="stream name in topics (default: main)")
        one.add_argument("--stdout", action="store_true", help="also print results as JSON lines")
        one.add_argument("--fps", type=float, metavar="N", help="process at most N frames/s")
        one.add_argument("--threshold", type=float, metavar="X", help="minimum score (0..1)")
        one.add_argument("--fast", action="store_true",
                         help="read files as fast as inference goes (no pacing at their fps)")
        one.add_argument("--state-dir", metavar="DIR", help="outbox and state (default: "
                         "$STATE_DIRECTORY, /var/lib/edged or ~/.local/state/edged)")
        cmd.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
        if name == "check":
            cmd.add_argument("--draw", metavar="FILE.png",
                             help="draw each stream's zones, lines and masks on a frame from "
                                  "its source")
        cmd.set_defaults(func=func)


def _add_config_commands(sub: argparse._SubParsersAction) -> None:
    """``edged config schema|docs``: the deployment file's JSON Schema and reference."""

    def schema(args: argparse.Namespace) -> int:
        from edged.config import config_schema

        print(json.dumps(config_schema(), indent=2))
        return 0

    def docs(args: argparse.Namespace) -> int:
        from edged.config import config_reference

        print(config_reference())
        return 0

    config = sub.add_parser("config", help="the deployment file: JSON Schema, reference",
                            description="the deployment file: JSON Schema, reference")
    csub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    for name, func, text in (
        ("schema", schema, "print the JSON Schema of a deployment YAML (for editors: "
                           "docs/config.md)"),
        ("docs", docs, "print the settings reference (the tables of docs/config.md)"),
    ):
        csub.add_parser(name, help=text, description=text).set_defaults(func=func)


def _add_models_commands(sub: argparse._SubParsersAction) -> None:
    """``edged models list|info|fetch`` (the model catalog)."""
    from edged.catalog import CATALOG, DEFAULT_MODELS, converted_path, get_model

    def list_models(args: argparse.Namespace) -> int:
        defaults = set(DEFAULT_MODELS.values())
        width = max(map(len, CATALOG))
        for spec in CATALOG.values():
            mark = "*" if spec.name in defaults else " "
            print(f"{spec.name:<{width}} {mark} {spec.task:<8} {spec.description}")
        print("\n* default model of its task. Details: edged models info NAME")
        return 0

    def info(args: argparse.Namespace) -> int:
        spec = get_model(args.name)
        ckpt = spec.checkpoint
        upstream = ckpt.upstream + (f" (member {ckpt.member})" if ckpt.member else "")
        labels = spec.labels
        label_parts = [*labels.prepend, *labels.names]
        if labels.artifact is not None:
            file = labels.artifact.file
            label_parts.append(f"first {labels.first} lines of {file}" if labels.first else file)
        size = spec.input
        converted = converted_path(spec.name, args.cache_dir)
        rows = [
            ("name", spec.name),
            ("task", spec.task + (" (default)" if DEFAULT_MODELS[spec.task] == spec.name
                                  else "")),
            ("description", spec.description),
            ("architecture", json.dumps(spec.arch)),
            ("input", f"{size.width}x{size.height} RGB, x = (pixel - {size.mean[0]:g}) / "
                      f"{size.std[0]:g}"),
            ("checkpoint", f"{ckpt.file} ({spec.checkpoint_format}, {spec.license})"),
            ("sha256", ckpt.sha256),
            ("upstream", upstream),
            ("mirror path", ckpt.mirror),
            ("labels", " + ".join(label_parts)),
            ("size", _model_size(spec.arch, (size.height, size.width))),
            ("converted", str(converted) if converted.is_file()
             else f"no (run `edged convert {spec.name}`)"),
        ]
        if spec.detect is not None:
            rows.insert(5, ("detect", json.dumps(spec.detect)))
        for key, value in rows:
            print(f"{key + ':':<14}{value}")
        return 0

    def fetch(args: argparse.Namespace) -> int:
        from edged.fetch import fetch as fetch_artifact

        spec = get_model(args.name)
        for artifact in spec.artifacts:
            path = fetch_artifact(artifact, args.cache_dir, mirror=args.mirror,
                                  progress=_DownloadProgress())
            print(path)
        return 0

    models = sub.add_parser("models", help="the model catalog: list, info, fetch",
                            description="the model catalog: list, info, fetch")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    cmd = msub.add_parser("list", help="list catalog models")
    cmd.set_defaults(func=list_models)
    for name, func, text in (
        ("info", info, "show a model's facts: source, sha256, labels, input, size"),
        ("fetch", fetch, "download a model's checkpoint and labels into the cache (sha256 "
                         "verified)"),
    ):
        cmd = msub.add_parser(name, help=text, description=text)
        cmd.add_argument("name", metavar="NAME", help="catalog name (see `edged models list`)")
        _cache_arguments(cmd, mirror=name == "fetch")
        cmd.set_defaults(func=func)


def _cache_arguments(cmd: argparse.ArgumentParser, mirror: bool) -> None:
    """--cache-dir (and --mirror): where models are cached and fetched from."""
    cmd.add_argument("--cache-dir", metavar="DIR",
                     help="model cache (default: $EDGED_CACHE or ~/.cache/edged)")
    if mirror:
        cmd.add_argument("--mirror", metavar="DIR",
                         help="copy checkpoints from this mirror folder instead of downloading "
                              "(default: $EDGED_MIRROR)")


def _model_size(arch: dict, input_size: tuple[int, int]) -> str:
    """Parameters and multiply-adds of a catalog architecture (needs torch)."""
    convert = _convert_module("counting parameters")
    if isinstance(convert, str):
        return convert
    from models.summary import summarize

    return str(summarize(convert.build_model(arch), input_size))


CONVERT_EXTRA = ("torch", "onnx", "tflite", "flatbuffers", "tensorboard", "google")


def _convert_module(purpose: str) -> ModuleType | str:
    """``models.convert``, or a line saying the convert extra is needed for ``purpose``."""
    try:
        import models.convert
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in CONVERT_EXTRA:
            raise
        return (f"{purpose} needs the convert extra (missing {exc.name}): "
                "pip install 'edged[convert]'")
    return models.convert


class _DownloadProgress:
    """Fetch progress on stderr: a self-updating line on a terminal, a few lines otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.shown = -1

    def __call__(self, name: str, done: int, total: int | None) -> None:
        if total:
            step = done * 100 // total if self.tty else done * 4 // total * 25
            text = f"{name}: {step}% of {total / 1e6:.1f} MB"
        else:
            step = done >> 20  # unknown size: report each MB
            text = f"{name}: {done / 1e6:.1f} MB"
        if step == self.shown:
            return
        self.shown = step
        finished = total is not None and done >= total
        end = "\n" if finished or not self.tty else ""
        print(("\r" if self.tty else "") + text, end=end, file=sys.stderr, flush=True)


def _add_convert_command(sub: argparse._SubParsersAction) -> None:
    """``edged convert`` (needs the ``convert`` extra: torch)."""

    def convert(args: argparse.Namespace) -> int:
        custom = [flag for flag, value in (("--weights", args.weights), ("--labels", args.labels),
                                           ("--width-mult", args.width_mult),
                                           ("--num-classes", args.num_classes)) if value]
        if args.arch is None and args.name is None:
            raise EdgedError("convert: give a catalog NAME, or --arch with --weights and "
                             "--labels")
        if args.arch is not None and args.name is not None:
            raise EdgedError("convert: give a catalog NAME or --arch, not both")
        if args.arch is None and custom:
            raise EdgedError(f"convert: {custom[0]} goes with --arch (a catalog model brings "
                             "its own weights)")
        if args.arch is not None:
            missing = [flag for flag, value in (("--weights", args.weights),
                                                ("--labels", args.labels),
                                                ("-o", args.output)) if not value]
            if missing:
                raise EdgedError(f"convert --arch: {missing[0]} is required")
        module = _convert_module("edged convert")
        if isinstance(module, str):
            raise EdgedError(module)
        # --- memory budget (owned by edged/schedule) ---
        budget = None
        if args.memory_budget is not None:
            from edged.schedule.plan import parse_size, plan_file

            budget = parse_size(args.memory_budget)
        # --- end memory budget ---

        steps = module.INT8_STEPS if args.precision == "int8" else module.STEPS

        def progress(step: str, detail: str) -> None:
            number = steps.index(step) + 1
            print(f"[{number}/{len(steps)}] {step}: {detail}", file=sys.stderr, flush=True)

        if args.arch is not None:
            path = module.convert_torchvision(
                args.weights, args.labels, args.output, width_mult=args.width_mult or 1.0,
                num_classes=args.num_classes, verify_image=args.verify_image, progress=progress,
                precision=args.precision, calibration=args.calibration)
        else:
            path = module.convert_catalog_model(
                args.name, args.output, mirror=args.mirror, cache_dir=args.cache_dir,
                verify_image=args.verify_image, progress=progress,
                fetch_progress=_DownloadProgress(), precision=args.precision,
                calibration=args.calibration)
        if budget is not None:  # memory budget (owned by edged/schedule)
            print(plan_file(path, budget, args.verify_image), file=sys.stderr)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return 0

    text = "convert a catalog model or a torchvision checkpoint to an edged ONNX file"
    cmd = sub.add_parser("convert", help=text, description=text + " (needs the convert extra)")
    cmd.add_argument("name", nargs="?", metavar="NAME", help="catalog name")
    cmd.add_argument("-o", "--output", metavar="FILE.onnx",
                     help="output file (default: the model cache, where `edged run` finds it)")
    cmd.add_argument("--verify-image", metavar="FILE",
                     help="photo to check ONNX Runtime against PyTorch on (default: "
                          "scikit-image's astronaut)")
    cmd.add_argument("--memory-budget", metavar="SIZE",  # owned by edged/schedule
                     help="rewrite the model so one inference needs at most SIZE of "
                     "activations (e.g. 2MB; see `edged plan --budget`)")
    _cache_arguments(cmd, mirror=True)
    # --- int8 (models/quantize.py) ---
    int8 = cmd.add_argument_group("int8 (see docs/int8.md)")
    int8.add_argument("--int8", dest="precision", action="store_const", const="int8",
                      default="fp32", help="write an int8 model: the checkpoint's trained "
                      "quantization, or static quantization calibrated on --calibration")
    int8.add_argument("--precision", choices=("fp32", "int8"), help="same as --int8 for int8")
    int8.add_argument("--calibration", metavar="CLIP|DIR",
                      help="frames for calibrating a float checkpoint (a video or a folder of "
                           "images); also added to the agreement report")
    # --- end int8 ---
    own = cmd.add_argument_group("your own torchvision classifier (a saved state_dict)")
    own.add_argument("--arch", choices=("mobilenet_v2",))
    own.add_argument("--width-mult", type=float, metavar="X", help="width multiplier (1.0)")
    own.add_argument("--num-classes", type=int, metavar="N",
                     help="classes (default: the number of labels)")
    own.add_argument("--weights", metavar="FILE.pth", help="torch.save(model.state_dict())")
    own.add_argument("--labels", metavar="FILE", help="one class name per line")
    cmd.set_defaults(func=convert)


def _add_collect_command(sub: argparse._SubParsersAction) -> None:
    """``edged collect``: a fleet's results into a database, and the built-in queries over it
    (docs/fleet.md)."""

    def collect(args: argparse.Namespace) -> int:
        import socket

        from edged.collect import (
            CollectSettings,
            check_names,
            collect,
            parse_broker,
            session_expiry,
        )
        from edged.collect import setup_logging as collect_logging
        from edged.reports import query_text

        collect_logging(args.log_level)
        if args.query:
            print(query_text(args.database, args.query, args.since, args.device, args.json))
            return 0
        if not args.broker:
            raise EdgedError("collect: give --broker HOST[:PORT] (or --query NAME)")
        host, port = parse_broker(args.broker)
        check_names(args.group, args.prefix)
        password = None
        if args.password_env:
            password = os.environ.get(args.password_env)
            if password is None:
                raise EdgedError(f"--password-env: the environment has no {args.password_env}")
        if args.tls_key and not args.tls_cert:
            raise EdgedError("--tls-key goes with --tls-cert")
        if args.batch < 1 or not 1 <= args.batch_ms <= 10_000:
            raise EdgedError("--batch must be at least 1 and --batch-ms from 1 to 10000")
        collect(CollectSettings(
            host=host, port=port, group=args.group, prefix=args.prefix,
            client_id=args.client_id or f"edged-collect-{args.group}-{socket.gethostname()}",
            kinds=tuple(dict.fromkeys(args.topics)),
            session_expiry=session_expiry(args.session_expiry), username=args.username,
            password=password, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
            batch=args.batch, batch_interval=args.batch_ms / 1000), args.database)
        return 0

    text = "store a fleet's results from a broker in a database, each once; query it"
    cmd = sub.add_parser("collect", help=text, description=text + " (docs/fleet.md)")
    cmd.add_argument("--database", metavar="URL", default="sqlite:///edged-results.db",
                     help="sqlite:///PATH (relative; sqlite:////ABS/PATH) or postgresql://"
                          "USER@HOST[:PORT]/NAME (the collect extra) (default: %(default)s)")
    mqtt = cmd.add_argument_group("collecting")
    mqtt.add_argument("--broker", metavar="HOST[:PORT]", help="the central broker (MQTT 5)")
    mqtt.add_argument("--group", default="edged", help="shared-subscription group: collectors "
                      "of one group split the messages (default: %(default)s)")
    mqtt.add_argument("--prefix", default="edged", help="the devices' topic prefix "
                      "(default: %(default)s)")
    mqtt.add_argument("--topics", nargs="+", choices=("result", "events", "lines"),
                      default=["result", "events", "lines"], metavar="KIND",
                      help="what to collect: result, events, lines (default: all three)")
    mqtt.add_argument("--client-id", metavar="ID", help="MQTT client id, one per collector; "
                      "its session outlives a restart (default: edged-collect-GROUP-HOSTNAME)")
    mqtt.add_argument("--session-expiry", type=float, default=86400, metavar="SECONDS",
                      help="how long the broker keeps this collector's messages while it is "
                           "away (default: %(default)g)")
    mqtt.add_argument("--username", help="broker user name")
    mqtt.add_argument("--password-env", metavar="VAR",
                      help="environment variable holding the broker password")
    mqtt.add_argument("--tls-ca", metavar="FILE", help="TLS: CA certificate of the broker")
    mqtt.add_argument("--tls-cert", metavar="FILE", help="TLS: client certificate")
    mqtt.add_argument("--tls-key", metavar="FILE", help="TLS: client certificate's key")
    mqtt.add_argument("--batch", type=int, default=500, metavar="N",
                      help="commit after N messages ... (default: %(default)s)")
    mqtt.add_argument("--batch-ms", type=float, default=50, metavar="MS",
                      help="... or MS milliseconds after the first (default: %(default)g)")
    query = cmd.add_argument_group("querying (instead of collecting)")
    query.add_argument("--query", metavar="NAME",
                       help="print a built-in query: counts, zones, lines or last")
    query.add_argument("--since", metavar="TIME", help="only from this ISO time on (UTC)")
    query.add_argument("--device", metavar="ID", help="only this device")
    query.add_argument("--json", action="store_true", help="JSON instead of a table")
    cmd.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                     default="info")
    cmd.set_defaults(func=collect)


# --- edged plan (memory-aware scheduler; owned by edged/schedule) ---
def _add_plan_command(sub: argparse._SubParsersAction) -> None:
    """``edged plan MODEL.onnx``: live memory per step, file order vs the best order."""
    from pathlib import Path

    parser = sub.add_parser("plan", help="live memory per step of a model and its best op order",
                            description="Print the live activation memory of every step for the "
                            "file's op order and for the minimum-peak order, naming the tensor "
                            "alive at the peak.")
    parser.add_argument("model", type=Path, help="ONNX model file")
    parser.add_argument("-o", "--output", type=Path, help="write the reordered model here")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="draw live memory per step into this image")
    parser.add_argument("--time-limit", type=float, default=10.0, metavar="SECONDS",
                        help="longest exact search before settling for the best order found")
    parser.add_argument("--budget", metavar="SIZE",
                        help="rewrite the model (split, row stripes, label bands) with the "
                        "cheapest plan whose per-inference peak fits SIZE (e.g. 2MB, 800KB)")
    parser.add_argument("--verify-image", type=Path, metavar="FILE",
                        help="photo to check a rewrite against the original on (default: "
                        "scikit-image's astronaut)")

    def plan(args: argparse.Namespace) -> int:
        from edged.schedule.plan import parse_size
        from edged.schedule.report import run_plan

        if not args.time_limit > 0:  # also refuses nan
            raise EdgedError(f"--time-limit must be positive, got {args.time_limit:g}")
        budget = parse_size(args.budget) if args.budget is not None else None
        print(run_plan(args.model, args.output, args.plot, args.time_limit, budget,
                       args.verify_image))
        return 0

    parser.set_defaults(func=plan)
# --- end edged plan ---


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edged",
        description="Edge inference on camera streams: MobileNetV2 classify / detect / segment, "
        "results over MQTT.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edged {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_run_commands(sub)
    _add_config_commands(sub)
    _add_models_commands(sub)
    _add_convert_command(sub)
    _add_plan_command(sub)
    _add_collect_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edged`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # OpenCV and FFmpeg print their own lines for every unreadable file or stream; edged
    # reports each problem once, in one line (set these variables to see theirs).
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    try:
        return int(args.func(args) or 0)
    except EdgedError as exc:
        print(f"edged: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``edged plan ... | head``): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
