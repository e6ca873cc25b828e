#!/usr/bin/env bash
# Find which commit broke a file's GPU tests, on a lent machine whose copy of the tree has no usable .git.
# Here (with git):  scripts/bisect_on_device.sh prepare FILE GOOD_COMMIT
#   writes .bisect/v0 (FILE at GOOD_COMMIT, the last version that passed on a GPU) .. vN (each later commit
#   that touched FILE, the last one HEAD's), and .bisect/commits; send it with the call (carry: [".bisect"]).
# There:            scripts/bisect_on_device.sh run FILE PYTEST_ARGS...
#   tries the versions in binary search (v0 taken as good, vN as bad), prints each verdict and the first bad
#   commit, and leaves the newest good version in place, its commit in .bisect/good (for REPRO_GIT_SHA).
set -u
usage="usage: $0 prepare FILE GOOD_COMMIT | $0 run FILE PYTEST_ARGS..."
[ $# -ge 3 ] || { echo "$usage" >&2; exit 2; }
mode=$1 file=$2; shift 2
case $mode in prepare|run) ;; *) echo "unknown mode '$mode': $usage" >&2; exit 2 ;; esac
if [ "$mode" = prepare ]; then
  rm -rf .bisect && mkdir .bisect
  commits=("$1" $(git log --reverse --format=%h "$1"..HEAD -- "$file"))
  for i in "${!commits[@]}"; do
    git show "${commits[$i]}:$file" > ".bisect/v$i" && echo "$i ${commits[$i]}" >> .bisect/commits
  done
  echo "$(( ${#commits[@]} - 1 )) later versions of $file after ${commits[0]} in .bisect/"
  exit 0
fi
commit() { awk -v n="$1" '$1 == n {print $2}' .bisect/commits; }
lo=0 hi=$(( $(wc -l < .bisect/commits) - 1 ))
while [ $(( hi - lo )) -gt 1 ]; do
  mid=$(( (lo + hi) / 2 ))
  cp ".bisect/v$mid" "$file"
  if python3 -m pytest -q -x "$@" > ".bisect/v$mid.log" 2>&1; then verdict=passes lo=$mid; else verdict=FAILS hi=$mid; fi
  echo "$(commit $mid): $verdict ($(tail -1 ".bisect/v$mid.log"))"
done
cp ".bisect/v$lo" "$file" && commit $lo > .bisect/good
echo "first bad: $(commit $hi); left in place: $(commit $lo)"
