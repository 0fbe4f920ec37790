/* launch ARGV...: run ARGV with stdout on /dev/null; print "wall maxrss status".
 * A separate small process, because a child's ru_maxrss includes the memory
 * of the process that forked it (the old mm's high-water mark is kept at
 * exec), so children of the bench itself would all show its RSS. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    struct timespec t0, t1;
    struct rusage ru;
    int status, null;
    pid_t pid;

    if (argc < 2)
        return 127;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pid = fork();
    if (pid == 0) {
        null = open("/dev/null", O_WRONLY);
        if (null >= 0)
            dup2(null, 1);
        execv(argv[1], argv + 1);
        _exit(127);
    }
    if (pid < 0 || wait4(pid, &status, 0, &ru) != pid)
        return 127;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%.9f %ld %d\n", (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9,
           ru.ru_maxrss, WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    return 0;
}
