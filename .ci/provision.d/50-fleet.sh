# The fleet tests (tests/test_prometheus.py): a real node_exporter, which the
# test starts itself on 127.0.0.1 with only the textfile collector, and stops.
# ansible-core and prometheus_client come from pip install '.[test]'.
ci_apt prometheus-node-exporter
