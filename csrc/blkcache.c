/*
 * blkcache native layer.  See blkcache.h for the contract: every function
 * returns 0 or -1 with errno set, and works on an fd the caller opened.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/capability.h>
#include <linux/fs.h>

#include "blkcache.h"

#ifndef __NR_cachestat
# if defined(__alpha__)
#  define __NR_cachestat 561
# else
#  define __NR_cachestat 451   /* the same on every other architecture */
# endif
#endif

#ifndef BLKGETDISKSEQ
# define BLKGETDISKSEQ _IOR(0x12, 128, __u64)    /* Linux 5.15 */
#endif

#define MINCORE_DEFAULT_WINDOW (128ULL << 20)
#define MINCORE_MAX_WINDOW (1ULL << 30)     /* a 256 KiB vector per thread */
#define MINCORE_MAX_THREADS 64

/* The kernel's uapi structs for cachestat(2) (linux/mman.h, Linux 6.5). */
struct blkcache_cachestat_range {
    uint64_t off;
    uint64_t len;
};

struct blkcache_cachestat {
    uint64_t nr_cache;
    uint64_t nr_dirty;
    uint64_t nr_writeback;
    uint64_t nr_evicted;
    uint64_t nr_recently_evicted;
};

static uint64_t page_size(void)
{
    long ps = sysconf(_SC_PAGESIZE);
    return ps > 0 ? (uint64_t)ps : 4096;
}

/* The range must be representable as off_t and must not wrap. */
static int range_ok(uint64_t offset, uint64_t length)
{
    if (offset > (uint64_t)INT64_MAX || length > (uint64_t)INT64_MAX - offset) {
        errno = EINVAL;
        return 0;
    }
    return 1;
}

int blkcache_flush_buffers(int fd)
{
    return ioctl(fd, BLKFLSBUF, 0) == 0 ? 0 : -1;
}

int blkcache_device_size(int fd, uint64_t *size)
{
    uint64_t bytes = 0;

    if (ioctl(fd, BLKGETSIZE64, &bytes) != 0)
        return -1;
    *size = bytes;
    return 0;
}

int blkcache_disk_seq(int fd, uint64_t *seq)
{
    __u64 value = 0;

    if (ioctl(fd, BLKGETDISKSEQ, &value) != 0)
        return -1;
    *seq = value;
    return 0;
}

int blkcache_logical_block_size(int fd, unsigned int *size)
{
    int bytes = 0;

    if (ioctl(fd, BLKSSZGET, &bytes) != 0)
        return -1;
    *size = (unsigned int)bytes;
    return 0;
}

int blkcache_drop_range(int fd, uint64_t offset, uint64_t length)
{
    int err;

    if (!range_ok(offset, length))
        return -1;
    /* posix_fadvise returns its error number and leaves errno alone. */
    err = posix_fadvise(fd, (off_t)offset, (off_t)length, POSIX_FADV_DONTNEED);
    if (err != 0) {
        errno = err;
        return -1;
    }
    return 0;
}

int blkcache_datasync(int fd)
{
    return fdatasync(fd) == 0 ? 0 : -1;
}

int blkcache_cachestat(int fd, uint64_t offset, uint64_t length,
                       struct blkcache_stat *st)
{
    struct blkcache_cachestat_range range = { offset, length };
    struct blkcache_cachestat cs;

    /* length 0 would mean "to the end of the file" to the kernel. */
    if (length == 0 || !range_ok(offset, length)) {
        errno = EINVAL;
        return -1;
    }
    memset(&cs, 0, sizeof(cs));
    if (syscall(__NR_cachestat, fd, &range, &cs, 0) != 0)
        return -1;
    st->nr_cache = cs.nr_cache;
    st->nr_dirty = cs.nr_dirty;
    st->nr_writeback = cs.nr_writeback;
    st->nr_evicted = cs.nr_evicted;
    st->nr_recently_evicted = cs.nr_recently_evicted;
    st->interface = BLKCACHE_IF_CACHESTAT;
    return 0;
}

