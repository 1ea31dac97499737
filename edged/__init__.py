"""edged: edge-inference daemon for camera streams (MobileNetV2 classify / detect / segment)."""

__version__ = "0.1.0"
