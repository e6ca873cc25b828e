#!/usr/bin/env bash
# Run repro commands on a lent GPU machine that starts bare and offline (the device tool of this workplace):
# install the wheels carried in .whl/ (build them with ../shared/device/make-wheels.sh lm-eval), run each
# argument as one command, going on when one fails (the call exits with the last failure's status), and leave the
# new run records and every log in $OUT.
#   scripts/on_device.sh "repro task=lm_eval model=trained scale=small logger=none" "pytest -q tests/test_kv_quant.py"
# The commit the records name comes from REPRO_GIT_SHA (any .git in the copy there is hidden from the commands).
# Every command gets what is left of DEADLINE_S seconds (default 540) and is then stopped with SIGTERM, which a
# repro job turns into a `killed` record that keeps its rows. Keep DEADLINE_S well inside the call's own limit
# (the tool's 10 minutes, or less where less device time is left, minus the install): the records found so far are
# packed after every command, so a call cut short still brings back those of the commands that ended.
set -u
# checked before the install, which takes a minute of the call's time
[ -n "${OUT:-}" ] || { echo "OUT is not set: the folder whose files come back (the device tool sets it)" >&2; exit 2; }
deadline=$(( $(date +%s) + ${DEADLINE_S:-540} ))
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
# resolved against what the machine has; where that fails (a pin the image cannot meet), every wheel as it is
python3 -m pip install -q --no-index --find-links .whl hydra-core datasets submitit hydra-submitit-launcher \
  lm-eval || python3 -m pip install -q --no-index --no-deps .whl/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv
# The copy there may hold a .git that is not the commit the tree was sent at (seen 2026-12-07: a later call's
# records named the first call's commit, dirty): with REPRO_GIT_SHA given, the commands see no git at all, so
# the records name that commit (and no dirty flag, which only a git of the tree could tell)
if [ -n "${REPRO_GIT_SHA:-}" ]; then export GIT_DIR=/nonexistent/.git; fi
start=$(mktemp)
mkdir -p "$OUT/logs"
i=0 worst=0  # the call's exit status: the last nonzero one of its commands, 124 for one left unrun
for command in "$@"; do
  i=$((i + 1))
  begun=$(date +%s)
  left=$(( deadline - begun ))
  if [ "$left" -lt 10 ]; then echo "== [$i] not run, no time left: $command"; worst=124; continue; fi
  timeout -s TERM -k 20 "$left" bash -c "$command" > "$OUT/logs/$i.log" 2>&1
  status=$?
  [ "$status" -eq 0 ] || worst=$status
  echo "== [$i] exit $status after $(( $(date +%s) - begun )) s: $command"
  grep -E "^\[repro\]|passed|failed|Error|error:" "$OUT/logs/$i.log" | tail -6
  # and the records jobs save while they run (outputs/), which are all that is left of one that dies silently;
  # packed beside and then moved over the last archive, so a call cut short while packing still has that one
  find results/runs outputs -name '*.json' -newer "$start" 2>/dev/null | tar czf "$OUT/records.tgz.part" -T - &&
    mv "$OUT/records.tgz.part" "$OUT/records.tgz"
done
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -r "$OUT/logs"
exit "$worst"
