/*
 * Test driver for the native shims, built together with csrc/blkcache.c
 * (e.g. with -fsanitize=address,undefined) by tests/test_native_hygiene.py.
 *
 *   driver PATH CACHED_OFFSET CACHED_LENGTH
 *
 * PATH is a block device or regular file the caller holds open, with the
 * range [CACHED_OFFSET, +CACHED_LENGTH) fully cached and nothing else.  Every
 * shim is called on it, with ordinary and edge arguments; each result is
 * checked.  Prints "ok N checks" and exits 0, or "FAIL ..." and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blkcache.h"

static int checks, failures;

#define CHECK(cond, ...) do {                                   \
        checks++;                                               \
        if (!(cond)) {                                          \
            failures++;                                         \
            printf("FAIL line %d: %s: ", __LINE__, #cond);      \
            printf(__VA_ARGS__);                                \
            printf("\n");                                       \
        }                                                       \
    } while (0)

static uint64_t stat_cached(int fd, uint64_t off, uint64_t len, int flags,
                            uint64_t window, unsigned int threads, int *err)
{
    struct blkcache_stat st;

    memset(&st, 0xa5, sizeof(st));      /* garbage in: must be overwritten */
    if (blkcache_cache_stat(fd, off, len, flags, window, threads, &st) != 0) {
        *err = errno;
        return UINT64_MAX;
    }
    *err = 0;
    return st.nr_cache;
}

