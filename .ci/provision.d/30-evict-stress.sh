# The eviction stressor (tests/evict.py): at each of the oracle's readings in
# count-sensitive tests, evict this many random clean cached pages, as
# proactive reclaim may at any moment.  The default is 2; CI strikes harder.
export BLKCACHE_TEST_EVICT=8
