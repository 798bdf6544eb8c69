# git and the archivers on a tree of small files: a repository of 400 files in 40 directories, commits
# with renames and deletions, a local clone (hard links to the objects), a --no-local clone, gc (packfiles,
# then read by mmap), fsck --full, repack -adf and verify-pack; then tar --xattrs and cp -a of a tree with
# hard links, user.* xattrs, a sparse file and a FIFO, and cp --sparse=always, each compared with its source.
. /suites/lib.sh
export GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@t GIT_COMMITTER_NAME=t GIT_COMMITTER_EMAIL=t@t
export GIT_AUTHOR_DATE='2020-01-01T00:00:00Z' GIT_COMMITTER_DATE='2020-01-01T00:00:00Z'
rm -rf repo clone1 clone2 tree tree.tar untar cpa sparse.copy
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
touch -d '2001-02-03 04:05:06.123456789' tree/a
info "du -k source sparse: $(du -k tree/sparse | cut -f1) apparent $(du -k --apparent-size tree/sparse | cut -f1)"
same_tree() {  # same_tree SRC DST: same types, modes, link groups, sizes, times, xattrs, contents
    local s d
    s=$(cd "$1" && find . -printf '%P %y %m %n %s %T@ %l\n' | sort)
    d=$(cd "$2" && find . -printf '%P %y %m %n %s %T@ %l\n' | sort)
    [ "$s" = "$d" ] || { diff <(echo "$s") <(echo "$d") >&2; return 1; }
    [ "$(cd "$1" && getfattr -R -d -m user. . 2>/dev/null)" = "$(cd "$2" && getfattr -R -d -m user. . 2>/dev/null)" ] || return 1
    [ "$(stat -c %i "$2/a")" = "$(stat -c %i "$2/sub/a-link")" ] || return 1
    cmp "$1/sparse" "$2/sparse" && cmp "$1/a" "$2/a"
}
check xattr.get test "$(getfattr --only-values -n user.color tree/a)" = blue
check tar.create tar --xattrs --xattrs-include='user.*' -S -cf tree.tar -C tree .
mkdir untar
check tar.extract tar --xattrs --xattrs-include='user.*' -xf tree.tar -C untar
check tar.same_tree same_tree tree untar
info "du -k after tar: $(du -k untar/sparse | cut -f1)"
check cp_a.copy cp -a tree cpa
check cp_a.same_tree same_tree tree cpa
info "du -k after cp -a: $(du -k cpa/sparse | cut -f1)"
check cp_sparse.copy cp --sparse=always tree/sparse sparse.copy
check cp_sparse.same cmp tree/sparse sparse.copy
sb=$(du -k sparse.copy | cut -f1)
info "du -k after cp --sparse=always: $sb"
check cp_sparse.small test "$sb" -lt 1024
check du.tree_small test "$(du -sk tree | cut -f1)" -lt 2048
finish git_tar
