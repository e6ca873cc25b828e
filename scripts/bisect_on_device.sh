#!/usr/bin/env bash
# Find which commit broke a file's GPU tests, on a lent machine whose copy of the tree has no usable .git.
# Here (with git):  scripts/bisect_on_device.sh prepare FILE GOOD_COMMIT
#   writes .bisect/v0 (FILE at GOOD_COMMIT, the last version that passed on a GPU) .. vN (each later commit
#   that has a FILE it changed, the last one HEAD's), and .bisect/commits; send it with the call (carry: [".bisect"]).
# There:            scripts/bisect_on_device.sh run FILE PYTEST_ARGS...
#   tries the versions in binary search (v0 taken as good, vN as bad), prints each verdict and the first bad
#   commit, and leaves the newest good version in place, its commit in .bisect/good (for REPRO_GIT_SHA). It stops
#   (exit 2) at a version pytest cannot judge (a collection error, no test selected), and before any where .bisect/
#   is missing or was prepared for another file.
set -u
usage="usage: $0 prepare FILE GOOD_COMMIT | $0 run FILE PYTEST_ARGS..."
[ $# -ge 3 ] || { echo "$usage" >&2; exit 2; }
mode=$1 file=$2; shift 2
case $mode in prepare|run) ;; *) echo "unknown mode '$mode': $usage" >&2; exit 2 ;; esac
if [ "$mode" = prepare ]; then
  rm -rf .bisect && mkdir .bisect
  echo "$file" > .bisect/file
  n=0
  for commit in "$1" $(git log --reverse --format=%h "$1"..HEAD -- "$file"); do
    # a commit that deleted the file has no version of it to try
    git show "$commit:$file" > ".bisect/v$n" 2>/dev/null && echo "$n $commit" >> .bisect/commits && n=$((n + 1))
  done
  rm -f ".bisect/v$n"
  [ -s .bisect/commits ] && [ "$(awk 'NR == 1 {print $2}' .bisect/commits)" = "$1" ] ||
    { echo "$file does not exist at $1" >&2; exit 1; }
  [ "$n" -ge 2 ] || { echo "no commit after $1 changed $file: nothing to bisect" >&2; exit 1; }
  echo "$(( n - 1 )) later versions of $file after $1 in .bisect/"
  exit 0
fi
# unchecked, a .bisect/ left out of the call gave an empty first bad commit and exit 0, and one prepared for
# another file had its versions copied over FILE
prepared=$(cat .bisect/file 2>/dev/null)
[ -s .bisect/commits ] ||
  { echo "no .bisect/commits here: run '$0 prepare $file GOOD_COMMIT' where git is, and send .bisect" >&2; exit 2; }
[ "$prepared" = "$file" ] || { echo ".bisect/ holds versions of '$prepared', not of '$file'" >&2; exit 2; }
commit() { awk -v n="$1" '$1 == n {print $2}' .bisect/commits; }
lo=0 hi=$(( $(wc -l < .bisect/commits) - 1 ))
while [ $(( hi - lo )) -gt 1 ]; do
  mid=$(( (lo + hi) / 2 ))
  cp ".bisect/v$mid" "$file"
  python3 -m pytest -q -x "$@" > ".bisect/v$mid.log" 2>&1
  case $? in
    0) verdict=passes lo=$mid ;;
    1) verdict=FAILS hi=$mid ;;
    # no verdict: collection or usage errors, no tests selected, interrupted
    *) echo "$(commit $mid): pytest could not run the tests, see .bisect/v$mid.log:" >&2
       tail -3 ".bisect/v$mid.log" >&2; exit 2 ;;
  esac
  echo "$(commit $mid): $verdict ($(tail -1 ".bisect/v$mid.log"))"
done
cp ".bisect/v$lo" "$file" && commit $lo > .bisect/good
echo "first bad: $(commit $hi); left in place: $(commit $lo)"
