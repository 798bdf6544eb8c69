/* Metadata timings on a container's root filesystem, run inside the container by bench/fs_bench.py:
 * create, stat and unlink of N files in /tmp (the writable layer), and a walk (lstat of every entry)
 * of a directory tree of the image (the read-only layers). Prints "name seconds" lines. */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
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
    char name[64];
    struct stat st;
    if (mkdir("/tmp/fsbench", 0755) || chdir("/tmp/fsbench")) return 2;
    double t = now();
    for (int i = 0; i < n; i++) {
        snprintf(name, sizeof name, "f%05d", i);
        int fd = open(name, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0 || write(fd, "x", 1) != 1) return 3;
        close(fd);
    }
    printf("create %.6f\n", now() - t);
    t = now();
    for (int i = 0; i < n; i++) {
        snprintf(name, sizeof name, "f%05d", i);
        if (stat(name, &st)) return 4;
    }
    printf("stat %.6f\n", now() - t);
    t = now();
    for (int i = 0; i < n; i++) {
        snprintf(name, sizeof name, "f%05d", i);
        if (unlink(name)) return 5;
    }
    printf("unlink %.6f\n", now() - t);
    t = now();
    long entries = walk(tree);
    printf("walk %.6f\n", now() - t);
    /* the same walk again: what the file system costs once its dentries and inodes exist */
    t = now();
    walk(tree);
    printf("rewalk %.6f\n", now() - t);
    fprintf(stderr, "walked %ld entries of %s\n", entries, tree);
    return 0;
}
