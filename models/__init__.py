"""PyTorch definitions of the MobileNetV2 paper's networks, checkpoint importers and the ONNX
exporter. Used only at conversion time: importing this package needs the ``convert`` extra
(torch). The runtime package ``edged`` never imports it at module level."""
