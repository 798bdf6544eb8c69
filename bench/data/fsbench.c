/* Metadata timings on a container's root filesystem, run inside the container by bench/fs_bench.py:
 * create, stat and unlink of N files in /tmp (the writable layer), and a walk (lstat of every entry)
 * of a directory tree of the image (the read-only layers). Prints "name seconds cpu-seconds start"
 * lines: the phase's wall time, the process's CPU time in it, and CLOCK_MONOTONIC when it started.
 * argv: N, tree, and gap (milliseconds, default 0): a pause before each phase and after the last, so
 * that the host can tell the phases apart in the VM's vCPU time. */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double clock_s(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double now(void) { return clock_s(CLOCK_MONOTONIC); }

static double t0, cpu0;
static int gap_ms;

static void begin(void) {
    if (gap_ms) usleep(gap_ms * 1000);
    t0 = now();
    cpu0 = clock_s(CLOCK_PROCESS_CPUTIME_ID);
}

static void end(const char *name) {
    double t = now();
    printf("%s %.6f %.6f %.6f\n", name, t - t0, clock_s(CLOCK_PROCESS_CPUTIME_ID) - cpu0, t0);
    fflush(stdout);
}

static long walk(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    long n = 0;
    struct dirent *e;
    char path[4096];
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        struct stat st;
        if (lstat(path, &st)) continue;
        n++;
        if (S_ISDIR(st.st_mode)) n += walk(path);
    }
    closedir(d);
    return n;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 2000;
    const char *tree = argc > 2 ? argv[2] : "/usr";
    gap_ms = argc > 3 ? atoi(argv[3]) : 0;
    char name[64];
    struct stat st;
    if (mkdir("/tmp/fsbench", 0755) || chdir("/tmp/fsbench")) return 2;
    begin();
    for (int i = 0; i < n; i++) {
        snprintf(name, sizeof name, "f%05d", i);
        int fd = open(name, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0 || write(fd, "x", 1) != 1) return 3;
        close(fd);
    }
    end("create");
    begin();
    for (int i = 0; i < n; i++) {
        snprintf(name, sizeof name, "f%05d", i);
        if (stat(name, &st)) return 4;
    }
    end("stat");
    begin();
    for (int i = 0; i < n; i++) {
        snprintf(name, sizeof name, "f%05d", i);
        if (unlink(name)) return 5;
    }
    end("unlink");
    begin();
    long entries = walk(tree);
    end("walk");
    /* the same walk again: what the file system costs once its dentries and inodes exist */
    begin();
    walk(tree);
    end("rewalk");
    if (gap_ms) usleep(gap_ms * 1000);
    fprintf(stderr, "walked %ld entries of %s\n", entries, tree);
    return 0;
}
