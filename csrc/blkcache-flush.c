/*
 * blkcache-flush: drop the page cache of one block device with
 * ioctl(BLKFLSBUF), for callers without CAP_SYS_ADMIN.
 *
 * Installed with the file capability cap_sys_admin+p (permitted only, never
 * effective at exec, never setuid).  The whole program is the following
 * sequence; see man/blkcache-flush.8 for the threat model.
 *
 *   1. make stdin, stdout and stderr valid fds (/dev/null if closed), so no
 *      fd this program opens can be mistaken for one of them;
 *   2. no_new_privs and not dumpable; keep only CAP_SYS_ADMIN in the
 *      permitted set, empty effective and inheritable sets (this also
 *      empties the ambient set);
 *   3. exactly one argument: a path or "fd:N" (N a decimal fd the caller
 *      passed down, digits only);
 *   4. fail unless CAP_SYS_ADMIN is permitted (so "fd:0" with /dev/null on
 *      stdin tells a caller whether the kernel grants the capability: exit 2
 *      "not a block device" if it does, exit 1 if it does not);
 *   5. a path is first opened O_PATH (which opens nothing behind it: no
 *      FIFO writer released, no watchdog armed, no tty acquired) and
 *      fstat'ed: only a block device goes on, reopened through
 *      /proc/self/fd (the same inode, no second lookup) with the caller's
 *      own permissions (effective set empty: no CAP_DAC_OVERRIDE),
 *      read-only, O_NONBLOCK|O_CLOEXEC|O_NOCTTY; or fd N must be open and
 *      not an O_PATH fd;
 *   6. fstat the fd: only a block device is accepted;
 *   7. raise CAP_SYS_ADMIN into the effective set, ioctl(BLKFLSBUF), then
 *      drop every capability;
 *   8. exit 0 (flushed), 1 (the operation failed) or 2 (usage or bad input),
 *      with one "blkcache-flush: ..." line on stderr on failure.
 *
 * It reads no environment variable, executes nothing and writes no file.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <linux/capability.h>
#include <linux/fs.h>

#define PROG "blkcache-flush"
#define FD_PREFIX "fd:"

enum { EXIT_FLUSHED = 0, EXIT_FAILED = 1, EXIT_USAGE = 2 };

typedef struct __user_cap_data_struct capdata_t[_LINUX_CAPABILITY_U32S_3];

/* The argument as given, printable ASCII: every other byte becomes \xNN. */
static void put_escaped(const char *s)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c < 0x20 || c >= 0x7f)
            fprintf(stderr, "\\x%02x", c);
        else
            fputc(c, stderr);
    }
}

/*
 * One line on stderr, for people: "blkcache-flush: ARG: WHAT[: strerror(err)]".
 * With an errno, also the number alone on stdout, for the program that ran us.
 */
static void fail(const char *arg, const char *what, int err)
{
    fputs(PROG ": ", stderr);
    if (arg != NULL) {
        put_escaped(arg);
        fputs(": ", stderr);
    }
    fputs(what, stderr);
    if (err != 0)
        fprintf(stderr, ": %s", strerror(err));
    fputc('\n', stderr);
    if (err != 0)
        printf("%d\n", err);
}

static int usage(void)
{
    fputs(PROG ": usage: " PROG " DEVICE | fd:N (exactly one argument)\n", stderr);
    return EXIT_USAGE;
}

static int cap_get(capdata_t data)
{
    struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };

    memset(data, 0, sizeof(capdata_t));
    return (int)syscall(SYS_capget, &hdr, data);
}

/* Set permitted to {CAP_SYS_ADMIN} or {}, effective to the same or {}. */
static int cap_set(int permitted, int effective)
{
    struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
    capdata_t data;
    const __u32 bit = CAP_TO_MASK(CAP_SYS_ADMIN);

    memset(data, 0, sizeof(data));
    if (permitted)
        data[CAP_TO_INDEX(CAP_SYS_ADMIN)].permitted = bit;
    if (effective)
        data[CAP_TO_INDEX(CAP_SYS_ADMIN)].effective = bit;
    return (int)syscall(SYS_capset, &hdr, data);
}

/* 0, 1 and 2 open; a closed one gets /dev/null.  -1 if that fails. */
static int sanitize_std_fds(void)
{
    int fd;

    for (fd = 0; fd <= 2; fd++) {
        if (fcntl(fd, F_GETFD) >= 0 || errno != EBADF)
            continue;
        if (open("/dev/null", O_RDWR | O_NOCTTY) != fd)
            return -1;
    }
    return 0;
}

