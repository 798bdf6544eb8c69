"""The guest kernel: built from Debian's linux-source-6.12 with pykata's config fragment, cached.

Public API (stable; `pykata image build` and the hypervisor layer call it):

- `build_kernel(cache_dir, jobs=, progress=, force=)` returns the cached `KernelArtifact` for the current
  inputs, building it first when there is none (about 13 CPU-minutes: 6.5 to 10 minutes on 2 cores).
- `find_kernel(cache_dir)` returns the cached `KernelArtifact` or None; it never builds. Without the
  linux-source package (a host that only runs VMs) it returns the most recent build (`current`).
- `KernelArtifact.vmlinux` is the uncompressed ELF kernel with the PVH note: give it to QEMU as
  `-kernel` (microvm or q35, TCG or KVM). `bzimage` is the same kernel in bzImage format.
- Under TCG, boot it with `tsc_early_khz=<host TSC kHz>` (pykata.hypervisor.hostinfo.host_tsc_khz):
  its PIT-based TSC calibration fails on a busy host and the boot then hangs. Likewise give it
  `lapic_timer_period=<APIC timer Hz / CONFIG_HZ>` (a parameter SOURCE_EDITS adds; launch.kernel_params).

The cache entry `<cache_dir>/kernel/<key>/` holds `vmlinux`, `bzImage`, `config` (the full .config
used), `build.log` and `manifest.json`; `<cache_dir>/kernel/current` names the latest key.
The key hashes the linux-source package version, the tarball's size and
mtime, the fragment's bytes and `RECIPE_VERSION`, so a rebuild happens only when one of them changes.
An entry appears by one rename of a finished directory: an interrupted build leaves no partial entry.

The pure helpers (`cache_key`, `merge_fragment`, `dropped_options`, `CompileProgress`) do no I/O.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import importlib.resources
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from pykata.errors import PykataError
from pykata.fsutil import atomic_write, file_lock

# Bump when the way the kernel is built changes (make targets, merge steps, flags): it is part of the
# key. SOURCE_EDITS need no bump: they are in the key by their own digest (two branches that each
# added an edit and bumped this to the same number shared one cache entry).
RECIPE_VERSION = 4
DEFAULT_CACHE_DIR = Path("/var/cache/pykata")
SOURCE_PACKAGE = "linux-source-6.12"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
FRAGMENT_NAME = "kernel.config"
# Compile steps (CC/AS lines) of one build with the fragment; only used to estimate a percentage.
EXPECTED_COMPILE_STEPS = 1577
# Edits of the source before it is configured: (file, text, replacement), each text found exactly once
# (else the build fails naming it: a new source package must be looked at again).
# - 6.12 counts QEMU's not-yet-plugged CPUs (MADT entries "Enabled=0", ACPI before 6.3) as hot-pluggable
#   only when it detects a hypervisor, and a TCG guest shows no hypervisor signature Linux knows: it then
#   allows 0 hotplug CPUs and ignores a hot-added vCPU ("Unable to map lapic to logical cpu number"). A
#   pykata kernel only runs in VMs: such entries are usable, as 6.1 had them.
# - `lapic_timer_period=` (APIC timer ticks per jiffy, as the kernel's calibration measures it): when set,
#   calibrate_APIC_clock() takes it as the platform's and skips its 100 ms measurement. The measurement
#   waits for TSC-timed jiffies and catches up after a stall, so a vCPU the host stops for >= ~100 ms
#   right after it starts reads two APIC counts microseconds apart, "APIC frequency too slow", and a
#   hardware-reduced ACPI microvm (no PIT) never gets a tick again. QEMU's TCG APIC counts at a fixed
#   1 GHz, so pykata passes the exact value (hypervisor.qemu.launch.kernel_params).
# - 9P2000.L carries nanosecond times, but 6.12's 9p client leaves the superblock's time granularity at
#   alloc_super's one second, so utimensat() and every timestamp the guest sets on a 9p volume lost its
#   nanoseconds before they were sent (a file's mtime set to x.123456789 read back as x.0).
# - Freeing boot-time memory under TCG. x86's free_init_pages() fills every page it frees with 0xcc
#   first (a debugging aid): the initrd's 30 MB once unpacked and the gaps between the kernel's
#   sections, ~50-80 ms of QEMU CPU per cold boot; freed pages are cleared again when handed out, so
#   the edit frees them as they are. The kernel's own init sections (~840 KiB, the __init code that ran
#   during boot) are not freed at all: QEMU holds translated code for those pages, and every store to
#   such a page goes through its self-modifying-code check until none is left. Poisoning them cost
#   ~0.23 s between the last initcall and /init (guest RIPs sampled over HMP: free_reserved_area);
#   freed without poison, the same cost moved to whoever got the pages next (Python's start, +0.25 s).
#   They stay allocated, non-executable and never written: 840 KiB of guest RAM for ~0.2 s of CPU per
#   cold boot (a template's clones share it unwritten).
# - statfs of an overlay reports its upper layer's file system alone. A container's root is an overlay
#   whose upper is a guest tmpfs holding only what the container wrote, so `df /` and os.statvfs("/")
#   said 0 blocks used for a root full of the image's files (CPython's test_shutil.test_disk_usage
#   fails on it; under runc the upper and the image's layers share the host's disk). The edit counts each
#   lower file system's used blocks and inodes once (by the layer's fsid: one per distinct superblock,
#   0 for the upper's own) as used and in the total; free and available stay the upper's, what the
#   container can still write.
# - 9p without a metadata cache (pykata's cache=mmap and cache=none mounts) made a new inode on every
#   lookup and drops every unused dentry, so an inotify mark (which holds only the inode) never saw the
#   container's own changes to the file or directory it watches: the next lookup of that name was another
#   inode. The edit makes such a lookup reuse the inode the guest still holds for the same server file
#   (_NINE_P_REUSE_TEST: same qid.path, type and generation), refreshing its attributes from the server's
#   answer (a host change is seen as before); unused inodes still go at once (v9fs_drop_inode), so only a
#   referenced inode (mark, open file, cwd, mount) is ever found. Not reused (a new inode, as before): an
#   inode at nlink 0, a regular file with pages in its page cache (mmap: a reuse must never bring back
#   data the host may have changed since; QEMU's qid.version is mtime's seconds ^ size), one whose
#   qid.version changed while it has open fids (they belong to what was opened), and a directory that
#   already has a dentry (_NINE_P_REUSE_LOOKUP). Hard links then share one inode, as on the host.
#   Directories: the VFS gives a directory one dentry, so d_splice_alias() of a directory inode that has
#   one elsewhere moves that dentry to the new name. One server directory reached by two names at once
#   (two containers binding one host directory are two bind mounts in the share; a directory and its
#   parent bound apart) then lost its first name while crun bound it, and a container saw it empty (the
#   first version of this edit, reverted; tests/sandbox/test_host_dir_many_names.py fails 10 of 10 with
#   it). So a held directory is reused only when it has no dentry (a watch on a directory whose dentry
#   the cacheless mount dropped: the inotify case), and the check and d_splice_alias() run under one lock
#   that every such lookup takes, so two lookups can never both find it free; else it gets a new inode,
#   as before. Directories are only ever given a dentry by a lookup (mkdir makes a new inode), so the
#   lock covers every way one can appear. Files are not locked: a second dentry of a file is a hard link.
#   The generation is compared on its 32 bits (an inode's i_generation): QEMU 7.2's virtfs-proxy-helper
#   answers FS_IOC_GETVERSION, which ext4 fills with 4 bytes, from an uninitialised 8-byte variable, so
#   st_gen's upper half is the helper's stack (a first build that compared all 64 never reused an inode).
# - Cacheless unlink of a file (_NINE_P_UNLINK_NLINK): 6.12 leaves i_nlink alone without a metadata cache
#   ("the inode is going away immediately"), which a reused inode held by an inotify mark is not, so the
#   watch never got IN_DELETE_SELF/IN_IGNORED when the last name went. The edit drops one link of a
#   non-directory, by set_nlink from the value read (a concurrent getattr may have set it to the server's
#   0 already: no warning, no underflow).
# - Setting one of atime/mtime alone over 9p (_NINE_P_SETATTR_TIMES): QEMU 7.2's v9fs_setattr leaves the
#   omitted time's seconds uninitialised, and 9p-proxy.c marshals atime as (atime's seconds, mtime's
#   nanoseconds), so `touch -m -d`, rsync and utimensat(UTIME_OMIT, t) set atime to garbage (seen:
#   263237273.555555555) and setting atime alone set nothing. The client now fetches the omitted time
#   from the server and sends both: the omitted time's seconds stay; atime's nanoseconds still become
#   mtime's (the proxy's bug, no guest workaround: every message that sets a time carries mtime's).
# - O_TMPFILE|O_EXCL on 9p (9P2000.L has no such message): a hidden name created open and removed at
#   once (_NINE_P_TMPFILE); the open fid keeps the file. O_TMPFILE without O_EXCL stays EOPNOTSUPP: Tlink
#   links by path, so a removed file can never be given a name, and linkat() would fail where a program
#   expects it to work (with EOPNOTSUPP it takes its fallback, as it does today). With the mount's
#   posixacl the VFS leaves the umask to the file system, so the edit applies it, or the directory's
#   default ACL (v9fs_acl_mode, as create does), and reads and sets the new file's ACLs before the
#   unlink: QEMU answers xattr requests by path, so a new inode read after it failed with EIO.
# - fallocate on 9p (_NINE_P_FALLOCATE; 9P2000.L has no such message, and 6.12's client had no
#   .fallocate: EOPNOTSUPP). What a program sees is kept: the range of PUNCH_HOLE|KEEP_SIZE and
#   ZERO_RANGE reads zeros (written over it through the file's fid, so they are on the host when the call
#   returns, as a write(); a mapping's dirty pages of the range are written first and its cached pages
#   dropped after); mode 0 and ZERO_RANGE without KEEP_SIZE grow the file, mode 0 by zeros written past
#   the server's end of file only, so the blocks exist on the host (st_blocks, du, and a later write
#   cannot fail for room) and a hole below the end stays one; KEEP_SIZE alone does nothing (a write past
#   the end would grow the file). Differences left: a punched hole keeps its blocks, KEEP_SIZE allocates
#   nothing, a large allocation costs its writes (one round trip per I/O unit), and COLLAPSE_RANGE,
#   INSERT_RANGE and UNSHARE stay EOPNOTSUPP (they move data). The inode lock keeps the guest's own
#   writers of the file out meanwhile; the host's own writers are not (a write the host makes past the
#   end during a mode-0 call may be overwritten by zeros).
# - A file with no name left but still open (unlinked, or renamed over: `mv new f` while `f` is open) on
#   9p (_NINE_P_NAMELESS_*): QEMU 7.2's server sets attributes and xattrs by the path its fid was walked
#   to, so after a rename over the file the old descriptor's ftruncate, fchmod, futimens and fsetxattr
#   changed the file that took its name (tests/cli/data/fsprobe.c rename-over-open-setattr: the new
#   file truncated to 1 byte and made 0600), and its fstat showed that file's attributes. The edits give
#   the replaced file's dentry up its walked fids after the rename, as unlink does (so fstat goes through
#   the open fid, which QEMU answers from the open file), and refuse setattr and xattrs of a non-directory
#   at nlink 0 with ENOENT, which is what the server answers for an unlinked file already (runc's local
#   file systems do them; no 9P2000.L message can reach a file by its open fid).
# - flock(2) on 9p (_NINE_P_FLOCK): 6.12's client turned a flock into a POSIX lock (owned by the open
#   file), so a flock and a POSIX lock on one file conflicted, where on Linux they are independent
#   (`flock(1)` around a program that takes fcntl locks on the same file waited forever). The TLOCK it
#   then sent takes no lock on the host (QEMU 7.2's v9fs_lock answers success), so the edit keeps a flock
#   a flock, in the guest only, as before.
# - renameat2(RENAME_NOREPLACE) on 9p (_NINE_P_RENAME_NOREPLACE): 6.12's client refused every flag with
#   EINVAL (coreutils 9's `mv`, systemd and gnulib then fall back to a stat and a rename). The VFS checks
#   that the target is absent before it calls the file system (EEXIST), so the edit lets the flag
#   through: the same check the fallback makes, under the directory locks, against a lookup just made.
#   A file the host creates under that name between the two is replaced, as with the fallback.
#   RENAME_EXCHANGE stays EINVAL (9P2000.L cannot swap two names in one step).
_NINE_P_REUSE_TEST = (
    "/* Always get a new inode */\nstatic int v9fs_test_new_inode_dotl(struct inode *inode, void *data)\n"
    "{\n\treturn 0;\n}\n",
    "/* Always get a new inode */\nstatic int v9fs_test_new_inode_dotl(struct inode *inode, void *data)\n"
    "{\n\treturn 0;\n}\n\n"
    "/* pykata: a cacheless lookup reuses the inode the guest holds for this server file (kernel.py) */\n"
    "static int v9fs_test_reuse_inode_dotl(struct inode *inode, void *data)\n"
    "{\n"
    "\tstruct v9fs_inode *v9inode = V9FS_I(inode);\n"
    "\tstruct p9_stat_dotl *st = (struct p9_stat_dotl *)data;\n\n"
    "\tif (inode_wrong_type(inode, st->st_mode) || !inode->i_nlink)\n"
    "\t\treturn 0;\n"
    "\tif (inode->i_generation != (u32)st->st_gen || v9inode->qid.type != st->qid.type ||\n"
    "\t    v9inode->qid.path != st->qid.path)\n"
    "\t\treturn 0;\n"
    "\tif (S_ISREG(inode->i_mode) && (READ_ONCE(inode->i_mapping->nrpages) ||\n"
    "\t    (READ_ONCE(inode->i_private) && v9inode->qid.version != st->qid.version)))\n"
    "\t\treturn 0;\n"
    "\treturn 1;\n"
    "}\n",
)
_NINE_P_REUSE_IGET = (
    "\tif (new)\n\t\ttest = v9fs_test_new_inode_dotl;\n\telse\n\t\ttest = v9fs_test_inode_dotl;\n\n"
    "\tinode = iget5_locked(sb, QID2INO(qid), test, v9fs_set_inode_dotl, st);\n"
    "\tif (!inode)\n\t\treturn ERR_PTR(-ENOMEM);\n"
    "\tif (!(inode->i_state & I_NEW))\n\t\treturn inode;\n",
    "\tif (new == 2)\n\t\ttest = v9fs_test_reuse_inode_dotl;\n"
    "\telse if (new)\n\t\ttest = v9fs_test_new_inode_dotl;\n\telse\n\t\ttest = v9fs_test_inode_dotl;\n\n"
    "\tinode = iget5_locked(sb, QID2INO(qid), test, v9fs_set_inode_dotl, st);\n"
    "\tif (!inode)\n\t\treturn ERR_PTR(-ENOMEM);\n"
    "\tif (!(inode->i_state & I_NEW)) {\n"
    "\t\tif (new == 2) {\n"
    "\t\t\t/* the server's attributes now: the host may have changed them */\n"
    "\t\t\tv9fs_stat2inode_dotl(st, inode, 0);\n"
    "\t\t\tV9FS_I(inode)->qid.version = st->qid.version;\n"
    "\t\t}\n"
    "\t\treturn inode;\n"
    "\t}\n",
)
_NINE_P_REUSE_LOOKUP = (
    "\telse if (v9ses->cache & (CACHE_META|CACHE_LOOSE))\n"
    "\t\tinode = v9fs_get_inode_from_fid(v9ses, fid, dir->i_sb);\n"
    "\telse\n\t\tinode = v9fs_get_new_inode_from_fid(v9ses, fid, dir->i_sb);\n",
    "\telse if (v9ses->cache & (CACHE_META|CACHE_LOOSE))\n"
    "\t\tinode = v9fs_get_inode_from_fid(v9ses, fid, dir->i_sb);\n"
    "\telse if (v9fs_proto_dotl(v9ses))\n"
    "\t\tinode = NULL;\t/* pykata: v9fs_lookup_reuse_dotl() below */\n"
    "\telse\n\t\tinode = v9fs_get_new_inode_from_fid(v9ses, fid, dir->i_sb);\n",
)
_NINE_P_REUSE_SPLICE = (
    "\tres = d_splice_alias(inode, dentry);\n\tif (!IS_ERR(fid)) {\n",
    "\tif (!IS_ERR(fid) && !(v9ses->cache & (CACHE_META|CACHE_LOOSE)) && v9fs_proto_dotl(v9ses))\n"
    "\t\tres = v9fs_lookup_reuse_dotl(fid, dentry);\n"
    "\telse\n"
    "\t\tres = d_splice_alias(inode, dentry);\n\tif (!IS_ERR(fid)) {\n",
)
_NINE_P_REUSE_DECL = (
    "extern struct inode *v9fs_inode_from_fid_dotl(struct v9fs_session_info *v9ses,\n"
    "\t\t\t\t\t      struct p9_fid *fid,\n"
    "\t\t\t\t\t      struct super_block *sb, int new);\n",
    "extern struct inode *v9fs_inode_from_fid_dotl(struct v9fs_session_info *v9ses,\n"
    "\t\t\t\t\t      struct p9_fid *fid,\n"
    "\t\t\t\t\t      struct super_block *sb, int new);\n"
    "struct dentry *v9fs_lookup_reuse_dotl(struct p9_fid *fid, struct dentry *dentry);\n",
)
_NINE_P_REUSE_DIR = (
    "struct dotl_openflag_map {\n",
    "/*\n"
    " * pykata: a cacheless lookup, with the inode the guest holds for this server file reused (kernel.py).\n"
    " * A directory only when it has no dentry: d_splice_alias() would move that one to this name. The\n"
    " * check and the splice are one step for every such lookup (only lookups give a directory a dentry).\n"
    " */\n"
    "static DEFINE_MUTEX(v9fs_reuse_dir_lock);\n\n"
    "struct dentry *v9fs_lookup_reuse_dotl(struct p9_fid *fid, struct dentry *dentry)\n"
    "{\n"
    "\tstruct super_block *sb = dentry->d_sb;\n"
    "\tstruct p9_stat_dotl *st;\n"
    "\tstruct inode *inode;\n"
    "\tstruct dentry *res;\n"
    "\tbool dir, aliased;\n\n"
    "\tst = p9_client_getattr_dotl(fid, P9_STATS_BASIC | P9_STATS_GEN);\n"
    "\tif (IS_ERR(st))\n"
    "\t\treturn ERR_CAST(st);\n"
    "\tdir = S_ISDIR(st->st_mode);\n"
    "\tif (dir)\n"
    "\t\tmutex_lock(&v9fs_reuse_dir_lock);\n"
    "\tinode = v9fs_qid_iget_dotl(sb, &st->qid, fid, st, 2);\n"
    "\tif (dir && !IS_ERR(inode)) {\n"
    "\t\tspin_lock(&inode->i_lock);\n"
    "\t\taliased = !hlist_empty(&inode->i_dentry);\n"
    "\t\tspin_unlock(&inode->i_lock);\n"
    "\t\tif (aliased) {\n"
    "\t\t\tiput(inode);\n"
    "\t\t\tinode = v9fs_qid_iget_dotl(sb, &st->qid, fid, st, 1);\n"
    "\t\t}\n"
    "\t}\n"
    "\tres = d_splice_alias(inode, dentry);\n"
    "\tif (dir)\n"
    "\t\tmutex_unlock(&v9fs_reuse_dir_lock);\n"
    "\tkfree(st);\n"
    "\treturn res;\n"
    "}\n\n"
    "struct dotl_openflag_map {\n",
)
_NINE_P_UNLINK_NLINK = (
    "\tif (!(v9ses->cache & (CACHE_META | CACHE_LOOSE)))\n\t\treturn;\n",
    "\tif (!(v9ses->cache & (CACHE_META | CACHE_LOOSE))) {\n"
    "\t\t/* pykata: a reused inode may be held (an inotify mark): its last link goes (kernel.py) */\n"
    "\t\tif (!S_ISDIR(inode->i_mode)) {\n"
    "\t\t\tunsigned int nlink = READ_ONCE(inode->i_nlink);\n\n"
    "\t\t\tif (nlink)\n"
    "\t\t\t\tset_nlink(inode, nlink - 1);\n"
    "\t\t}\n"
    "\t\treturn;\n"
    "\t}\n",
)
_NINE_P_SETATTR_TIMES = (
    "\t/* Write all dirty data */\n\tif (S_ISREG(inode->i_mode)) {\n"
    "\t\tretval = filemap_fdatawrite(inode->i_mapping);\n",
    "\t/* pykata: one time alone: send the other as the server has it (QEMU 7.2; kernel.py) */\n"
    "\tif ((iattr->ia_valid & (ATTR_MTIME_SET | ATTR_ATIME)) == ATTR_MTIME_SET ||\n"
    "\t    (iattr->ia_valid & (ATTR_ATIME_SET | ATTR_MTIME)) == ATTR_ATIME_SET) {\n"
    "\t\tstruct p9_stat_dotl *st = p9_client_getattr_dotl(fid, P9_STATS_ATIME | P9_STATS_MTIME);\n\n"
    "\t\tif (!IS_ERR(st)) {\n"
    "\t\t\tif (!(iattr->ia_valid & ATTR_ATIME)) {\n"
    "\t\t\t\tp9attr.atime_sec = st->st_atime_sec;\n"
    "\t\t\t\tp9attr.atime_nsec = st->st_atime_nsec;\n"
    "\t\t\t\tp9attr.valid |= P9_ATTR_ATIME | P9_ATTR_ATIME_SET;\n"
    "\t\t\t} else {\n"
    "\t\t\t\tp9attr.mtime_sec = st->st_mtime_sec;\n"
    "\t\t\t\tp9attr.mtime_nsec = st->st_mtime_nsec;\n"
    "\t\t\t\tp9attr.valid |= P9_ATTR_MTIME | P9_ATTR_MTIME_SET;\n"
    "\t\t\t}\n"
    "\t\t\tkfree(st);\n"
    "\t\t}\n"
    "\t}\n\n"
    "\t/* Write all dirty data */\n\tif (S_ISREG(inode->i_mode)) {\n"
    "\t\tretval = filemap_fdatawrite(inode->i_mapping);\n",
)
_NINE_P_TMPFILE = (
    "const struct inode_operations v9fs_dir_inode_operations_dotl = {\n",
    "/* pykata: O_TMPFILE|O_EXCL as a hidden name created open and removed at once (kernel.py) */\n"
    "static int\n"
    "v9fs_vfs_tmpfile_dotl(struct mnt_idmap *idmap, struct inode *dir,\n"
    "\t\t      struct file *file, umode_t omode)\n"
    "{\n"
    "\tstruct v9fs_session_info *v9ses = v9fs_inode2v9ses(dir);\n"
    "\tstruct dentry *dentry = file->f_path.dentry;\n"
    "\tstruct posix_acl *pacl = NULL, *dacl = NULL;\n"
    "\tstruct p9_fid *dfid, *ofid;\n"
    "\tstruct inode *inode;\n"
    "\tstruct p9_qid qid;\n"
    "\tumode_t mode = omode;\n"
    "\tchar name[40];\n"
    "\tint p9_omode, err;\n\n"
    "\tif (!(file->f_flags & O_EXCL))\n"
    "\t\treturn -EOPNOTSUPP;\n"
    "\t/* the umask, or the directory's default ACL (with posixacl the VFS leaves both to us) */\n"
    "\terr = v9fs_acl_mode(dir, &mode, &dacl, &pacl);\n"
    "\tif (err)\n"
    "\t\treturn err;\n"
    "\tdfid = v9fs_parent_fid(dentry);\n"
    "\tif (IS_ERR(dfid)) {\n"
    "\t\tv9fs_put_acl(dacl, pacl);\n"
    "\t\treturn PTR_ERR(dfid);\n"
    "\t}\n"
    "\tofid = clone_fid(dfid);\n"
    "\tif (IS_ERR(ofid)) {\n"
    "\t\tp9_fid_put(dfid);\n"
    "\t\tv9fs_put_acl(dacl, pacl);\n"
    "\t\treturn PTR_ERR(ofid);\n"
    "\t}\n"
    "\tp9_omode = v9fs_open_to_dotl_flags(file->f_flags & ~(O_TMPFILE | O_CREAT)) | P9_DOTL_CREATE | P9_DOTL_EXCL;\n"
    "\tif ((v9ses->cache & CACHE_WRITEBACK) && (p9_omode & P9_OWRITE))\n"
    "\t\tp9_omode = (p9_omode & ~(P9_OWRITE | P9_DOTL_APPEND)) | P9_ORDWR;\n"
    "\tsnprintf(name, sizeof(name), \".pykata-tmpfile-%016llx\", get_random_u64());\n"
    "\terr = p9_client_create_dotl(ofid, name, p9_omode, mode, v9fs_get_fsgid_for_create(dir), &qid);\n"
    "\tif (err < 0)\n"
    "\t\tgoto out;\n"
    "\t/*\n"
    "\t * While the file still has its name: the server answers getattr and xattrs (the ACLs a new\n"
    "\t * inode reads, the inherited ones set here) by path, so after the unlink they fail (EIO).\n"
    "\t */\n"
    "\tinode = v9fs_get_new_inode_from_fid(v9ses, ofid, dir->i_sb);\n"
    "\tif (!IS_ERR(inode))\n"
    "\t\tv9fs_set_create_acl(inode, ofid, dacl, pacl);\n"
    "\t/* only the open fid holds the file from here */\n"
    "\terr = p9_client_unlinkat(dfid, name, 0);\n"
    "\tv9fs_invalidate_inode_attr(dir);\n"
    "\tif (IS_ERR(inode)) {\n"
    "\t\terr = PTR_ERR(inode);\n"
    "\t\tgoto out;\n"
    "\t}\n"
    "\tif (err < 0) {\n"
    "\t\tiput(inode);\n"
    "\t\tgoto out;\n"
    "\t}\n"
    "\t/* d_tmpfile drops the one link a new file has */\n"
    "\tset_nlink(inode, 1);\n"
    "\td_tmpfile(file, inode);\n"
    "\terr = finish_open(file, file->f_path.dentry, generic_file_open);\n"
    "\tif (err)\n"
    "\t\tgoto out;\n"
    "\tfile->private_data = ofid;\n"
    "\tv9fs_fid_add_modes(ofid, v9ses->flags, v9ses->cache, file->f_flags);\n"
    "\tv9fs_open_fid_add(inode, &ofid);\n"
    "out:\n"
    "\tp9_fid_put(dfid);\n"
    "\tp9_fid_put(ofid);\n"
    "\tv9fs_put_acl(dacl, pacl);\n"
    "\treturn err;\n"
    "}\n\n"
    "const struct inode_operations v9fs_dir_inode_operations_dotl = {\n"
    "\t.tmpfile = v9fs_vfs_tmpfile_dotl,\n",
)
_NINE_P_FALLOCATE_INCLUDE = (
    "#include <linux/uio.h>\n",
    "#include <linux/uio.h>\n#include <linux/falloc.h>\n#include <linux/sched/signal.h>\n#include <linux/sizes.h>\n",
)
_NINE_P_FALLOCATE = (
    "const struct file_operations v9fs_file_operations_dotl = {\n",
    "/*\n"
    " * pykata: fallocate over 9P2000.L, which has no such message (guestimage/kernel.py). Zeros written\n"
    " * through the file's fid where the file's data must become zeros or new blocks must exist: what a\n"
    " * program reads, the size and the space the host allocates are as a local fallocate leaves them.\n"
    " */\n"
    "static int v9fs_fallocate_zeros(struct file *file, loff_t start, loff_t end)\n"
    "{\n"
    "\tstruct p9_fid *fid = file->private_data;\n"
    "\tsize_t chunk = min_t(loff_t, end - start, fid->iounit ? fid->iounit : SZ_256K);\n"
    "\tstruct iov_iter from;\n"
    "\tstruct kvec kv;\n"
    "\tvoid *zeros;\n"
    "\tint err = 0;\n\n"
    "\tzeros = kvzalloc(chunk, GFP_KERNEL);\n"
    "\tif (!zeros)\n"
    "\t\treturn -ENOMEM;\n"
    "\twhile (start < end && !err) {\n"
    "\t\tsize_t n = min_t(loff_t, end - start, chunk);\n"
    "\t\tint written;\n\n"
    "\t\tkv.iov_base = zeros;\n"
    "\t\tkv.iov_len = n;\n"
    "\t\tiov_iter_kvec(&from, ITER_SOURCE, &kv, 1, n);\n"
    "\t\twritten = p9_client_write(fid, start, &from, &err);\n"
    "\t\tif (!err && written <= 0)\n"
    "\t\t\terr = -EIO;\n"
    "\t\tif (!err)\n"
    "\t\t\tstart += written;\n"
    "\t\tif (!err && start < end && fatal_signal_pending(current))\n"
    "\t\t\terr = -EINTR;\n"
    "\t}\n"
    "\tkvfree(zeros);\n"
    "\treturn err;\n"
    "}\n\n"
    "static long v9fs_file_fallocate_dotl(struct file *file, int mode, loff_t offset, loff_t len)\n"
    "{\n"
    "\tstruct inode *inode = file_inode(file);\n"
    "\tstruct p9_fid *fid = file->private_data;\n"
    "\tloff_t end = offset + len, size, zstart, zend;\n"
    "\tstruct p9_stat_dotl *st;\n"
    "\tlong err = 0;\n\n"
    "\t/* collapse, insert, unshare, no-hide-stale: nothing to stand in for them (EOPNOTSUPP) */\n"
    "\tif (mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE))\n"
    "\t\treturn -EOPNOTSUPP;\n"
    "\tif (!fid)\n"
    "\t\treturn -EBADF;\n"
    "\tinode_lock(inode);\n"
    "\t/* the size the server has now: the host may have changed the file */\n"
    "\tst = p9_client_getattr_dotl(fid, P9_STATS_SIZE);\n"
    "\tif (IS_ERR(st)) {\n"
    "\t\terr = PTR_ERR(st);\n"
    "\t\tgoto out;\n"
    "\t}\n"
    "\tsize = st->st_size;\n"
    "\tkfree(st);\n"
    "\tif (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) {\n"
    "\t\t/* the range reads zeros; past the end only when the size grows */\n"
    "\t\tzstart = offset;\n"
    "\t\tzend = (mode & FALLOC_FL_KEEP_SIZE) ? min(end, size) : end;\n"
    "\t} else if (!(mode & FALLOC_FL_KEEP_SIZE)) {\n"
    "\t\t/* blocks past the end, allocated on the host; a hole below it stays one */\n"
    "\t\tzstart = max(offset, size);\n"
    "\t\tzend = end;\n"
    "\t} else {\n"
    "\t\t/* KEEP_SIZE alone: a write past the end would grow the file; nothing visible to do */\n"
    "\t\tgoto out;\n"
    "\t}\n"
    "\tif (zstart >= zend)\n"
    "\t\tgoto out;\n"
    "\t/* a mapping's dirty pages go first, then the cached pages of the range, which now read zeros */\n"
    "\terr = filemap_write_and_wait_range(inode->i_mapping, zstart, zend - 1);\n"
    "\tif (!err)\n"
    "\t\terr = v9fs_fallocate_zeros(file, zstart, zend);\n"
    "\ttruncate_pagecache_range(inode, zstart, zend - 1);\n"
    "\tif (zend > size) {\n"
    "\t\t/* the inode's size as the server now has it (a write may have stopped short) */\n"
    "\t\tst = p9_client_getattr_dotl(fid, P9_STATS_BASIC);\n"
    "\t\tif (!IS_ERR(st)) {\n"
    "\t\t\tv9fs_stat2inode_dotl(st, inode, 0);\n"
    "\t\t\tkfree(st);\n"
    "\t\t}\n"
    "\t}\n"
    "out:\n"
    "\tinode_unlock(inode);\n"
    "\treturn err;\n"
    "}\n\n"
    "const struct file_operations v9fs_file_operations_dotl = {\n"
    "\t.fallocate = v9fs_file_fallocate_dotl,\n",
)
_NINE_P_NAMELESS_RENAME = (
    "\t\tif (new_inode) {\n"
    "\t\t\tif (S_ISDIR(new_inode->i_mode))\n"
    "\t\t\t\tclear_nlink(new_inode);\n"
    "\t\t\telse\n"
    "\t\t\t\tv9fs_dec_count(new_inode);\n"
    "\t\t}\n",
    "\t\tif (new_inode) {\n"
    "\t\t\tif (S_ISDIR(new_inode->i_mode))\n"
    "\t\t\t\tclear_nlink(new_inode);\n"
    "\t\t\telse\n"
    "\t\t\t\tv9fs_dec_count(new_inode);\n"
    "\t\t\t/* pykata: the replaced file's walked fids name the new one now; its open fids stay (kernel.py) */\n"
    "\t\t\tnew_dentry->d_op->d_release(new_dentry);\n"
    "\t\t}\n",
)
_NINE_P_NAMELESS_SETATTR = (
    "\tretval = setattr_prepare(&nop_mnt_idmap, dentry, iattr);\n"
    "\tif (retval)\n"
    "\t\treturn retval;\n\n"
    "\tv9ses = v9fs_dentry2v9ses(dentry);\n",
    "\tretval = setattr_prepare(&nop_mnt_idmap, dentry, iattr);\n"
    "\tif (retval)\n"
    "\t\treturn retval;\n"
    "\t/* pykata: no name left: the server would set the attributes by the name it had (kernel.py) */\n"
    "\tif (!S_ISDIR(inode->i_mode) && !inode->i_nlink)\n"
    "\t\treturn -ENOENT;\n\n"
    "\tv9ses = v9fs_dentry2v9ses(dentry);\n",
)
_NINE_P_NAMELESS_XATTR_GET = (
    "\t\t name, buffer_size);\n"
    "\tfid = v9fs_fid_lookup(dentry);\n",
    "\t\t name, buffer_size);\n"
    "\t/* pykata: no name left: the server would answer for the name it had (kernel.py) */\n"
    "\tif (d_really_is_positive(dentry) && !S_ISDIR(d_inode(dentry)->i_mode) && !d_inode(dentry)->i_nlink)\n"
    "\t\treturn -ENOENT;\n"
    "\tfid = v9fs_fid_lookup(dentry);\n",
)
_NINE_P_NAMELESS_XATTR_SET = (
    "\tstruct p9_fid *fid;\n\n"
    "\tfid  = v9fs_fid_lookup(dentry);\n",
    "\tstruct p9_fid *fid;\n\n"
    "\t/* pykata: no name left: the server would set it on the name it had (kernel.py) */\n"
    "\tif (d_really_is_positive(dentry) && !S_ISDIR(d_inode(dentry)->i_mode) && !d_inode(dentry)->i_nlink)\n"
    "\t\treturn -ENOENT;\n"
    "\tfid  = v9fs_fid_lookup(dentry);\n",
)
_NINE_P_FLOCK = (
    "\t/* Convert flock to posix lock */\n"
    "\tfl->c.flc_flags |= FL_POSIX;\n"
    "\tfl->c.flc_flags ^= FL_FLOCK;\n\n"
    "\tif (IS_SETLK(cmd) | IS_SETLKW(cmd))\n"
    "\t\tret = v9fs_file_do_lock(filp, cmd, fl);\n",
    "\t/* pykata: a flock stays a flock, in the guest: the server takes no host lock (kernel.py) */\n"
    "\tif (IS_SETLK(cmd) | IS_SETLKW(cmd))\n"
    "\t\tret = locks_lock_file_wait(filp, fl);\n",
)
_NINE_P_RENAME_NOREPLACE = (
    "\tif (flags)\n\t\treturn -EINVAL;\n\n\tp9_debug(P9_DEBUG_VFS, \"\\n\");\n\told_inode = d_inode(old_dentry);\n",
    "\t/* pykata: the VFS checked that the target is absent (kernel.py) */\n"
    "\tif (flags & ~RENAME_NOREPLACE)\n\t\treturn -EINVAL;\n\n\tp9_debug(P9_DEBUG_VFS, \"\\n\");\n"
    "\told_inode = d_inode(old_dentry);\n",
)
SOURCE_EDITS = (
    ("arch/x86/kernel/acpi/boot.c", "\treturn !hypervisor_is_type(X86_HYPER_NATIVE);\n", "\treturn true;\n"),
    ("arch/x86/kernel/apic/apic.c", "unsigned int lapic_timer_period = 0;\n",
     "unsigned int lapic_timer_period = 0;\n\n"
     "static int __init pykata_lapic_timer_period(char *arg)\n"
     "{\n\treturn kstrtouint(arg, 0, &lapic_timer_period);\n}\n"
     "early_param(\"lapic_timer_period\", pykata_lapic_timer_period);\n"),
    ("fs/9p/vfs_super.c", "\t\tsb->s_op = &v9fs_super_ops_dotl;\n",
     "\t\tsb->s_op = &v9fs_super_ops_dotl;\n\t\tsb->s_time_gran = 1;\n"),
    ("arch/x86/mm/init.c", "\t\t\t\t   POISON_FREE_INITMEM, what);\n", "\t\t\t\t   -1, what);\n"),
    ("arch/x86/mm/init.c",
     '\tfree_kernel_image_pages("unused kernel image (initmem)",\n\t\t\t\t&__init_begin, &__init_end);\n',
     "\t/* pykata: the init sections stay allocated, never written again (guestimage/kernel.py) */\n"
     "\tset_memory_nx((unsigned long)__init_begin, (__init_end - __init_begin) >> PAGE_SHIFT);\n"
     "\tset_memory_rw((unsigned long)__init_begin, (__init_end - __init_begin) >> PAGE_SHIFT);\n"),
    ("fs/overlayfs/super.c", "static int ovl_statfs(struct dentry *dentry, struct kstatfs *buf)\n{\n",
     "/* pykata: the lower layers' used blocks and inodes count as used (guestimage/kernel.py) */\n"
     "static void ovl_statfs_add_lower(struct ovl_fs *ofs, struct kstatfs *buf)\n"
     "{\n\tu64 seen = 0;\n\tunsigned int i;\n\n"
     "\tfor (i = 1; i < ofs->numlayer; i++) {\n"
     "\t\tconst struct ovl_layer *layer = &ofs->layers[i];\n"
     "\t\tstruct path lower = { .mnt = layer->mnt, .dentry = layer->mnt->mnt_root };\n"
     "\t\tstruct kstatfs st;\n\n"
     "\t\tif (layer->fsid <= 0 || layer->fsid >= 64 || (seen & BIT_ULL(layer->fsid)))\n\t\t\tcontinue;\n"
     "\t\tseen |= BIT_ULL(layer->fsid);\n"
     "\t\tif (vfs_statfs(&lower, &st) || st.f_blocks < st.f_bfree || !buf->f_bsize)\n\t\t\tcontinue;\n"
     "\t\tbuf->f_blocks += (st.f_blocks - st.f_bfree) * st.f_bsize / buf->f_bsize;\n"
     "\t\tif (st.f_files > st.f_ffree)\n\t\t\tbuf->f_files += st.f_files - st.f_ffree;\n"
     "\t}\n}\n\n"
     "static int ovl_statfs(struct dentry *dentry, struct kstatfs *buf)\n{\n"),
    ("fs/overlayfs/super.c", "\t\t\tbuf->f_fsid = uuid_to_fsid(sb->s_uuid.b);\n\t}\n",
     "\t\t\tbuf->f_fsid = uuid_to_fsid(sb->s_uuid.b);\n"
     "\t\tif (ovl_upper_mnt(ofs))\n\t\t\tovl_statfs_add_lower(ofs, buf);\n\t}\n"),
    ("fs/9p/vfs_inode_dotl.c", *_NINE_P_REUSE_TEST),
    ("fs/9p/vfs_inode_dotl.c", *_NINE_P_REUSE_IGET),
    ("fs/9p/vfs_inode.c", *_NINE_P_REUSE_LOOKUP),
    ("fs/9p/vfs_inode.c", *_NINE_P_REUSE_SPLICE),
    ("fs/9p/v9fs.h", *_NINE_P_REUSE_DECL),
    ("fs/9p/vfs_inode_dotl.c", *_NINE_P_REUSE_DIR),
    ("fs/9p/vfs_inode.c", *_NINE_P_UNLINK_NLINK),
    ("fs/9p/vfs_inode_dotl.c", *_NINE_P_SETATTR_TIMES),
    ("fs/9p/vfs_inode_dotl.c", *_NINE_P_TMPFILE),
    ("fs/9p/vfs_file.c", *_NINE_P_FALLOCATE_INCLUDE),
    ("fs/9p/vfs_file.c", *_NINE_P_FALLOCATE),
    ("fs/9p/vfs_inode.c", *_NINE_P_NAMELESS_RENAME),
    ("fs/9p/vfs_inode_dotl.c", *_NINE_P_NAMELESS_SETATTR),
    ("fs/9p/xattr.c", *_NINE_P_NAMELESS_XATTR_GET),
    ("fs/9p/xattr.c", *_NINE_P_NAMELESS_XATTR_SET),
    ("fs/9p/vfs_file.c", *_NINE_P_FLOCK),
    ("fs/9p/vfs_inode.c", *_NINE_P_RENAME_NOREPLACE),
)
_BUILD_TOOLS = ("make", "gcc", "flex", "bison", "bc", "tar", "xz")
# Source tree plus objects: 1.6 GB measured.
_BUILD_SPACE = 2_500_000_000
_MAKE_ARGS = ("ARCH=x86_64",)
# A fixed identity keeps the build reproducible (no user, host or time in the image).
_BUILD_ENV = {
    "KBUILD_BUILD_USER": "pykata",
    "KBUILD_BUILD_HOST": "pykata",
    "KBUILD_BUILD_TIMESTAMP": "1970-01-01",
    "LC_ALL": "C",
}


class KernelBuildError(PykataError):
    """The guest kernel could not be built or its cache could not be written."""


@dataclass(frozen=True)
class KernelArtifact:
    """A built guest kernel in the cache."""

    vmlinux: Path
    bzimage: Path | None
    key: str
    version: str


@dataclass(frozen=True)
class KernelInputs:
    """Everything the cache key depends on."""

    package: str
    package_version: str
    tarball_size: int
    tarball_mtime_ns: int
    fragment_sha256: str
    recipe: int = RECIPE_VERSION
    source_edits_sha256: str = ""


# ---------------------------------------------------------------------------------------------------
# Pure helpers


def cache_key(inputs: KernelInputs) -> str:
    """Return the cache key (16 hex digits) of a set of build inputs."""
    canonical = json.dumps(asdict(inputs), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def source_edits_digest(edits: tuple[tuple[str, str, str], ...]) -> str:
    """sha256 of a set of source edits (part of the cache key), whatever their order: the edits touch
    separate places of the source (each text is found once), so any order gives one tree, and two
    branches that each add edits share one kernel whichever order their merge puts them in."""
    return hashlib.sha256(json.dumps(sorted(edits), separators=(",", ":")).encode()).hexdigest()


def parse_config(text: str) -> dict[str, str]:
    """Parse a Kconfig file or fragment into {"CONFIG_X": value}; `# CONFIG_X is not set` gives "n"."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("# CONFIG_") and line.endswith(" is not set"):
            options[line[2:-len(" is not set")]] = "n"
        elif line.startswith("CONFIG_") and "=" in line:
            name, value = line.split("=", 1)
            options[name] = value
    return options


