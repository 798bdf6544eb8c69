# coreutils, findutils, tar, cpio and rsync on a tree with odd names (spaces, a newline, a tab, a leading
# dash, glob and quote characters, UTF-8, 255 bytes, a path near PATH_MAX), permissions (sticky, 000, umask,
# owners the image does not know, as another user) and special files (FIFO, Unix socket, dangling, looping
# and absolute symlinks, hard links); device nodes and setuid/setgid modes (files, a setgid directory's
# inheritance, a write or chown clearing setuid) apart. Each copy is listed with find and compared with
# its source; the listings, error messages and exit codes are printed with `same` for the driver to
# compare between runtimes.
# QUICK=1 (the CI test) makes a 4-level deep path and leaves out the checks marked `full`: what coreutils
# answers the same on any file system (error messages) and the second archiver or copy of each kind.
. /suites/lib.sh
P=$PWD
DEPTH=38
[ -n "${QUICK:-}" ] && DEPTH=4
full() { [ -z "${QUICK:-}" ] && "$@"; }
rm -rf src spec cpa untar untar-pax uncpio rs mvd t.tar t.pax t.cpio sorted parts u1 u2
# what a copy must keep, one line per entry in name order (a newline in a name printed as ~): type,
# mode, owner, links, size (not a directory's: each file system has its own), mtime with nanoseconds (not a
# symlink's: `touch -h` over a network file system may not set it; `list DIR s`: to the second, and no
# directory's: cpio sets none), target;
# then the device numbers of devices. Two find runs, whatever the tree's size (processes cost under TCG).
list() {
    (cd "$1" && find . -mindepth 1 -printf '%P\001%y\001%m\001%U:%G\001%n\001%s\001%T@\001%l\0' | sort -z \
        | tr '\n\0' '~\n' | awk -F'\001' -v s="${2:-}" '{
            $1 = $1; if ($2 == "d") $6 = "-"; if ($2 == "l" || (s && $2 == "d")) $7 = "-"; else if (s) sub(/\.[0-9]*$/, "", $7)
            print }'
     find . -mindepth 1 \( -type c -o -type b \) -exec stat -c '%n dev %t:%T' {} + | sort)
}
same_list() { diff <(list "$1") <(list "$2"); }
# the same, but what an archive cannot hold: tar skips sockets ("socket ignored")
same_list_archived() { diff <(list "$1" | grep -v '^socket s ') <(list "$2"); }
# the same to the second (cpio's newc keeps whole seconds)
same_list_seconds() { diff <(list "$1" s) <(list "$2" s); }
mv_cross_fs() { cp -a src/ünï mvsrc && mv mvsrc /run/mvd && list /run/mvd && rm -rf /run/mvd; }
mv_into_place() { mkdir -p /run/x/y && echo z > /run/x/y/z && touch -d '2020-01-01 00:00:00.5' /run/x/y/z /run/x/y && mv /run/x mvd && list mvd; }
recursive_chmod() { cp -a src/ünï rec && chmod -R u=rwX,go=rX rec && chown -R 1000:1000 rec && list rec && rm -rf rec; }
long=$(printf 'L%.0s' $(seq 255))
mk_tree() {
    mkdir -p 'src/dir with spaces/sub' src/.hidden src/-dash src/ünï/日本語 src/sticky src/nodir
    printf 'a\n' > 'src/dir with spaces/file  two  spaces'
    printf 'nl\n' > 'src/new
line'
    printf 'x\n' > 'src/-dash/--help'
    printf 't\n' > "src/tab	name"
    printf 'g\n' > 'src/glob*?[x]'
    printf 'b\n' > 'src/back\slash'
    printf 'q\n' > "src/quote'\"s"
    printf 'u\n' > 'src/ünï/日本語/ファイル'
    printf 'h\n' > src/.hidden/.dot
    printf 'long\n' > "src/$long"
    # 38 levels of 100-byte names: 3.8 KiB, near PATH_MAX (4096; past it cp and touch fail on any file system)
    d=$(printf 'd%.0s' $(seq 100))
    (cd src && mkdir deep && cd deep && for _ in $(seq $DEPTH); do mkdir "$d"; cd "$d"; done && echo bottom > file)
    printf 'hard\n' > src/hard1; for i in 2 3 4 5; do ln src/hard1 src/hard$i; done
    ln -s ../nowhere src/dangling; ln -s loop src/loop; ln -s /etc/hostname src/absolute
    ln -s 'dir with spaces/sub' src/dirlink
    mkfifo src/fifo
    python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])' src/socket
    chmod 1777 src/sticky
    printf 'n\n' > src/nothing; chmod 000 src/nothing
    chmod 000 src/nodir
    printf 'o\n' > src/owned; chown 12345:54321 src/owned; chown -h 4242:4243 src/dangling
    mkdir -p src/grp/sub; touch src/grp/file; chgrp -R 4000 src/grp
    python3 -c 'import random, sys; sys.stdout.buffer.write(random.Random(2).randbytes(300000))' > src/random
    truncate -s 5M src/sparse; printf 'end' >> src/sparse
    find src -depth -exec touch -h -d '2021-05-06 07:08:09.123456789' {} +
}
check tree.make mk_tree
same tree.list list src
same tree.deep_path sh -c "cd src/deep && find . -name file | wc -c && cat \$(find . -name file)"
same tree.find_types sh -c "cd src && for t in f d l p s c b; do printf '%s ' \$t; find . -type \$t | wc -l; done"
same tree.find_perm sh -c "cd src && find . -perm -4000 -o -perm -2000 -o -perm -1000 | sort"
same tree.find_links sh -c "cd src && find . -type f -links +1 | sort && find . -xtype l | sort"
full same tree.find_newer sh -c "touch -d '2021-05-06 07:08:09.5' ref && find src -newer ref | wc -l && find src ! -newer ref -type f | wc -l; rm ref"
same tree.find_loop find -L src/loop src/dirlink
full same tree.find_print0 sh -c "find src -maxdepth 1 -print0 | sort -z | xargs -0 -n1 basename | od -c | tail -3"
full same tree.ls sh -c "ls -la --time-style=+%s.%N src | tail -n +2 | grep -v ' \\.\\{1,2\\}\$' | awk '{ \$5 = (\$1 ~ /^d/ ? \"-\" : \$5); print }'"
same tree.name_too_long touch "src/$long-x"
full same tree.readlink_loop readlink -f src/loop/x
full same tree.ln_dir ln src/sticky src/sticky-hardlink
full full same tree.rmdir_nonempty rmdir src/grp
full same tree.mv_into_self mv src/grp src/grp/sub
same tree.stat_special stat -c '%n %F %a %h' src/fifo src/socket
# device nodes and setuid/setgid modes, apart (spec/): a host volume under pykata refuses them on purpose
# (pykata.hypervisor.fileguard), so they are kept out of the tree the copies compare
mkdir -p spec
same special.mknod sh -c "mknod spec/null c 1 3 && mknod spec/loopdev b 7 0 && echo made"
same special.stat_devices stat -c '%n %F %a %t:%T' spec/null spec/loopdev
same special.open_device sh -c "cat spec/null && echo read-ok; head -c 1 spec/loopdev 2>&1 | sed 's/^.*: //'"
printf 's\n' > spec/suid; printf 'g\n' > spec/sgid-file
same special.chmod_setuid sh -c "chmod 4755 spec/suid; stat -c %a spec/suid"
same special.chmod_setgid_file sh -c "chmod 2711 spec/sgid-file; stat -c %a spec/sgid-file"
same special.setgid_dir sh -c "mkdir spec/sgid && chgrp 4000 spec/sgid && chmod 2775 spec/sgid; touch spec/sgid/f; mkdir spec/sgid/d; stat -c '%n %a %g' spec/sgid spec/sgid/f spec/sgid/d"
same special.mkdir_setgid sh -c "mkdir -m 2775 spec/mk; stat -c '%n %a' spec/mk"
same special.cp_a sh -c "cp -a spec spec-copy; stat -c '%n %F %a %g' spec-copy/* | sort; rm -rf spec-copy"
# as another user: permissions, the sticky directory, the 000 file and directory
as() { setpriv --reuid="$1" --regid="$1" --clear-groups -- "${@:2}"; }
same perm.nobody_reads_000 as 1000 cat src/nothing
same perm.nobody_lists_000 as 1000 ls src/nodir
same perm.root_reads_000 cat src/nothing
same perm.sticky sh -c "setpriv --reuid=1000 --regid=1000 --clear-groups touch src/sticky/mine && setpriv --reuid=1001 --regid=1001 --clear-groups rm -f src/sticky/mine; ls src/sticky; rm -f src/sticky/mine"
same perm.chmod_not_owner as 1000 chmod 777 src/owned
same perm.write_readonly_dir sh -c "mkdir ro && chmod 555 ro && setpriv --reuid=1000 --regid=1000 --clear-groups touch ro/x; rmdir ro"
same perm.umask sh -c "umask 077 && rm -rf u1 u2 && touch u1 && mkdir u2 && stat -c '%n %a' u1 u2 && rm -rf u1 u2"
same special.setuid_cleared_on_write sh -c "printf x > suid2 && chown 1000 suid2 && chmod 4755 suid2 && setpriv --reuid=1000 --regid=1000 --clear-groups sh -c 'echo x >> suid2' && stat -c %a suid2; rm -f suid2"
same special.chown_clears_setuid sh -c "printf x > suid3 && chmod 4755 suid3 && chown 1000:1000 suid3 && stat -c %a suid3; rm -f suid3"
# copies, each compared with the source (the times the checks above changed set back first)
find src -depth -exec touch -h -d '2021-05-06 07:08:09.123456789' {} +
check cp_a.copy cp -a src cpa
same cp_a.same same_list src cpa
check tar.create tar --xattrs -cpf t.tar -C src .
# names only (which of the hard links is stored whole follows readdir's order, each file system's own)
same tar.list sh -c "tar -tf t.tar | sort; tar -tvf t.tar | grep -c ' link to '"
mkdir untar
same tar.extract tar --xattrs -xpf t.tar -C untar
same tar.same same_list_archived src untar
full check tar.pax_create tar --format=posix --xattrs -cpf t.pax -C src .
full mkdir untar-pax
full same tar.pax_extract tar --format=posix --xattrs -xpf t.pax -C untar-pax
full same tar.pax_same same_list_archived src untar-pax
full same cpio.create sh -c "cd src && find . -mindepth 1 -print0 | cpio -o0 -H newc --quiet > ../t.cpio"
full mkdir uncpio
full same cpio.extract sh -c "cd uncpio && cpio -idm0 --quiet --no-absolute-filenames < ../t.cpio"
full same cpio.same same_list_seconds src uncpio
same rsync.copy rsync -aHX --numeric-ids src/ rs/
same rsync.same same_list src rs
same rsync.nothing_to_do rsync -aHXi --numeric-ids src/ rs/
printf 'changed\n' > 'src/dir with spaces/file  two  spaces'; touch -d '2022-01-01' 'src/dir with spaces/file  two  spaces'
rm src/hard5; mv src/random src/random2
same rsync.update sh -c "rsync -aHXi --numeric-ids --delete src/ rs/ | sed 's/^\\(.\\{11\\}\\)/\\1 /' | sort"
full same rsync.checksum rsync -aHXic --numeric-ids src/ rs/
same rsync.same_after same_list src rs
# across file systems (the place to /run, a tmpfs in both): rename gives EXDEV and mv copies
same mv.cross_fs mv_cross_fs
full same mv.into_place mv_into_place
# chmod/chown -R, sort and split with temporary files in the place
full same recursive.chmod recursive_chmod
full same sort.spill sh -c "seq 200000 | sed 's/\$/ x/' | sort -S 64K -T . -k1,1nr | md5sum"
full same split.cat sh -c "split -b 100000 -d src/random2 parts. && ls parts.* | wc -l && cat parts.* | cmp - src/random2 && echo same && rm -f parts.*"
same sha256.check sh -c "cd src && find . -type f -print0 | sort -z | xargs -0 sha256sum > ../sums && sha256sum --quiet -c ../sums && wc -l < ../sums"
# removal: rm -rf of every copy (the deep path, the 000 directory)
chmod 755 src/nodir
same rm.rf sh -c "rm -rf src spec cpa untar untar-pax uncpio rs mvd t.tar t.pax t.cpio sums && ls -A | grep -v -e '^tmp\.' -e '^redis' -e '^www' -e '^nginx' -e '^mc' | wc -l"
finish tree_ops
