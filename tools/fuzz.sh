#!/usr/bin/env bash
# Coverage-guided fuzzing of the shim's request path (libFuzzer, clang, ASan+UBSan).
#
#   tools/fuzz.sh build                 builds build/fuzz/fuzz_ring (if its sources changed)
#   tools/fuzz.sh run SECONDS           fuzzes for SECONDS; the last line is
#                                       "fuzz: R requests, E executions, C crashes in S s"
#   tools/fuzz.sh replay FILE...        runs the harness once on each FILE (regressions)
#
# The harness (ffi/fuzz_ring.c) is compiled with the shim's own C sources, not
# the cffi module.  Seeds: tests/fuzz/corpus (read-only here); what libFuzzer
# learns goes to build/fuzz/corpus.  A crash, sanitizer report, leak or hang
# (-timeout) makes the run exit non-zero, and its input is copied to
# tests/fuzz/regressions/, which tests/test_hostile_regressions.py replays.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=build/fuzz
BIN=$OUT/fuzz_ring
CC=${FUZZ_CC:-}
if [ -z "$CC" ]; then
  for c in clang clang-19 clang-16 clang-15 clang-14; do
    if command -v "$c" >/dev/null 2>&1; then CC=$c; break; fi
  done
fi
SRCS=$(ls ffi/*.c | grep -v '/fuzz_')
SAN="-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:detect_leaks=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}

build() {
  [ -n "$CC" ] || { echo "fuzz: no clang found (apt-get install clang-14 libclang-rt-14-dev)" >&2; exit 2; }
  mkdir -p "$OUT"
  local newest
  newest=$(ls -t ffi/*.c ffi/*.h tools/fuzz.sh | head -1)
  if [ -x "$BIN" ] && [ "$BIN" -nt "$newest" ]; then return 0; fi
  # shellcheck disable=SC2086
  $CC -std=c11 -D_GNU_SOURCE -O1 -g $SAN -Wall -Wno-unused-parameter -Iffi \
      -o "$BIN.tmp" ffi/fuzz_ring.c $SRCS -luring -lxengnttab -lxenevtchn -lpthread
  mv "$BIN.tmp" "$BIN"
}

run() {
  local secs=${1:-60}
  build
  mkdir -p "$OUT/corpus" "$OUT/artifacts"
  rm -f "$OUT"/artifacts/* "$OUT/stats.txt"
  local log=$OUT/fuzz.log t0 t1 rc=0
  t0=$(date +%s.%N)
  XT_FUZZ_STATS=$OUT/stats.txt "$BIN" -max_total_time="$secs" -timeout=10 -max_len=8192 -rss_limit_mb=2048 \
      -print_final_stats=1 -artifact_prefix="$OUT/artifacts/" \
      "$OUT/corpus" tests/fuzz/corpus >"$log" 2>&1 || rc=$?
  t1=$(date +%s.%N)
  local execs reqs crashes
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  [ -n "$execs" ] || execs=$(awk '/^requests/ {e+=$4} END {print e+0}' "$OUT/stats.txt" 2>/dev/null || echo 0)
  reqs=$(awk '/^requests/ {r+=$2} END {print r+0}' "$OUT/stats.txt" 2>/dev/null || echo 0)
  crashes=$(find "$OUT/artifacts" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l)
  if [ "$rc" -ne 0 ] || [ "$crashes" -gt 0 ]; then
    [ "$crashes" -gt 0 ] || crashes=1
    grep -E -A40 '^(==[0-9]+==ERROR|.*runtime error|fuzz_ring:|ALARM|==[0-9]+== ERROR)' "$log" | head -80 >&2 || tail -40 "$log" >&2
    mkdir -p tests/fuzz/regressions
    for a in "$OUT"/artifacts/*; do
      [ -f "$a" ] || continue
      cp "$a" tests/fuzz/regressions/
      echo "fuzz: input saved as tests/fuzz/regressions/$(basename "$a") (log: $log)" >&2
    done
  fi
  printf 'fuzz: %s requests, %s executions, %s crashes in %.0f s\n' \
      "$reqs" "$execs" "$crashes" "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')"
  [ "$crashes" -eq 0 ]
}

replay() {
  build
  [ $# -gt 0 ] || return 0
  "$BIN" -runs=1 "$@"
}

cmd=${1:-}; shift || true
case "$cmd" in
  build) build ;;
  run) run "$@" ;;
  replay) replay "$@" ;;
  *) echo "usage: tools/fuzz.sh build | run SECONDS | replay FILE..." >&2; exit 2 ;;
esac
