#!/usr/bin/env bash
# Runs bench/train_step.py once per argument string, each in its own process under a time limit,
# and collects each run's last line (its JSON figures) in $OUT/results.jsonl (default bench/out).
#   bash bench/run_suite.sh LIMIT_S "--stage=c --size=small" "--stage=c --size=full --dtype=bfloat16" ...
set -u
out=${OUT:-bench/out}
mkdir -p "$out"
limit=$1
shift
n=0
for args in "$@"; do
  n=$((n + 1))
  log="$out/run_$(date +%H%M%S)_$n.log"
  echo "== run $n: $args" | tee -a "$out/summary.txt"
  start=$(date +%s)
  env PYTHONUNBUFFERED=1 timeout "$limit" ${PYTHON:-python3} bench/train_step.py $args >"$log" 2>&1
  rc=$?
  echo "rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
  last=$(tail -n 1 "$log")
  if [[ $rc == 0 && $last == \{* ]]; then
    echo "$last" | tee -a "$out/results.jsonl"
  else
    grep -v '^[WI]0000\|^W1\|^I1' "$log" | tail -n 15
  fi
done
