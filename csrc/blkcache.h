/*
 * blkcache native layer: fd-based shims around the kernel's page-cache
 * interfaces for block devices and regular files.
 *
 * This header is read verbatim by cffi's cdef (blkcache/_ffi_build.py), so
 * it holds declarations only: no #include, no #if, no macros other than
 * integer constants.  Every function returns 0 on success or -1 with errno
 * set; results come back through out-parameters.
 */

/* Which kernel interface answered a residency query. */
#define BLKCACHE_IF_CACHESTAT 1
#define BLKCACHE_IF_MINCORE 2

/* Flags for blkcache_cache_stat(). */
#define BLKCACHE_FORCE_MINCORE 1     /* skip cachestat(2), use mincore(2) */
#define BLKCACHE_NO_MINCORE 2        /* cachestat(2) only; ENOSYS is an error */

struct blkcache_stat {
    uint64_t nr_cache;            /* pages resident in the range */
    uint64_t nr_dirty;            /* cachestat only */
    uint64_t nr_writeback;        /* cachestat only */
    uint64_t nr_evicted;          /* cachestat only */
    uint64_t nr_recently_evicted; /* cachestat only */
    int interface;                /* BLKCACHE_IF_* */
};

/* ioctl(BLKFLSBUF): sync, then invalidate the device's page cache. */
int blkcache_flush_buffers(int fd);

/* ioctl(BLKGETSIZE64): device size in bytes. */
int blkcache_device_size(int fd, uint64_t *size);

/*
 * ioctl(BLKGETDISKSEQ): the disk sequence number, unique per attached disk
 * for the life of the boot (a partition reports its disk's).  ENOTTY before
 * Linux 5.15.
 */
int blkcache_disk_seq(int fd, uint64_t *seq);

/* ioctl(BLKSSZGET): logical block size in bytes. */
int blkcache_logical_block_size(int fd, unsigned int *size);

/* posix_fadvise(POSIX_FADV_DONTNEED) on [offset, offset + length). */
int blkcache_drop_range(int fd, uint64_t offset, uint64_t length);

/* fdatasync(2): write back dirty pages, report a write-back error once. */
int blkcache_datasync(int fd);

/* cachestat(2) on [offset, offset + length); length must be > 0. */
int blkcache_cachestat(int fd, uint64_t offset, uint64_t length,
                       struct blkcache_stat *st);

/*
 * mincore(2) over read-only shared mappings of at most window bytes
 * (rounded up to pages; 0 means 128 MiB, at most 1 GiB), using up to nthreads
 * threads (0 or 1: the calling thread only).  Memory stays bounded by
 * nthreads * window / page size bytes.
 */
int blkcache_mincore(int fd, uint64_t offset, uint64_t length,
                     uint64_t window, unsigned int nthreads,
                     struct blkcache_stat *st);

/*
 * Whether the kernel will tell this caller the truth about fd's page cache:
 * the fd is open for writing, the caller owns the inode, may write to it, or
 * has CAP_FOWNER.  This mirrors the kernel's rule for mincore(2) (which
 * otherwise reports every page resident) and cachestat(2) since 6.14 (which
 * otherwise fails with EPERM).  *trusted is set to 1 or 0.
 */
int blkcache_residency_trusted(int fd, int *trusted);

/*
 * Residency of [offset, offset + length): cachestat(2) first; on ENOSYS
 * only (or with BLKCACHE_FORCE_MINCORE), mincore(2).  EPERM from cachestat
 * is returned as is: it means "cannot tell", never "no pages".  The mincore
 * path fails with EPERM when blkcache_residency_trusted() says no, since the
 * kernel would report every page resident.
 */
int blkcache_cache_stat(int fd, uint64_t offset, uint64_t length, int flags,
                        uint64_t window, unsigned int nthreads,
                        struct blkcache_stat *st);

/*
 * Migration toolkit (coherence scan).
 *
 * blkcache_resident_runs: mincore(2) over one read-only mapping of
 * [offset, offset + length) (offset page aligned, length at most 128 MiB,
 * rounded up to whole pages) and the resident pages as runs: runs[2*i] is
 * the byte offset and runs[2*i+1] the byte length of run i.  max_runs is the
 * capacity in runs ((pages + 1) / 2 always suffices); too small: ENOBUFS.
 * EPERM when blkcache_residency_trusted() says no (the kernel would report
 * every page resident).
 */
int blkcache_resident_runs(int fd, uint64_t offset, uint64_t length,
                           uint64_t *runs, uint64_t max_runs, uint64_t *nruns);

/*
 * blkcache_compare_resident: compare the cached pages of [offset,
 * offset + length) with the device's bytes in disk (the same range, read
 * with O_DIRECT by the caller), without reading any page into the cache.
 * The cache is read through one read-only MADV_RANDOM mapping (no
 * readahead, synchronous or asynchronous), BLKCACHE_COMPARE_GROUP pages at a
 * time: mincore(2) on a group right before its pages are compared, so that a
 * page evicted since the caller's residency map is reported, not faulted back
 * in.  result holds one byte per page: on entry BLKCACHE_PAGE_SKIP (leave the
 * page alone) or BLKCACHE_PAGE_WANTED; on return, for the pages wanted,
 * BLKCACHE_PAGE_GONE (not resident: not read), BLKCACHE_PAGE_SAME or
 * BLKCACHE_PAGE_DIFFERS.  Only the first disk_valid bytes of disk are the
 * device's: a wanted page past them must not be passed.  *faults is set to
 * the major page faults taken meanwhile (pages read in despite the check,
 * should one go between mincore and the comparison: normally 0).
 * offset page aligned, length at most 128 MiB.  EPERM as for
 * blkcache_resident_runs.
 */
#define BLKCACHE_COMPARE_GROUP 16
#define BLKCACHE_PAGE_SKIP 0
#define BLKCACHE_PAGE_WANTED 1
#define BLKCACHE_PAGE_GONE 2
#define BLKCACHE_PAGE_SAME 3
#define BLKCACHE_PAGE_DIFFERS 4

int blkcache_compare_resident(int fd, uint64_t offset, uint64_t length,
                              const void *disk, uint64_t disk_valid,
                              unsigned char *result, uint64_t *faults);

/* capget(2): the effective capability set of the calling thread, a bit mask. */
int blkcache_effective_caps(uint64_t *mask);


/*
 * Holders of a block device: processes with a descriptor on it or a mapping
 * of it, found under proc (normally "/proc").
 *
 * A descriptor is a /proc/PID/fd link whose target lies under /dev/ and
 * which, stat()ed through the link, is block device rdev (targets elsewhere
 * are not stat()ed, so that a hung network file system cannot hang the
 * scan).  A mapping is a /proc/PID/maps line naming one of the nnodes
 * device nodes (nodes[2*i] its st_dev, nodes[2*i+1] its st_ino), or a path
 * under /dev/ that is block device rdev.  The descriptor skip_fd of process
 * skip_pid is not listed.  Each holder is one record per descriptor, and
 * one with fd -1 for a mapping, in pid order; more than max_out: ENOBUFS
 * (*nout says how many were needed).  *unreadable counts the processes whose
 * fds or maps the caller may not read (EACCES/EPERM): the list may be short.
 * Processes that exit meanwhile are skipped.
 */
struct blkcache_holder {
    int pid;
    int fd;
};

int blkcache_scan_holders(const char *proc, uint64_t rdev,
                          const uint64_t *nodes, unsigned int nnodes,
                          int skip_pid, int skip_fd,
                          struct blkcache_holder *out, uint64_t max_out,
                          uint64_t *nout, uint64_t *unreadable);
