#!/bin/sh
#
# bench/upgrade-state-cost.sh: the CPU cost of saving and loading the
# live-upgrade state at N VPs (bench/upgrade-state-cost.c), for this tree
# and for REV (default 82f017c, the last positional state format), both
# built here with the same command and run alternately, twice each.
#
#   bench/upgrade-state-cost.sh BUILD-DIR [N [REV]]
#
# BUILD-DIR is a configured build of this tree (its config.h is used).
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "$1" && pwd)
n=${2:-1000}
rev=${3:-82f017c}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
libs=
grep -q '^#define HAVE_OPENSSL 1' "$build/config.h" && libs="-lssl -lcrypto"
mkdir -p "$tmp/old" "$tmp/new"
git -C "$top" archive "$rev" sc_remoted.c utils.c utils.h mjl_list.c \
  mjl_list.h mjl_splaytree.c mjl_splaytree.h tests/fuzz/fuzz_common.h |
  tar -x -C "$tmp/old"
for t in new old; do
  src=$top
  [ "$t" = old ] && src=$tmp/old
  ${CC:-cc} -O2 -DHAVE_CONFIG_H -I"$build" -I"$src" -o "$tmp/$t/cost" \
    "$top/bench/upgrade-state-cost.c" "$src/utils.c" "$src/mjl_list.c" \
    "$src/mjl_splaytree.c" $libs
done
for i in 1 2; do
  printf '%-8s ' "$rev:"; "$tmp/old/cost" "$n"
  printf '%-8s ' "this:"; "$tmp/new/cost" "$n"
done
