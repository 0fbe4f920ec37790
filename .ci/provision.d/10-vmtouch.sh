# The benchmark's peer for its smoke run (tests/test_bench.py).
ci_apt vmtouch
