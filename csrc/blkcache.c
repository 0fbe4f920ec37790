/*
 * blkcache native layer.  See blkcache.h for the contract: every function
 * returns 0 or -1 with errno set, and works on an fd the caller opened.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
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

static uint64_t major_faults(void)
{
    struct rusage ru;

    if (getrusage(RUSAGE_THREAD, &ru) != 0)
        return 0;
    return (uint64_t)ru.ru_majflt;
}

/* Compare the wanted pages of one group (vec: their residency, just taken). */
static void compare_group(const unsigned char *map, const unsigned char *disk,
                          uint64_t first, uint64_t count, uint64_t disk_valid,
                          const unsigned char *vec, unsigned char *result)
{
    const uint64_t ps = page_size();
    uint64_t i, at, n;

    for (i = 0; i < count; i++) {
        unsigned char *res = result + first + i;

        if (*res != BLKCACHE_PAGE_WANTED)
            continue;
        if (!(vec[i] & 1)) {
            *res = BLKCACHE_PAGE_GONE;
            continue;
        }
        at = (first + i) * ps;
        n = disk_valid - at < ps ? disk_valid - at : ps;
        *res = memcmp(map + at, disk + at, (size_t)n) == 0
               ? BLKCACHE_PAGE_SAME : BLKCACHE_PAGE_DIFFERS;
    }
}