def merge_fragment(base: str, fragment: str) -> str:
    """Return `base` (a full .config) with every option the fragment sets replaced by the fragment's line."""
    overridden = set(parse_config(fragment))
    kept = [ln for ln in base.splitlines() if not set(parse_config(ln)) & overridden]
    return "\n".join([*kept, "", "# pykata fragment", fragment.rstrip("\n"), ""])


def dropped_options(fragment: str, final_config: str) -> list[str]:
    """Return the fragment lines that `make olddefconfig` did not keep, as `CONFIG_X=want (got)`.

    An option Kconfig drops has a dependency the fragment does not satisfy.
    """
    final = parse_config(final_config)
    dropped = []
    for name, want in parse_config(fragment).items():
        got = final.get(name, "n")
        if got != want:
            dropped.append(f"{name}={want} (got {got if name in final else 'absent'})")
    return dropped


class CompileProgress:
    """Turns kbuild's output lines into throttled progress messages (sans-IO)."""

    _COMPILE = ("CC", "AS")
    _LINK = ("LD", "KSYMS", "SORTTAB", "SYSMAP", "OBJCOPY", "BUILD", "ZSTD22", "MKPIGGY")

    def __init__(self, expected: int = EXPECTED_COMPILE_STEPS, min_interval: float = 15.0) -> None:
        self.expected = expected
        self.min_interval = min_interval
        self.compiled = 0
        self._linking = False
        self._last_percent = -1
        self._last_time = float("-inf")

    def feed(self, line: str, now: float) -> str | None:
        """Account one output line at time `now`; return a message to show, or None."""
        words = line.split()
        if not words:
            return None
        if words[0] in self._COMPILE and len(words) > 1:
            self.compiled += 1
            percent = min(99, self.compiled * 100 // self.expected)
            if percent >= self._last_percent + 10 or now - self._last_time >= self.min_interval:
                self._last_percent, self._last_time = percent, now
                return f"compiling: {self.compiled}/~{self.expected} objects ({percent}%)"
            return None
        if words[0] == "LD" and words[-1] in ("vmlinux", "vmlinux.o") and not self._linking:
            self._linking = True
            self._last_time = now
            return f"linking vmlinux ({self.compiled} objects compiled)"
        return None


# ---------------------------------------------------------------------------------------------------
# Inputs and cache


def fragment_bytes() -> bytes:
    """Return the packaged kernel config fragment."""
    return importlib.resources.files("pykata.guestimage").joinpath(FRAGMENT_NAME).read_bytes()


def kernel_inputs(tarball: Path | None = None, fragment: bytes | None = None) -> KernelInputs:
    """Collect the cache key inputs from the installed linux-source package.

    Raises KernelBuildError when the package or its tarball is not installed.
    """
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelBuildError(
            f"{SOURCE_PACKAGE} is not installed (run scripts/install.sh or apt-get install {SOURCE_PACKAGE})"
        ) from exc
    tarball = SOURCE_TARBALL if tarball is None else tarball
    try:
        st = tarball.stat()
    except OSError as exc:
        raise KernelBuildError(f"kernel source tarball {tarball}: {exc.strerror}") from exc
    frag = fragment_bytes() if fragment is None else fragment
    return KernelInputs(
        package=SOURCE_PACKAGE,
        package_version=out,
        tarball_size=st.st_size,
        tarball_mtime_ns=st.st_mtime_ns,
        fragment_sha256=hashlib.sha256(frag).hexdigest(),
        source_edits_sha256=source_edits_digest(SOURCE_EDITS),
    )


def _kernel_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "kernel"


def _load_entry(entry: Path) -> KernelArtifact | None:
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    vmlinux = entry / "vmlinux"
    if not vmlinux.is_file() or not isinstance(manifest, dict):
        return None
    bzimage = entry / "bzImage"
    return KernelArtifact(
        vmlinux=vmlinux,
        bzimage=bzimage if bzimage.is_file() else None,
        key=str(manifest.get("key", entry.name)),
        version=str(manifest.get("version", "")),
    )


def find_kernel(cache_dir: Path = DEFAULT_CACHE_DIR) -> KernelArtifact | None:
    """Return the cached kernel for the current inputs, or None if it has not been built.

    When the linux-source package is not installed (a host that only runs VMs), return the most
    recently built kernel instead. Never builds; raises nothing for a missing or damaged cache.
    """
    kdir = _kernel_dir(cache_dir)
    try:
        key = cache_key(kernel_inputs())
    except KernelBuildError:
        try:
            key = (kdir / "current").read_text().strip()
        except OSError:
            return None
    return _load_entry(kdir / key) if key else None


# ---------------------------------------------------------------------------------------------------
# Build


def _stderr_progress(message: str) -> None:
    print(f"[pykata kernel] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(kdir: Path, progress: Callable[[str], None]) -> Iterator[None]:
    # One builder at a time per cache: a second caller waits, then finds the first one's result.
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(kdir / ".lock",
                                          on_wait=lambda: progress("waiting for another kernel build to finish")))
        except OSError as exc:
            raise KernelBuildError(f"cache_dir {kdir.parent}: cannot lock {kdir / '.lock'}: {exc.strerror}") from exc
        yield


def _run(
    cmd: list[str], cwd: Path, env: dict[str, str], log: TextIO, on_line: Callable[[str], None] | None = None
) -> None:
    """Run a build command, logging its output and feeding its lines to `on_line`.

    Raises KernelBuildError with the last lines of output when the command fails.
    """
    tail: collections.deque[str] = collections.deque(maxlen=40)
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            tail.append(line.rstrip("\n"))
            if on_line is not None:
                on_line(line)
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            # Interrupted (KeyboardInterrupt, progress callback raising): stop make and its compilers.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if rc != 0:
        output = "\n".join(tail)
        raise KernelBuildError(f"`{' '.join(cmd)}` failed with exit status {rc}:\n{output}")


def _build_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(_BUILD_ENV)
    return env


def _edit_source(src: Path) -> None:
    """Apply SOURCE_EDITS to the extracted tree. Raises KernelBuildError naming a text not found once."""
    for name, text, replacement in SOURCE_EDITS:
        path = src / name
        body = path.read_text()
        if body.count(text) != 1:
            raise KernelBuildError(f"kernel source edit: {name} has {body.count(text)} copies of {text.strip()!r}, "
                                   "expected one (a new linux-source needs its SOURCE_EDITS looked at again)")
        path.write_text(body.replace(text, replacement))


def _compile(
    src: Path, out: Path, fragment: bytes, jobs: int, progress: Callable[[str], None], log: TextIO
) -> tuple[str, int]:
    """Configure and build in `src`, copy the results into `out`; return (kernel release, steps)."""
    env = _build_env()
    make = ["make", *_MAKE_ARGS]
    progress("configuring: tinyconfig + pykata fragment")
    _run([*make, "tinyconfig"], src, env, log)
    config = src / ".config"
    frag_text = fragment.decode()
    config.write_text(merge_fragment(config.read_text(), frag_text))
    _run([*make, "olddefconfig"], src, env, log)
    dropped = dropped_options(frag_text, config.read_text())
    if dropped:
        raise KernelBuildError(
            "kernel config: options of the fragment dropped by Kconfig (missing dependencies): "
            + ", ".join(dropped)
        )
    progress(f"compiling with {jobs} jobs")
    tracker = CompileProgress()

    def on_line(line: str) -> None:
        message = tracker.feed(line, time.monotonic())
        if message is not None:
            progress(message)

    _run([*make, f"-j{jobs}", "vmlinux", "bzImage"], src, env, log, on_line)
    # Written by the build from the Makefile version and CONFIG_LOCALVERSION, e.g. 6.12.117-pykata.
    release = (src / "include/config/kernel.release").read_text().strip()
    out.mkdir()
    shutil.copy2(src / "vmlinux", out / "vmlinux")
    shutil.copy2(src / "arch/x86/boot/bzImage", out / "bzImage")
    shutil.copy2(config, out / "config")
    return release, tracker.compiled


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def build_kernel(
    cache_dir: Path = DEFAULT_CACHE_DIR,
    *,
    jobs: int | None = None,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
) -> KernelArtifact:
    """Return the cached guest kernel, building it first if the inputs changed or `force` is set.

    `jobs` defaults to the number of usable CPUs. `progress` receives one-line stage messages
    (extracting, configuring, compiling N/~M objects, linking, done); the default writes them to
    stderr. Raises KernelBuildError when the source package or a build tool is missing, a fragment
    option does not survive `make olddefconfig`, the build fails, or the cache is not writable.
    """
    if jobs is not None and jobs < 1:
        raise KernelBuildError(f"jobs: must be at least 1, got {jobs}")
    report = progress or _stderr_progress
    inputs = kernel_inputs()
    key = cache_key(inputs)
    kdir = _kernel_dir(cache_dir)
    try:
        kdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KernelBuildError(f"cache_dir {cache_dir}: cannot create {kdir}: {exc.strerror}") from exc
    entry = kdir / key
    # A cached kernel needs no lock (an entry appears whole, by rename): without this check every
    # `image build` of a checkout whose kernel is cached waited for another checkout's kernel build
    # (minutes) only to find its own in the cache.
    if not force and (cached := _load_entry(entry)) is not None:
        report(f"cached: {cached.version} ({key})")
        _write_current(kdir, key)
        return cached
    with _locked(kdir, report):
        if not force and (cached := _load_entry(entry)) is not None:
            report(f"cached: {cached.version} ({key})")
            _write_current(kdir, key)
            return cached
        _check_build_host(kdir)
        # Leftovers of interrupted builds: we hold the lock, so nobody else is using them.
        for stale in kdir.glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        started = time.monotonic()
        _build_into(kdir, entry, inputs, jobs or _cpu_count(), report)
        artifact = _load_entry(entry)
    if artifact is None:
        raise KernelBuildError(f"kernel cache entry {entry} is incomplete after the build")
    report(f"done: {artifact.version} in {time.monotonic() - started:.0f} s -> {artifact.vmlinux}")
    return artifact


def _check_build_host(kdir: Path) -> None:
    missing = [tool for tool in _BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        raise KernelBuildError(f"kernel build tools missing: {', '.join(missing)} (run scripts/install.sh)")
    free = shutil.disk_usage(kdir).free
    if free < _BUILD_SPACE:
        raise KernelBuildError(
            f"cache_dir {kdir.parent}: {free / 1e9:.1f} GB free, the kernel build needs {_BUILD_SPACE / 1e9:.0f} GB"
        )


def _build_into(
    kdir: Path, entry: Path, inputs: KernelInputs, jobs: int, report: Callable[[str], None]
) -> None:
    """Build in a temporary directory under `kdir` and move the result to `entry`.

    The full build log is kept as `build.log` in the entry, or as `last-failed-build.log` in `kdir`.
    """
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f".build-{entry.name}-", dir=kdir))
    log_path = work / "build.log"
    try:
        with log_path.open("w") as log:
            report(f"extracting {SOURCE_TARBALL.name}")
            src = work / "src"
            src.mkdir()
            tar = ["tar", "-xJf", str(SOURCE_TARBALL), "-C", str(src), "--strip-components=1"]
            _run(tar, work, _build_env(), log)
            _edit_source(src)
            out = work / "out"
            release, steps = _compile(src, out, fragment_bytes(), jobs, report, log)
        shutil.copy2(log_path, out / "build.log")
        manifest = {"key": entry.name, "version": release, "inputs": asdict(inputs), "compile_steps": steps,
                    "build_seconds": round(time.monotonic() - started, 1)}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _install(out, entry)
        _write_current(kdir, entry.name)
    except KernelBuildError as exc:
        failed = kdir / "last-failed-build.log"
        with contextlib.suppress(OSError):
            shutil.copy2(log_path, failed)
        raise KernelBuildError(f"{exc}\n(full log: {failed})") from exc
    except OSError as exc:
        raise KernelBuildError(f"kernel build in {work}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _install(out: Path, entry: Path) -> None:
    """Move a finished build directory into place; an existing entry (force) is replaced."""
    try:
        if entry.exists():
            trash = entry.with_name(f".build-old-{entry.name}")
            shutil.rmtree(trash, ignore_errors=True)
            entry.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        out.rename(entry)
    except OSError as exc:
        raise KernelBuildError(f"cannot install kernel cache entry {entry}: {exc}") from exc


def _write_current(kdir: Path, key: str) -> None:
    # `current` lets find_kernel work on hosts without linux-source; written atomically.
    try:
        atomic_write(kdir / "current", key + "\n")
    except OSError as exc:
        raise KernelBuildError(f"cannot write {kdir / 'current'}: {exc.strerror}") from exc