static int have_cap(int cap)
{
    struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct data[2];

    memset(data, 0, sizeof(data));
    if (syscall(SYS_capget, &hdr, data) != 0)
        return 0;
    return (data[cap / 32].effective >> (cap % 32)) & 1;
}

int blkcache_residency_trusted(int fd, int *trusted)
{
    struct stat sb;
    char proc[64];
    int flags;

    flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fstat(fd, &sb) != 0)
        return -1;
    *trusted = 1;
    if ((flags & O_ACCMODE) != O_RDONLY)
        return 0;
    if (sb.st_uid == geteuid() || have_cap(CAP_FOWNER))
        return 0;
    snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
    if (faccessat(AT_FDCWD, proc, W_OK, AT_EACCESS) == 0)
        return 0;
    *trusted = 0;
    return 0;
}

/* Count the bytes of vec whose lowest bit is set, eight at a time. */
static uint64_t count_resident(const unsigned char *vec, size_t n)
{
    const uint64_t ones = 0x0101010101010101ULL;
    uint64_t total = 0;
    size_t i = 0;

    for (; i + 8 <= n; i += 8) {
        uint64_t word;
        memcpy(&word, vec + i, sizeof(word));
        total += (uint64_t)__builtin_popcountll(word & ones);
    }
    for (; i < n; i++)
        total += vec[i] & 1;
    return total;
}

struct mincore_job {
    int fd;
    uint64_t start;     /* page aligned */
    uint64_t end;       /* page aligned, > start */
    uint64_t window;    /* page aligned */
    uint64_t nwindows;
    uint64_t next;      /* next window index, taken atomically */
    uint64_t resident;  /* summed atomically */
    int error;          /* first errno seen */
    unsigned char *base; /* the whole range mapped at once, or NULL */
};

static int mincore_window(struct mincore_job *job, uint64_t idx,
                          unsigned char *vec, uint64_t *resident)
{
    uint64_t off = job->start + idx * job->window;
    uint64_t len = job->end - off < job->window ? job->end - off : job->window;
    uint64_t pages = len / page_size();
    void *map;
    int rc = 0;

    if (job->base != NULL) {
        /* One mapping for the whole range: no mmap/munmap (which take the
         * mmap lock for writing) between the threads' mincore calls. */
        if (mincore(job->base + (off - job->start), (size_t)len, vec) != 0)
            return errno;
        *resident = count_resident(vec, (size_t)pages);
        return 0;
    }
    map = mmap(NULL, (size_t)len, PROT_READ, MAP_SHARED, job->fd, (off_t)off);
    if (map == MAP_FAILED)
        return errno;
    if (mincore(map, (size_t)len, vec) != 0)
        rc = errno;
    else
        *resident = count_resident(vec, (size_t)pages);
    munmap(map, (size_t)len);
    return rc;
}