int blkcache_compare_resident(int fd, uint64_t offset, uint64_t length,
                              const void *disk, uint64_t disk_valid,
                              unsigned char *result, uint64_t *faults)
{
    const uint64_t ps = page_size();
    unsigned char vec[BLKCACHE_COMPARE_GROUP];
    uint64_t pages, first, count, i, before;
    unsigned char *map;
    size_t maplen;
    int err = 0;

    if (!window_ok(fd, offset, length))
        return -1;
    pages = (length + ps - 1) / ps;
    for (i = 0; i < pages; i++) {
        if (result[i] == BLKCACHE_PAGE_WANTED && i * ps >= disk_valid) {
            errno = EINVAL;
            return -1;
        }
    }
    maplen = (size_t)(pages * ps);
    map = mmap(NULL, maplen, PROT_READ, MAP_SHARED, fd, (off_t)offset);
    if (map == MAP_FAILED)
        return -1;
    /* VM_RAND_READ: faults do neither readaround nor async readahead. */
    if (madvise(map, maplen, MADV_RANDOM) != 0) {
        err = errno;
        goto out;
    }
    before = major_faults();
    for (first = 0; first < pages; first += count) {
        count = pages - first < BLKCACHE_COMPARE_GROUP
                ? pages - first : BLKCACHE_COMPARE_GROUP;
        for (i = 0; i < count && result[first + i] != BLKCACHE_PAGE_WANTED; i++)
            ;
        if (i == count)
            continue;       /* nothing wanted here: not even mincore */
        if (mincore(map + first * ps, (size_t)(count * ps), vec) != 0) {
            err = errno;
            goto out;
        }
        compare_group(map, disk, first, count, disk_valid, vec, result);
    }
    *faults = major_faults() - before;
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


/* ---- holders: a scan of /proc ------------------------------------------ */

#define MAPS_BUF (128 * 1024)
#define HOLDER_THREADS 4
#define PIDS_PER_TAKE 32

/* What every scanning thread shares. */
struct holder_job {
    int proc_fd;
    dev_t rdev;
    const uint64_t *nodes;
    unsigned int nnodes;
    int skip_pid, skip_fd;
    int *pids;
    size_t npids;
    size_t next;            /* next index into pids, taken atomically */
};

/* One thread's findings. */
struct holder_scan {
    struct holder_job *job;
    struct blkcache_holder *found;
    size_t n, room;
    uint64_t unreadable;
    int error;              /* ENOMEM */
    char *buf;              /* MAPS_BUF + 1 bytes */
};

static void add_holder(struct holder_scan *s, int pid, int fd)
{
    if (s->n == s->room) {
        size_t room = s->room ? 2 * s->room : 16;
        struct blkcache_holder *more = realloc(s->found, room * sizeof(*more));
        if (more == NULL) {
            s->error = ENOMEM;
            return;
        }
        s->found = more;
        s->room = room;
    }
    s->found[s->n].pid = pid;
    s->found[s->n].fd = fd;
    s->n++;
}

static int is_the_device(const struct holder_job *job, int dirfd, const char *name)
{
    struct stat sb;

    return fstatat(dirfd, name, &sb, 0) == 0 && S_ISBLK(sb.st_mode)
           && sb.st_rdev == job->rdev;
}

/* The kernel's struct linux_dirent64, as getdents64(2) returns it. */
struct dirent64_raw {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

/* Descriptors of pid on the device; -1 with errno if the fd directory
 * cannot be read.  getdents64 directly: opendir would add an fstat and an
 * fcntl for each of thousands of processes. */
static int scan_fds(struct holder_scan *s, int pid)
{
    const struct holder_job *job = s->job;
    char path[32], link[6], ents[8192];
    long got, pos;
    ssize_t len;
    int dfd, fd;

    snprintf(path, sizeof(path), "%d/fd", pid);
    dfd = openat(job->proc_fd, path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return -1;
    while ((got = syscall(SYS_getdents64, dfd, ents, sizeof(ents))) > 0) {
        for (pos = 0; pos < got; pos += ((struct dirent64_raw *)(ents + pos))->d_reclen) {
            const char *name = ((struct dirent64_raw *)(ents + pos))->d_name;

            if (name[0] < '0' || name[0] > '9')
                continue;
            fd = atoi(name);
            if (pid == job->skip_pid && fd == job->skip_fd)
                continue;
            /* Only the first five bytes matter: is the target under /dev/? */
            len = readlinkat(dfd, name, link, sizeof(link));
            if (len < 5 || memcmp(link, "/dev/", 5) != 0)
                continue;
            if (is_the_device(job, dfd, name))
                add_holder(s, pid, fd);
        }
    }
    if (got < 0) {
        int err = errno;
        close(dfd);
        errno = err;
        return -1;
    }
    close(dfd);
    return 0;
}

/* Whether one maps line names the device. */
static int maps_line_matches(const struct holder_job *job, const char *line)
{
    unsigned int major, minor, i;
    unsigned long long inode;
    const char *p = line;
    int field, consumed = 0;

    for (field = 0; field < 3; field++) {       /* range, perms, offset */
        p = strchr(p, ' ');
        if (p == NULL)
            return 0;
        p++;
    }
    if (sscanf(p, "%x:%x %llu%n", &major, &minor, &inode, &consumed) != 3 || inode == 0)
        return 0;
    for (i = 0; i < job->nnodes; i++) {
        if (job->nodes[2 * i] == (uint64_t)makedev(major, minor)
            && job->nodes[2 * i + 1] == inode)
            return 1;
    }
    p += consumed;
    while (*p == ' ')
        p++;
    return strncmp(p, "/dev/", 5) == 0 && is_the_device(job, AT_FDCWD, p);
}

/* 1 if pid maps the device, 0 if not, -1 with errno if maps cannot be read. */
static int scan_maps(struct holder_scan *s, int pid)
{
    char path[32];
    size_t have = 0;
    int fd, found = 0;

    snprintf(path, sizeof(path), "%d/maps", pid);
    fd = openat(s->job->proc_fd, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    for (;;) {
        ssize_t got = read(fd, s->buf + have, MAPS_BUF - have);
        char *line, *nl;

        if (got < 0) {
            int err = errno;
            close(fd);
            errno = err;
            return -1;
        }
        have += (size_t)got;
        s->buf[have] = '\0';
        line = s->buf;
        while ((nl = strchr(line, '\n')) != NULL) {
            *nl = '\0';
            if (maps_line_matches(s->job, line)) {
                found = 1;
                break;
            }
            line = nl + 1;
        }
        if (found || got == 0)
            break;
        /* Keep the partial last line; a line longer than the buffer is cut. */
        have = (size_t)(s->buf + have - line);
        if (have == MAPS_BUF)
            have = 0;
        memmove(s->buf, line, have);
    }
    close(fd);
    return found;
}

static void scan_pid(struct holder_scan *s, int pid)
{
    size_t mark = s->n;
    int mapped;

    if (scan_fds(s, pid) == 0) {
        mapped = scan_maps(s, pid);
        if (mapped > 0)
            add_holder(s, pid, -1);
        if (mapped >= 0)
            return;
    }
    /* Nothing of this pid is listed unless both could be read. */
    s->n = mark;
    if (errno == EACCES || errno == EPERM)
        s->unreadable++;
}

static void *holder_worker(void *arg)
{
    struct holder_scan *s = arg;
    struct holder_job *job = s->job;
    size_t i, first;

    for (;;) {
        first = __atomic_fetch_add(&job->next, PIDS_PER_TAKE, __ATOMIC_RELAXED);
        if (first >= job->npids)
            break;
        for (i = first; i < first + PIDS_PER_TAKE && i < job->npids; i++)
            scan_pid(s, job->pids[i]);
    }
    return NULL;
}

/* The numeric entries of proc: *pids malloc'd. */
static int list_pids(int proc_fd, int **pids, size_t *npids)
{
    size_t n = 0, room = 1024;
    int *list = malloc(room * sizeof(*list)), *more;
    struct dirent *de;
    DIR *dir;
    int fd = dup(proc_fd);

    if (list == NULL || fd < 0 || (dir = fdopendir(fd)) == NULL) {
        int err = errno;
        if (fd >= 0)
            close(fd);
        free(list);
        errno = err;
        return -1;
    }
    while ((de = readdir(dir)) != NULL) {
        if (de->d_name[0] < '1' || de->d_name[0] > '9')
            continue;
        if (n == room) {
            more = realloc(list, 2 * room * sizeof(*list));
            if (more == NULL) {
                closedir(dir);
                free(list);
                errno = ENOMEM;
                return -1;
            }
            list = more;
            room *= 2;
        }
        list[n++] = atoi(de->d_name);
    }
    closedir(dir);
    *pids = list;
    *npids = n;
    return 0;
}

static int holder_order(const void *a, const void *b)
{
    const struct blkcache_holder *x = a, *y = b;

    if (x->pid != y->pid)
        return x->pid < y->pid ? -1 : 1;
    /* descriptors in order, the mapping (-1) last */
    if (x->fd != y->fd)
        return (unsigned int)x->fd < (unsigned int)y->fd ? -1 : 1;
    return 0;
}

static unsigned int holder_threads(size_t npids)
{
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    size_t n = cpus > 0 ? (size_t)cpus : 1;

    if (n > HOLDER_THREADS)
        n = HOLDER_THREADS;
    if (n > npids / PIDS_PER_TAKE + 1)
        n = npids / PIDS_PER_TAKE + 1;
    return (unsigned int)n;
}

int blkcache_scan_holders(const char *proc, uint64_t rdev,
                          const uint64_t *nodes, unsigned int nnodes,
                          int skip_pid, int skip_fd,
                          struct blkcache_holder *out, uint64_t max_out,
                          uint64_t *nout, uint64_t *unreadable)
{
    struct holder_scan scans[HOLDER_THREADS];
    pthread_t threads[HOLDER_THREADS];
    struct holder_job job;
    unsigned int nthreads, started = 0, i;
    size_t total = 0;
    int err = 0;

    memset(&job, 0, sizeof(job));
    memset(scans, 0, sizeof(scans));
    job.rdev = (dev_t)rdev;
    job.nodes = nodes;
    job.nnodes = nnodes;
    job.skip_pid = skip_pid;
    job.skip_fd = skip_fd;
    job.proc_fd = open(proc, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (job.proc_fd < 0)
        return -1;
    if (list_pids(job.proc_fd, &job.pids, &job.npids) != 0) {
        err = errno;
        close(job.proc_fd);
        errno = err;
        return -1;
    }
    nthreads = holder_threads(job.npids);
    for (i = 0; i < nthreads; i++) {
        scans[i].job = &job;
        scans[i].buf = malloc(MAPS_BUF + 1);
        if (scans[i].buf == NULL) {
            err = ENOMEM;
            goto out;
        }
    }
    /* The calling thread is scanner 0. */
    for (i = 1; i < nthreads; i++) {
        if (pthread_create(&threads[started], NULL, holder_worker, &scans[i]) != 0)
            break;
        started++;
    }
    holder_worker(&scans[0]);
    for (i = 0; i < started; i++)
        pthread_join(threads[i], NULL);

    *unreadable = 0;
    for (i = 0; i < nthreads; i++) {
        if (scans[i].error)
            err = scans[i].error;
        for (size_t k = 0; k < scans[i].n; k++) {
            if (total < max_out)
                out[total] = scans[i].found[k];
            total++;
        }
        *unreadable += scans[i].unreadable;
    }
    *nout = total;
    if (!err && total > max_out)
        err = ENOBUFS;
    if (!err)
        qsort(out, (size_t)total, sizeof(*out), holder_order);
out:
    for (i = 0; i < nthreads; i++) {
        free(scans[i].buf);
        free(scans[i].found);
    }
    free(job.pids);
    close(job.proc_fd);
    if (err) {
        errno = err;
        return -1;
    }
    return 0;
}
