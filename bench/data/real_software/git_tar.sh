# git and the archivers on a tree of small files: a repository of 400 files in 40 directories, commits
# with renames and deletions, a local clone (hard links to the objects), a --no-local clone, gc (packfiles,
# then read by mmap), fsck --full, repack -adf and verify-pack; then tar --xattrs --acls and cp -a of a
# tree with hard links, user.* xattrs, POSIX ACLs, a sparse file and a FIFO, and cp --sparse=always, each
# compared with its source; O_DIRECT reads and writes.
. /suites/lib.sh
export GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@t GIT_COMMITTER_NAME=t GIT_COMMITTER_EMAIL=t@t
export GIT_AUTHOR_DATE='2020-01-01T00:00:00Z' GIT_COMMITTER_DATE='2020-01-01T00:00:00Z'
rm -rf repo clone1 clone2 wt1 tree tree.tar untar cpa sparse.copy direct direct.copy
git init -q -b main repo
for d in $(seq 40); do mkdir repo/d$d; for f in $(seq 10); do echo "file $d $f" > repo/d$d/f$f; done; done
check git.commit git -C repo add -A
git -C repo commit -qm one
for d in $(seq 1 2 40); do git -C repo mv d$d/f1 d$d/renamed; git -C repo rm -q d$d/f2; echo more >> repo/d$d/f3; done
check git.renames git -C repo commit -qam renames
head=$(git -C repo rev-parse HEAD)
info "git HEAD $head"
check git.deterministic_head test "$head" = "$(git -C repo rev-parse HEAD)"
check git.fsck_loose git -C repo fsck --full --strict
check git.clone_local git clone -q repo clone1
check git.clone_hardlinks sh -c "find clone1/.git/objects -type f -links +1 | grep -q ."
check git.clone_no_local git clone -q --no-local repo clone2
check git.clone_tree_same test "$(git -C clone2 rev-parse HEAD^{tree})" = "$(git -C repo rev-parse HEAD^{tree})"
check git.gc git -C repo gc -q --prune=now
check git.packed sh -c "test -z \"\$(find repo/.git/objects -type f -path '*/objects/??/*')\""
check git.fsck_packed git -C repo fsck --full --strict
check git.repack git -C repo repack -adfq
check git.verify_pack sh -c "cd repo && git verify-pack .git/objects/pack/*.idx"
check git.log_after_repack test "$(git -C repo log --format=%H | wc -l)" = 2
check git.status_clean test -z "$(git -C clone1 status --porcelain)"
check git.worktree git -C repo worktree add -q ../wt1 HEAD~1
check git.worktree_files test "$(find wt1 -name f1 | wc -l)" = 40
# A tree with what archivers must keep.
mkdir -p tree/sub
echo data > tree/a; ln tree/a tree/sub/a-link; ln tree/a tree/a2
check xattr.set setfattr -n user.color -v blue tree/a
setfattr -n user.dirattr -v yes tree/sub
mkfifo tree/fifo
dd if=/dev/urandom of=tree/sparse bs=4096 count=1 seek=25600 status=none   # 100 MiB + 4 KiB, one block
truncate -s 200M tree/sparse
ln -s a tree/symlink
chmod 0751 tree/sub
# POSIX ACLs (setfacl's xattrs, written with python3: the image has no acl package): an access ACL on a
# file, a default ACL on a directory, which a file made in it inherits
check acl.set python3 -c '
import os, struct
def acl(*entries):  # (tag, perm, id): USER_OBJ 1, USER 2, GROUP_OBJ 4, MASK 0x10, OTHER 0x20
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
X = 0xFFFFFFFF
a = acl((1, 6, X), (2, 4, 1000), (4, 4, X), (0x10, 4, X), (0x20, 4, X))
os.setxattr("tree/a", "system.posix_acl_access", a)
assert os.getxattr("tree/a", "system.posix_acl_access") == a
os.setxattr("tree/sub", "system.posix_acl_default", acl((1, 7, X), (2, 5, 1000), (4, 5, X), (0x10, 5, X), (0x20, 0, X)))
open("tree/sub/inherits", "w").close()
assert len(os.getxattr("tree/sub/inherits", "system.posix_acl_access")) == 4 + 5 * 8
'
check acl.inherited_mode test "$(stat -c %a tree/sub/inherits)" = 640
touch -d '2001-02-03 04:05:06.123456789' tree/a
# O_DIRECT (databases: InnoDB's O_DIRECT, PostgreSQL's wal_sync_method open_datasync, RocksDB)
check o_direct.write dd if=/dev/urandom of=direct bs=4096 count=16 oflag=direct status=none
check o_direct.read sh -c "dd if=direct of=direct.copy bs=4096 iflag=direct status=none && cmp direct direct.copy"
info "du -k source sparse: $(du -k tree/sparse | cut -f1) apparent $(du -k --apparent-size tree/sparse | cut -f1)"
same_tree() {  # same_tree SRC DST: same types, modes, link groups, sizes, times, xattrs, contents
    local s d
    s=$(cd "$1" && find . -printf '%P %y %m %n %s %T@ %l\n' | sort)
    d=$(cd "$2" && find . -printf '%P %y %m %n %s %T@ %l\n' | sort)
    [ "$s" = "$d" ] || { echo "metadata differs:"; diff <(echo "$s") <(echo "$d"); return 1; }
    # per file in name order: readdir's order is the file system's own (tmpfs: creation order)
    s=$(cd "$1" && find . | sort | while read -r f; do getfattr -h -d -m - "$f" 2>&1; done)
    d=$(cd "$2" && find . | sort | while read -r f; do getfattr -h -d -m - "$f" 2>&1; done)
    [ "$s" = "$d" ] || { echo "xattrs differ:"; diff <(echo "$s") <(echo "$d"); return 1; }
    [ "$(stat -c %i "$2/a")" = "$(stat -c %i "$2/sub/a-link")" ] || { echo "hard link lost"; return 1; }
    cmp "$1/sparse" "$2/sparse" && cmp "$1/a" "$2/a"
}
check xattr.get test "$(getfattr --only-values -n user.color tree/a)" = blue
check tar.create tar --xattrs --xattrs-include='user.*' --acls -S -cf tree.tar -C tree .
mkdir untar
check tar.extract tar --xattrs --xattrs-include='user.*' --acls -xf tree.tar -C untar
check tar.same_tree same_tree tree untar
info "du -k after tar: $(du -k untar/sparse | cut -f1)"
check cp_a.copy cp -a tree cpa
check cp_a.same_tree same_tree tree cpa
info "du -k after cp -a: $(du -k cpa/sparse | cut -f1)"
check cp_a.sparse_small test "$(du -k cpa/sparse | cut -f1)" -le 64
check cp_sparse.copy cp --sparse=always tree/sparse sparse.copy
check cp_sparse.same cmp tree/sparse sparse.copy
sb=$(du -k sparse.copy | cut -f1)
info "du -k after cp --sparse=always: $sb"
check cp_sparse.small test "$sb" -le 64   # one 4 KiB block of data; over 9p 496: st_blksize (fsprobe st-blksize)
check du.tree_small test "$(du -sk tree | cut -f1)" -lt 2048
finish git_tar