static void *mincore_worker(void *arg)
{
    struct mincore_job *job = arg;
    unsigned char *vec = malloc((size_t)(job->window / page_size()));
    uint64_t idx, resident;
    int rc;

    if (vec == NULL) {
        __atomic_compare_exchange_n(&job->error, &(int){0}, ENOMEM, 0,
                                    __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
        return NULL;
    }
    while (__atomic_load_n(&job->error, __ATOMIC_SEQ_CST) == 0) {
        idx = __atomic_fetch_add(&job->next, 1, __ATOMIC_SEQ_CST);
        if (idx >= job->nwindows)
            break;
        resident = 0;
        rc = mincore_window(job, idx, vec, &resident);
        if (rc != 0) {
            int expected = 0;
            __atomic_compare_exchange_n(&job->error, &expected, rc, 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
            break;
        }
        __atomic_fetch_add(&job->resident, resident, __ATOMIC_SEQ_CST);
    }
    free(vec);
    return NULL;
}

int blkcache_mincore(int fd, uint64_t offset, uint64_t length,
                     uint64_t window, unsigned int nthreads,
                     struct blkcache_stat *st)
{
    const uint64_t ps = page_size();
    struct mincore_job job;
    pthread_t threads[MINCORE_MAX_THREADS];
    unsigned int started = 0, i;
    int trusted = 0;

    if (!range_ok(offset, length))
        return -1;
    if (blkcache_residency_trusted(fd, &trusted) != 0)
        return -1;
    if (!trusted) {
        /* The kernel would answer "every page resident": cannot tell. */
        errno = EPERM;
        return -1;
    }
    /* Bounded before rounding, so that neither wraps nor mallocs too much. */
    if (window == 0)
        window = MINCORE_DEFAULT_WINDOW;
    else if (window > MINCORE_MAX_WINDOW)
        window = MINCORE_MAX_WINDOW;
    window = (window + ps - 1) / ps * ps;
    if (nthreads == 0)
        nthreads = 1;
    if (nthreads > MINCORE_MAX_THREADS)
        nthreads = MINCORE_MAX_THREADS;

    memset(&job, 0, sizeof(job));
    job.fd = fd;
    job.start = offset / ps * ps;
    job.end = offset + length;
    if (job.end % ps && job.end > UINT64_MAX - ps) {
        errno = EINVAL;
        return -1;
    }
    job.end = (job.end + ps - 1) / ps * ps;
    if (job.end > job.start && window > job.end - job.start)
        window = job.end - job.start;
    job.window = window;
    job.nwindows = job.end > job.start ? (job.end - job.start + window - 1) / window : 0;
    if (nthreads > job.nwindows)
        nthreads = job.nwindows ? (unsigned int)job.nwindows : 1;

    /*
     * Map the whole range once when the address space allows (a mapping
     * costs no memory until touched, and mincore touches nothing); else
     * each window is mapped on its own.
     */
    if (job.end > job.start && job.end - job.start <= SIZE_MAX) {
        void *map = mmap(NULL, (size_t)(job.end - job.start), PROT_READ,
                         MAP_SHARED | MAP_NORESERVE, fd, (off_t)job.start);
        if (map != MAP_FAILED)
            job.base = map;
    }

    /* The calling thread is worker 0; start the others. */
    for (i = 1; i < nthreads; i++) {
        if (pthread_create(&threads[started], NULL, mincore_worker, &job) != 0)
            break;
        started++;
    }
    mincore_worker(&job);
    for (i = 0; i < started; i++)
        pthread_join(threads[i], NULL);
    if (job.base != NULL)
        munmap(job.base, (size_t)(job.end - job.start));

    if (job.error != 0) {
        errno = job.error;
        return -1;
    }
    memset(st, 0, sizeof(*st));
    st->nr_cache = job.resident;
    st->interface = BLKCACHE_IF_MINCORE;
    return 0;
}

int blkcache_cache_stat(int fd, uint64_t offset, uint64_t length, int flags,
                        uint64_t window, unsigned int nthreads,
                        struct blkcache_stat *st)
{
    if (!(flags & BLKCACHE_FORCE_MINCORE)) {
        if (blkcache_cachestat(fd, offset, length, st) == 0)
            return 0;
        /* Only a kernel without cachestat falls back; EPERM means "cannot tell". */
        if (errno != ENOSYS || (flags & BLKCACHE_NO_MINCORE))
            return -1;
    }
    return blkcache_mincore(fd, offset, length, window, nthreads, st);
}

/* ---- coherence scan: residency runs and resident-only reads ---------- */

#define RUNS_MAX_WINDOW (128ULL << 20)

static int window_ok(int fd, uint64_t offset, uint64_t length)
{
    int trusted = 0;

    if (offset % page_size() != 0 || length == 0 || length > RUNS_MAX_WINDOW
        || !range_ok(offset, length)) {
        errno = EINVAL;
        return 0;
    }
    if (blkcache_residency_trusted(fd, &trusted) != 0)
        return 0;
    if (!trusted) {
        errno = EPERM;
        return 0;
    }
    return 1;
}

int blkcache_resident_runs(int fd, uint64_t offset, uint64_t length,
                           uint64_t *runs, uint64_t max_runs, uint64_t *nruns)
{
    const uint64_t ps = page_size();
    uint64_t pages, i, n = 0, start = 0;
    unsigned char *vec = NULL;
    void *map = MAP_FAILED;
    size_t maplen;
    int in_run = 0, rc = -1, err = 0;

    if (!window_ok(fd, offset, length))
        return -1;
    pages = (length + ps - 1) / ps;
    maplen = (size_t)(pages * ps);
    vec = malloc((size_t)pages);
    if (vec == NULL)
        return -1;
    map = mmap(NULL, maplen, PROT_READ, MAP_SHARED, fd, (off_t)offset);
    if (map == MAP_FAILED) {
        err = errno;
        goto out;
    }
    if (mincore(map, maplen, vec) != 0) {
        err = errno;
        goto out;
    }
    for (i = 0; i <= pages; i++) {
        int resident = i < pages && (vec[i] & 1);
        if (resident && !in_run) {
            start = i;
            in_run = 1;
        } else if (!resident && in_run) {
            if (n >= max_runs) {
                err = ENOBUFS;
                goto out;
            }
            runs[2 * n] = offset + start * ps;
            runs[2 * n + 1] = (i - start) * ps;
            n++;
            in_run = 0;
        }
    }
    *nruns = n;
    rc = 0;
out:
    if (map != MAP_FAILED)
        munmap(map, maplen);
    free(vec);
    if (rc != 0)
        errno = err ? err : errno;
    return rc;
}

int blkcache_read_resident(int fd, uint64_t offset, uint64_t length,
                           void *buf, unsigned char *vec)
{
    const uint64_t ps = page_size();
    uint64_t pages, i;
    unsigned char one;
    unsigned char *map;
    size_t maplen;
    int err = 0;

    if (!window_ok(fd, offset, length))
        return -1;
    pages = (length + ps - 1) / ps;
    maplen = (size_t)(pages * ps);
    map = mmap(NULL, maplen, PROT_READ, MAP_SHARED, fd, (off_t)offset);
    if (map == MAP_FAILED)
        return -1;
    /* VM_RAND_READ: faults do neither readaround nor async readahead. */
    if (madvise(map, maplen, MADV_RANDOM) != 0) {
        err = errno;
        goto out;
    }
    for (i = 0; i < pages; i++) {
        if (mincore(map + i * ps, (size_t)ps, &one) != 0) {
            err = errno;
            goto out;
        }
        vec[i] = one & 1;
        if (vec[i])
            memcpy((unsigned char *)buf + i * ps, map + i * ps, (size_t)ps);
    }
out:
    munmap(map, maplen);
    if (err) {
        errno = err;
        return -1;
    }
    return 0;
}

int blkcache_effective_caps(uint64_t *mask)
{
    struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct data[2];

    memset(data, 0, sizeof(data));
    if (syscall(SYS_capget, &hdr, data) != 0)
        return -1;
    *mask = (uint64_t)data[0].effective | (uint64_t)data[1].effective << 32;
    return 0;
}

int blkcache_fd_info(int fd, struct blkcache_info *info)
{
    struct stat sb;

    if (fstat(fd, &sb) != 0)
        return -1;
    memset(info, 0, sizeof(*info));
    info->mode = (unsigned int)sb.st_mode;
    if (S_ISBLK(sb.st_mode)) {
        info->rdev_major = major(sb.st_rdev);
        info->rdev_minor = minor(sb.st_rdev);
        return blkcache_device_size(fd, &info->size);
    }
    info->size = sb.st_size > 0 ? (uint64_t)sb.st_size : 0;
    return 0;
}
