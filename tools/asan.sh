#!/usr/bin/env bash
# The shim under AddressSanitizer + UndefinedBehaviorSanitizer.
#
#   tools/asan.sh build        builds the cffi extension with
#                              -fsanitize=address,undefined into build/asan/
#   tools/asan.sh [test]       builds, then runs the shim's test suites against it
#
# The sanitized module is the same cffi builder (ffi/build_shim.py: same
# sources, cdef and libraries) with sanitizer flags, compiled into build/asan
# so that it never replaces xentap/_shim_c*.so.  xentap/shim.py loads it when
# XENTAP_SHIM_MODULE names its file.  Python itself is not sanitized, so the
# ASan runtime is LD_PRELOADed and leak detection is off (the interpreter
# keeps its memory to the end).  Every report is fatal (halt_on_error, UBSan
# -fno-sanitize-recover), and the log is checked for reports as well.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
OUT=build/asan
SUITES=(tests/test_shim.py tests/test_blkif_features.py tests/test_hostile.py)

build() {
  mkdir -p "$OUT"
  local newest so
  newest=$(ls -t ffi/*.c ffi/*.h ffi/build_shim.py tools/asan.sh | head -1)
  so=$(ls "$OUT"/xentap/_shim_c*.so 2>/dev/null | head -1 || true)
  if [ -n "$so" ] && [ "$so" -nt "$newest" ]; then realpath "$so"; return 0; fi
  "$PY" - "$OUT" <<'PYEOF'
import sys
from pathlib import Path

sys.path.insert(0, "ffi")
import build_shim  # noqa: E402  (the one description of the extension)
from cffi import FFI  # noqa: E402

out = sys.argv[1]
name, source, _ext, kw = build_shim.ffibuilder._assigned_source
san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
kw = dict(kw)
# cffi compiles inside `out`: give it absolute paths.
kw["sources"] = [str(Path(s).resolve()) for s in kw["sources"]]
# -O1 keeps reports readable; -Werror off: sanitizer builds bring their own warnings.
kw["extra_compile_args"] = [f for f in kw.get("extra_compile_args", [])
                            if f not in ("-O2", "-Werror")] + ["-O1"] + san
kw["extra_link_args"] = list(kw.get("extra_link_args", [])) + san
ffi = FFI()
ffi.cdef(build_shim._cdef())
ffi.set_source(name, source, **kw)
so = ffi.compile(tmpdir=out)
print(Path(so).resolve())
PYEOF
}

run_tests() {
  local so libasan log rc=0
  so=$(build | tail -1)
  libasan=$(${CC:-gcc} -print-file-name=libasan.so)
  [ -f "$libasan" ] || { echo "asan: no libasan runtime ($libasan)" >&2; exit 2; }
  log=$OUT/asan-test.log
  export LD_PRELOAD=$libasan XENTAP_SHIM_MODULE=$so
  export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=1:strict_string_checks=1
  export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
  # The suites must really run on the sanitized module.
  "$PY" -c 'import sys, xentap.shim as s; f = s._shim.__file__; sys.exit(0 if f == sys.argv[1] else f"asan: loaded {f}")' "$so"
  "$PY" -m pytest -q -p no:cacheprovider "${SUITES[@]}" "$@" 2>&1 | tee "$log" || rc=$?
  if grep -q -E 'ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer' "$log"; then
    echo "asan: sanitizer report in $log" >&2
    rc=1
  fi
  [ "$rc" -eq 0 ] && echo "asan: ${SUITES[*]} clean under ASan+UBSan" || echo "asan: FAILED (log: $log)" >&2
  return "$rc"
}

case "${1:-test}" in
  build) build ;;
  test) shift || true; run_tests "$@" ;;
  *) echo "usage: tools/asan.sh [build | test [pytest args]]" >&2; exit 2 ;;
esac
