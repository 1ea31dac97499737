"""The fault tier: each test injects a fault a deployment meets (a broker killed or silent, a
network partition, edged killed with results pending, a full disk, damaged files, a stream
that breaks) and checks that edged says what happened and loses nothing it promised to keep."""
