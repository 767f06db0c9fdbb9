"""cffi builder (API mode) for the shim: compiles ffi/*.c into xentap._shim_c.

The cdef is ffi/xt.h itself with its preprocessor lines dropped, so the
header stays the one description of the API.  Only xentap/shim.py imports
the compiled module.
"""
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADER = HERE / "xt.h"
SOURCES = sorted(str(p.relative_to(HERE.parent)) for p in HERE.glob("*.c")
                 if not p.name.startswith("fuzz_"))

CFLAGS = ["-std=c11", "-D_GNU_SOURCE", "-O2", "-g", "-Wall", "-Wextra",
          "-Werror", "-Wno-unused-parameter", "-fno-strict-aliasing",
          "-pthread"]


def _cdef() -> str:
    lines = [ln for ln in HEADER.read_text().splitlines()
             if not ln.lstrip().startswith("#")]
    return "\n".join(lines)


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "xentap._shim_c",
    '#include "xt.h"\n',
    sources=SOURCES,
    include_dirs=[str(HERE)],
    libraries=["uring", "xengnttab", "xenevtchn", "pthread"],
    extra_compile_args=CFLAGS,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
