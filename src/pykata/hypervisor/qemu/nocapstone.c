/* pykata: a stand-in for libcapstone.so.4 in a template clone's QEMU (see nocapstone.py).
 *
 * QEMU links the capstone disassembler for its logs and monitor only (-d in_asm, HMP x/i); nothing a
 * pod's VM does calls it. Loaded with LD_PRELOAD under the soname libcapstone.so.4, this library
 * satisfies QEMU's DT_NEEDED entry, so the real one (1.3 MiB of relocated tables, private to every
 * QEMU) is never mapped. Every entry point fails as capstone does for an architecture it lacks; QEMU
 * then disassembles with its own code, or prints bytes.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef size_t csh;
enum { CS_ERR_OK = 0, CS_ERR_ARCH = 2, CS_ERR_HANDLE = 4 };

int cs_open(int arch, int mode, csh *handle)
{
    (void)arch;
    (void)mode;
    if (handle != NULL)
        *handle = 0;
    return CS_ERR_ARCH;
}

int cs_close(csh *handle)
{
    if (handle != NULL)
        *handle = 0;
    return CS_ERR_OK;
}

int cs_option(csh handle, int type, size_t value)
{
    (void)handle;
    (void)type;
    (void)value;
    return CS_ERR_HANDLE;
}

void *cs_malloc(csh handle)
{
    (void)handle;
    return NULL;
}

bool cs_disasm_iter(csh handle, const uint8_t **code, size_t *size, uint64_t *address, void *insn)
{
    (void)handle;
    (void)code;
    (void)size;
    (void)address;
    (void)insn;
    return false;
}

/* the rest of capstone's public calls, so another QEMU build that names them still links */
size_t cs_disasm(csh handle, const uint8_t *code, size_t size, uint64_t address, size_t count, void **insn)
{
    (void)handle;
    (void)code;
    (void)size;
    (void)address;
    (void)count;
    if (insn != NULL)
        *insn = NULL;
    return 0;
}

void cs_free(void *insn, size_t count)
{
    (void)insn;
    (void)count;
}

unsigned int cs_version(int *major, int *minor)
{
    if (major != NULL)
        *major = 0;
    if (minor != NULL)
        *minor = 0;
    return 0;
}

bool cs_support(int query)
{
    (void)query;
    return false;
}

int cs_errno(csh handle)
{
    (void)handle;
    return CS_ERR_HANDLE;
}

const char *cs_strerror(int code)
{
    (void)code;
    return "capstone is not loaded in this QEMU (pykata)";
}
