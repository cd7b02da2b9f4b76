#!/usr/bin/env bash
# run.sh BOOTSTRAP WORKLOAD INPUTS OUTPUT APP_ID [options passed to the jar]
# Runs one Kafka Streams workload, samples /proc/<pid>/stat (utime+stime) every 0.2 s from
# outside and prints the last sample and peak RSS next to the app's own RESULT line.
# JAVA_OPTS defaults to -Xms512m -Xmx2g.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tck=$(getconf CLK_TCK)
java ${JAVA_OPTS:--Xms512m -Xmx2g} -jar "$here/target/kstreams-bench.jar" run "$@" &
pid=$!
cpu=0 rss=0
while kill -0 $pid 2>/dev/null; do
  if s=$(cat /proc/$pid/stat 2>/dev/null); then
    s=${s##*) }; set -- $s          # fields from 3 (state) on
    cpu=$(( ${12} + ${13} ))        # utime (14) + stime (15), in ticks
    r=$(awk '/VmRSS/{print $2}' /proc/$pid/status 2>/dev/null || echo 0)
    (( r > rss )) && rss=$r
  fi
  sleep 0.2
done
rc=0; wait $pid || rc=$?
echo "PROC pid=$pid cpu_s=$(awk -v t=$cpu -v k=$tck 'BEGIN{printf "%.2f", t/k}') peak_rss_mib=$((rss/1024)) rc=$rc"
exit $rc
