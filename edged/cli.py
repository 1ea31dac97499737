"""The ``edged`` command line: argument parsing and dispatch, nothing else.

Each subcommand is added by its own ``_add_*`` function and runs a library function; every
``EdgedError`` becomes one ``edged: <message>`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from edged import __version__
from edged.errors import EdgedError

EPILOG = """examples:
  edged run --task detect --source /dev/video0
  edged run --config /etc/edged/edged.yaml
  edged check --config config/detect-camera.yaml
  edged models list
  edged models fetch ssd_mobilenet_v2_coco --mirror ../shared/weights
  edged convert ssd_mobilenet_v2_coco -o ssd.onnx
"""


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    """``edged run`` and ``edged check`` (the daemon)."""


def _add_models_commands(sub: argparse._SubParsersAction) -> None:
    """``edged models list|info|fetch`` (the model catalog)."""


def _add_convert_command(sub: argparse._SubParsersAction) -> None:
    """``edged convert`` (needs the ``convert`` extra: torch)."""


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
    _add_models_commands(sub)
    _add_convert_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edged`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EdgedError as exc:
        print(f"edged: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
