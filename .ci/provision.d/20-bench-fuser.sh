# The benchmark's peers for its smoke run (tests/test_bench.py): fuser for the
# status --holders row (dd and sh are in every base system).
ci_apt psmisc