/*
 * Open block device PATH read-only without opening anything else: the type
 * is checked on an O_PATH fd, then that same inode is reopened through
 * /proc/self/fd.  Returns the fd, or -1 with errno (ENOTBLK: not a block
 * device; ENOENT from the reopen: /proc is not mounted).
 */
static int open_block_device(const char *path)
{
    char proc[sizeof("/proc/self/fd/") + 3 * sizeof(int)];
    struct stat sb;
    int pfd, fd = -1, err;

    pfd = open(path, O_PATH | O_CLOEXEC);
    if (pfd < 0)
        return -1;
    if (fstat(pfd, &sb) != 0)
        goto out;
    if (!S_ISBLK(sb.st_mode)) {
        errno = ENOTBLK;
        goto out;
    }
    snprintf(proc, sizeof(proc), "/proc/self/fd/%d", pfd);
    fd = open(proc, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
out:
    err = errno;
    close(pfd);
    errno = err;
    return fd;
}

/* "fd:N" with N decimal digits only, no sign, no leading zero, <= INT_MAX. */
static int parse_fd(const char *arg, int *fd)
{
    const char *p = arg + strlen(FD_PREFIX);
    long value = 0;

    if (*p == '\0' || (p[0] == '0' && p[1] != '\0'))
        return -1;
    for (; *p; p++) {
        if (*p < '0' || *p > '9')
            return -1;
        value = value * 10 + (*p - '0');
        if (value > INT_MAX)
            return -1;
    }
    *fd = (int)value;
    return 0;
}

int main(int argc, char **argv)
{
    capdata_t caps;
    struct stat sb;
    const char *arg;
    int fd = -1, flags, permitted, rc, err;

    if (sanitize_std_fds() != 0)
        return EXIT_FAILED;
    /* Best effort: neither can fail for a caller that may run us at all. */
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);

    if (cap_get(caps) != 0) {
        fail(NULL, "cannot read capabilities", errno);
        return EXIT_FAILED;
    }
    permitted = (caps[CAP_TO_INDEX(CAP_SYS_ADMIN)].permitted &
                 CAP_TO_MASK(CAP_SYS_ADMIN)) != 0;
    if (cap_set(permitted, 0) != 0) {
        fail(NULL, "cannot drop capabilities", errno);
        return EXIT_FAILED;
    }

    if (argc != 2 || argv[1][0] == '\0' || argv[1][0] == '-')
        return usage();
    arg = argv[1];

    if (strncmp(arg, FD_PREFIX, strlen(FD_PREFIX)) == 0 && parse_fd(arg, &fd) != 0) {
        fail(arg, "not a file descriptor number", 0);
        return EXIT_USAGE;
    }
    if (!permitted) {
        fail(arg, "CAP_SYS_ADMIN is not permitted to this program "
             "(an administrator grants it with setcap cap_sys_admin+p)", EPERM);
        return EXIT_FAILED;
    }

    if (fd >= 0) {
        flags = fcntl(fd, F_GETFL);
        if (flags < 0) {
            fail(arg, "not an open file descriptor", errno);
            return EXIT_USAGE;
        }
        if (flags & O_PATH) {
            fail(arg, "an O_PATH descriptor grants no access", 0);
            return EXIT_USAGE;
        }
    } else {
        /* Effective set empty: the caller's own permissions decide. */
        fd = open_block_device(arg);
        if (fd < 0) {
            err = errno;
            if (err == ENOTBLK) {
                fail(arg, "not a block device", 0);
                return EXIT_USAGE;
            }
            fail(arg, "cannot open", err);
            return err == ENOENT || err == ENOTDIR ? EXIT_USAGE : EXIT_FAILED;
        }
    }

    if (fstat(fd, &sb) != 0) {
        fail(arg, "cannot stat", errno);
        return EXIT_FAILED;
    }
    if (!S_ISBLK(sb.st_mode)) {
        fail(arg, "not a block device", 0);
        return EXIT_USAGE;
    }

    /* The only moment any capability is effective. */
    if (cap_set(1, 1) != 0) {
        fail(arg, "cannot raise CAP_SYS_ADMIN", errno);
        return EXIT_FAILED;
    }
    rc = ioctl(fd, BLKFLSBUF, 0);
    err = errno;
    if (cap_set(0, 0) != 0) {
        fail(arg, "cannot drop capabilities", errno);
        return EXIT_FAILED;
    }

    if (rc != 0) {
        fail(arg, "BLKFLSBUF failed", err);
        return EXIT_FAILED;
    }
    return EXIT_FLUSHED;
}
