/* pykata: a template clone's QEMU opens the template's memory file read-only.
 *
 * Loaded into a clone's QEMU with LD_PRELOAD (pykata/hypervisor/qemu/ramreadonly.py says why): open()
 * of exactly the path in PYKATA_RAM_READONLY asked read-write (QEMU 7.2's memory-backend-file always
 * asks so) opens it read-only; every other open is untouched. QEMU maps that file privately, which
 * needs only read access.
 *
 * Also, for memory only: madvise(MADV_HUGEPAGE) of a region of at most 2 MiB becomes MADV_NOHUGEPAGE.
 * QEMU 7.2 asks for huge pages on every RAM block, and maps each one 2 MiB-aligned; the ACPI tables'
 * ROM (a few KiB of content, 2 MiB of address space) is written by the state load, so the kernel gave
 * each clone a whole 2 MiB huge page for it. Guest RAM and TCG's code buffer (far larger) keep theirs.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>

static int pykata_flags(const char *path, int flags)
{
    const char *only = getenv("PYKATA_RAM_READONLY");
    if (only != NULL && path != NULL && strcmp(path, only) == 0 && (flags & O_ACCMODE) == O_RDWR
        && !(flags & O_CREAT))
        return (flags & ~O_ACCMODE) | O_RDONLY;
    return flags;
}

#define PYKATA_OPEN(name)                                                          \
    int name(const char *path, int flags, ...)                                     \
    {                                                                              \
        static int (*real)(const char *, int, ...);                                \
        mode_t mode = 0;                                                           \
        if (flags & O_CREAT || (flags & O_TMPFILE) == O_TMPFILE) {                 \
            va_list ap;                                                            \
            va_start(ap, flags);                                                   \
            mode = va_arg(ap, mode_t);                                             \
            va_end(ap);                                                            \
        }                                                                          \
        if (real == NULL)                                                          \
            real = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, #name);       \
        return real(path, pykata_flags(path, flags), mode);                        \
    }

PYKATA_OPEN(open)
PYKATA_OPEN(open64)

/* _FORTIFY_SOURCE's open() when the flags are not known at compile time (QEMU 7.2's file_ram_open) */
#define PYKATA_OPEN_2(name)                                                        \
    int name(const char *path, int flags)                                          \
    {                                                                              \
        static int (*real)(const char *, int);                                     \
        if (real == NULL)                                                          \
            real = (int (*)(const char *, int))dlsym(RTLD_NEXT, #name);            \
        return real(path, pykata_flags(path, flags));                              \
    }

PYKATA_OPEN_2(__open_2)
PYKATA_OPEN_2(__open64_2)

/* at most this long: a ROM or firmware table, never guest RAM or TCG's code buffer (see the top) */
#define PYKATA_SMALL_BLOCK (2UL << 20)

int madvise(void *addr, size_t length, int advice)
{
    static int (*real)(void *, size_t, int);
    if (real == NULL)
        real = (int (*)(void *, size_t, int))dlsym(RTLD_NEXT, "madvise");
    if (advice == MADV_HUGEPAGE && length <= PYKATA_SMALL_BLOCK)
        advice = MADV_NOHUGEPAGE;
    return real(addr, length, advice);
}
