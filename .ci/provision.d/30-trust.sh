# strace: tests/test_failures.py delays one drop's fdatasync (strace -e inject=...:delay_exit)
# to show that a concurrent drop waits for its lock and finds its failure record.
ci_apt strace
