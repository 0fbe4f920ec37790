/*
 * timing: the syscalls blkcache.status() / blkcache.drop() make, timed in C
 * (the peer of api_timing.py).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

struct cs_range { uint64_t off, len; };
struct cs { uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted; };

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cachestat(int fd, uint64_t len, struct cs *out)
{
    struct cs_range r = { 0, len };
    return syscall(451, fd, &r, out, 0);
}

/* usage: timing status|drop DEV [N [START]]: prints N lines "seconds cached_after".
 * START: a CLOCK_MONOTONIC time to wait for before the untimed warm-up call
 * (a status) that precedes the timed ones. */
int main(int argc, char **argv)
{
    int drop, n, i;
    double start = argc > 4 ? atof(argv[4]) : 0;

    if (argc < 3)
        return 2;
    drop = strcmp(argv[1], "drop") == 0;
    n = argc > 3 ? atoi(argv[3]) : 1;
    if (start > now()) {
        double wait = start - now();
        struct timespec ts = { (time_t)wait, (long)((wait - (time_t)wait) * 1e9) };
        nanosleep(&ts, NULL);
    }
    for (i = -1; i < n; i++) {      /* i == -1: an untimed warm-up status */
        struct stat sb;
        struct cs before, after;
        uint64_t size = 0;
        double t0, t1;
        int fd;

        t0 = now();
        fd = open(argv[2], O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);

        if (fd < 0 || fstat(fd, &sb) != 0 || !S_ISBLK(sb.st_mode) ||
            ioctl(fd, BLKGETSIZE64, &size) != 0 || cachestat(fd, size, &before) != 0) {
            perror(argv[2]);
            return 1;
        }
        after = before;
        if (drop && i >= 0 && (fdatasync(fd) != 0 || ioctl(fd, BLKFLSBUF, 0) != 0 ||
                     cachestat(fd, size, &after) != 0)) {
            perror(argv[2]);
            return 1;
        }
        close(fd);
        t1 = now();
        if (i >= 0)
            printf("%.9f %llu\n", t1 - t0, (unsigned long long)after.nr_cache);
    }
    return 0;
}
