"""The fault tier: each test injects a fault a deployment meets (a broker killed or silent, a
network partition, edged killed with results pending, a full disk, damaged files, a stream
that breaks) and checks that edged says what happened and loses nothing it promised to keep.
Sources dying and returning (an RTSP server killed, frozen; an MJPEG server down at start, gone
mid-stream, repeating one frame) are tested beside the readers, in tests/test_sources.py."""
