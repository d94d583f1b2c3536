#!/bin/sh
# fake-xenstore.sh: sourced. A stand-in xenstore for running dom0 hotplug scripts outside
# Xen: xenstore-read, xenstore-write, xenstore-rm and xenstore-exists commands over a
# directory, to put first on PATH.
#   fake_xenstore STORE BIN   write the commands into BIN, keeping the store under STORE
#   xs_get STORE PATH         print a node's value (exit 1 if the node has none)
#   xs_set STORE PATH VALUE   set a node (creating its parents)
#   xs_has STORE PATH         exit 0 if the node exists
# A node /a/b is the directory STORE/a/b, its value the file STORE/a/b/.value. Paths
# without a leading / are relative to dom0's home, /local/domain/0, as for the real
# commands run in dom0. Read of a node without a value and rm of a missing node fail.
# shellcheck shell=sh

fake_xenstore() {
    mkdir -p "$1" "$2"
    for cmd in read write rm exists; do
        {
            printf '#!/bin/sh\n'
            printf 'store=%s\n' "$(printf %s "$1" | sed "s/'/'\\\\''/g; s/^/'/; s/\$/'/")"
            cat <<'BODY'
abs() { case $1 in /*) printf '%s' "$1" ;; *) printf '/local/domain/0/%s' "$1" ;; esac; }
BODY
            case $cmd in
            read) cat <<'BODY'
[ $# -ge 1 ] || { echo "usage: xenstore-read PATH..." >&2; exit 2; }
for p in "$@"; do
    f=$store$(abs "$p")/.value
    [ -f "$f" ] || { echo "xenstore-read: couldn't read path $p" >&2; exit 1; }
    cat "$f"; echo
done
BODY
            ;;
            write) cat <<'BODY'
if [ $# -lt 2 ] || [ $(($# % 2)) -ne 0 ]; then echo "usage: xenstore-write PATH VALUE..." >&2; exit 2; fi
while [ $# -ge 2 ]; do
    d=$store$(abs "$1")
    mkdir -p "$d" && printf '%s' "$2" >"$d/.value" || exit 1
    shift 2
done
BODY
            ;;
            rm) cat <<'BODY'
[ $# -ge 1 ] || { echo "usage: xenstore-rm PATH..." >&2; exit 2; }
for p in "$@"; do
    d=$store$(abs "$p")
    [ -d "$d" ] || { echo "xenstore-rm: could not remove path $p" >&2; exit 1; }
    rm -rf "$d"
done
BODY
            ;;
            exists) cat <<'BODY'
[ $# -ge 1 ] || { echo "usage: xenstore-exists PATH..." >&2; exit 2; }
for p in "$@"; do
    [ -d "$store$(abs "$p")" ] || exit 1
done
BODY
            ;;
            esac
        } >"$2/xenstore-$cmd"
        chmod +x "$2/xenstore-$cmd"
    done
}

xs_get() {
    case $2 in /*) _p=$2 ;; *) _p=/local/domain/0/$2 ;; esac
    [ -f "$1$_p/.value" ] && cat "$1$_p/.value"
}

xs_set() {
    case $2 in /*) _p=$2 ;; *) _p=/local/domain/0/$2 ;; esac
    mkdir -p "$1$_p" && printf '%s' "$3" >"$1$_p/.value"
}

xs_has() {
    case $2 in /*) _p=$2 ;; *) _p=/local/domain/0/$2 ;; esac
    [ -d "$1$_p" ]
}