int main(int argc, char **argv)
{
    const uint64_t ps = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t size = 0, off, len, want, got;
    unsigned int lbs = 0;
    struct blkcache_stat st;
    struct stat sb;
    int fd, err = 0, trusted = -1, isblk;

    if (argc != 4) {
        fprintf(stderr, "usage: driver PATH CACHED_OFFSET CACHED_LENGTH\n");
        return 2;
    }
    off = strtoull(argv[2], NULL, 0);
    len = strtoull(argv[3], NULL, 0);
    want = len / ps;
    fd = open(argv[1], O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0 || fstat(fd, &sb) != 0) {
        perror(argv[1]);
        return 2;
    }
    isblk = S_ISBLK(sb.st_mode);

    if (isblk) {
        CHECK(blkcache_device_size(fd, &size) == 0, "errno %d", errno);
        CHECK(blkcache_logical_block_size(fd, &lbs) == 0 && lbs >= 512, "lbs %u", lbs);
    } else {
        size = (uint64_t)sb.st_size;
        CHECK(blkcache_device_size(fd, &size) == -1 && errno == ENOTTY, "errno %d", errno);
        size = (uint64_t)sb.st_size;
    }
    CHECK(blkcache_residency_trusted(fd, &trusted) == 0 && trusted == 1, "trusted %d", trusted);

    /* The cached range, by both interfaces, with several windows and threads. */
    got = stat_cached(fd, off, len, 0, 0, 0, &err);
    CHECK(got == want, "cachestat %" PRIu64 " want %" PRIu64 " errno %d", got, want, err);
    got = stat_cached(fd, 0, size, 0, 0, 0, &err);
    CHECK(got == want, "whole %" PRIu64 " want %" PRIu64, got, want);
    {
        uint64_t windows[] = { 0, 1, ps, 3 * ps + 1, 1 << 20, 64ULL << 20, UINT64_MAX / 2,
                               UINT64_MAX - ps + 2, UINT64_MAX };
        unsigned int threads[] = { 0, 1, 2, 7, 64, 100000 };
        for (size_t w = 0; w < sizeof(windows) / sizeof(*windows); w++)
            for (size_t t = 0; t < sizeof(threads) / sizeof(*threads); t++) {
                if (windows[w] == 1 && threads[t] > 7)
                    continue;      /* page-sized windows: slow, not different */
                got = stat_cached(fd, 0, size, BLKCACHE_FORCE_MINCORE, windows[w],
                                  threads[t], &err);
                CHECK(got == want, "mincore window %" PRIu64 " threads %u: %" PRIu64
                      " errno %d", windows[w], threads[t], got, err);
            }
    }
    /* Unaligned edges: partly covered pages count in both interfaces. */
    got = stat_cached(fd, off + 1, len - 2, 0, 0, 0, &err);
    CHECK(got == want, "unaligned cachestat %" PRIu64, got);
    got = stat_cached(fd, off + 1, len - 2, BLKCACHE_FORCE_MINCORE, 0, 2, &err);
    CHECK(got == want, "unaligned mincore %" PRIu64, got);
    got = stat_cached(fd, off + 1, 1, BLKCACHE_FORCE_MINCORE, 0, 1, &err);
    CHECK(got == (want > 0), "one byte %" PRIu64, got);

    /* Edge arguments: refused with EINVAL, never wrapped. */
    got = stat_cached(fd, 0, 0, 0, 0, 0, &err);
    CHECK(got == UINT64_MAX && err == EINVAL, "length 0: %" PRIu64 " errno %d", got, err);
    got = stat_cached(fd, UINT64_MAX, 1, 0, 0, 0, &err);
    CHECK(err == EINVAL, "offset 2^64-1: errno %d", err);
    got = stat_cached(fd, 1ULL << 63, 1, BLKCACHE_FORCE_MINCORE, 0, 1, &err);
    CHECK(err == EINVAL, "offset 2^63 mincore: errno %d", err);
    got = stat_cached(fd, INT64_MAX, 1, BLKCACHE_FORCE_MINCORE, 0, 1, &err);
    CHECK(err == EINVAL, "INT64_MAX+1 mincore: errno %d", err);
    got = stat_cached(fd, 4096, (uint64_t)INT64_MAX, 0, 0, 0, &err);
    CHECK(err == EINVAL, "wrapping length: errno %d", err);
    got = stat_cached(fd, 0, UINT64_MAX, BLKCACHE_FORCE_MINCORE, 0, 4, &err);
    CHECK(err == EINVAL, "length 2^64-1 mincore: errno %d", err);
    /* Past the end: cachestat counts nothing; huge ranges cost nothing. */
    got = stat_cached(fd, size + (1ULL << 40), 1ULL << 40, BLKCACHE_NO_MINCORE, 0, 0, &err);
    CHECK(got == 0, "past the end: %" PRIu64 " errno %d", got, err);
    got = stat_cached(fd, 0, (uint64_t)INT64_MAX, BLKCACHE_NO_MINCORE, 0, 0, &err);
    CHECK(got == want, "0..2^63-1: %" PRIu64 " errno %d", got, err);
    CHECK(blkcache_cachestat(fd, 0, 0, &st) == -1 && errno == EINVAL, "errno %d", errno);
    CHECK(blkcache_drop_range(fd, UINT64_MAX, 1) == -1 && errno == EINVAL, "errno %d", errno);
    CHECK(blkcache_drop_range(fd, 1, (uint64_t)INT64_MAX) == -1 && errno == EINVAL, "e %d", errno);
    CHECK(blkcache_mincore(fd, 0, size, 0, 0, &st) == 0 && st.nr_cache == want
          && st.interface == BLKCACHE_IF_MINCORE && st.nr_dirty == 0, "mincore direct");
    CHECK(blkcache_mincore(fd, 0, 0, 0, 0, &st) == 0 && st.nr_cache == 0, "mincore empty");

    /* Bad fds. */
    CHECK(blkcache_datasync(-1) == -1 && errno == EBADF, "errno %d", errno);
    CHECK(blkcache_flush_buffers(-1) == -1 && errno == EBADF, "errno %d", errno);
    CHECK(blkcache_device_size(-1, &size) == -1 && errno == EBADF, "errno %d", errno);
    CHECK(blkcache_cache_stat(-1, 0, 4096, 0, 0, 0, &st) == -1 && errno == EBADF, "e %d", errno);
    CHECK(blkcache_cache_stat(-1, 0, 4096, BLKCACHE_FORCE_MINCORE, 0, 0, &st) == -1
          && errno == EBADF, "errno %d", errno);
    CHECK(blkcache_residency_trusted(-1, &trusted) == -1 && errno == EBADF, "e %d", errno);
    CHECK(blkcache_drop_range(-1, 0, 0) == -1 && errno == EBADF, "errno %d", errno);

    /* Sync and drop: nothing cached after. */
    CHECK(blkcache_datasync(fd) == 0, "errno %d", errno);
    if (isblk)
        CHECK(blkcache_flush_buffers(fd) == 0, "errno %d", errno);
    else
        CHECK(blkcache_flush_buffers(fd) == -1 && errno == ENOTTY, "errno %d", errno);
    CHECK(blkcache_drop_range(fd, 0, 0) == 0, "errno %d", errno);
    got = stat_cached(fd, 0, size, 0, 0, 0, &err);
    CHECK(got == 0, "after drop %" PRIu64 " errno %d", got, err);
    got = stat_cached(fd, 0, size, BLKCACHE_FORCE_MINCORE, 0, 4, &err);
    CHECK(got == 0, "after drop, mincore %" PRIu64 " errno %d", got, err);

    close(fd);
    if (failures) {
        printf("FAIL %d of %d checks\n", failures, checks);
        return 1;
    }
    printf("ok %d checks\n", checks);
    return 0;
}
