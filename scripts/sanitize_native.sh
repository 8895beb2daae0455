#!/usr/bin/env bash
# Sanitizer run of the native extensions (ASan + UBSan).
#
#   scripts/sanitize_native.sh [pytest options]
#
# Builds fedtoken._native and fedtoken._mbrsa (with crypto_mb when setup.py
# finds it, see setup.py) with -fsanitize=address,undefined into a temporary
# directory, never touching the in-tree build, then runs against that build:
#   - tests/unit/test_multibuffer.py (Wycheproof + the 100,000-item
#     differential test of _mbrsa against OpenSSL);
#   - tests/unit/test_native_multibuffer.py (_native's KeyTable with the
#     multi-buffer core through _mbrsa's C API, against the OpenSSL-only table);
#   - tests/unit/test_native_pipeline.py (KeyTable.pipeline and its
#     SignatureCache against the Python path).
# Both extensions are the sanitized ones, in pytest and in the interpreters
# the tests start: a sitecustomize.py in the temporary directory (on
# PYTHONPATH) puts a finder first on sys.meta_path that loads fedtoken._native
# and fedtoken._mbrsa from the temporary build and nothing else; the rest of
# fedtoken is the in-tree source. FEDTOKEN_MBRSA_SO names the same _mbrsa.
# The script checks which files were loaded before it runs the tests.
# UBSan findings abort the run (-fno-sanitize-recover). Leak detection is
# off: CPython itself keeps memory until exit, which LeakSanitizer reports.
# crypto_mb and OpenSSL are not instrumented (prebuilt), only our code is.
# Needs gcc with libasan/libubsan; not part of CI (slow, and it needs them).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${FEDTOKEN_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/fedtoken-sanitize.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1"
echo "==> building the extensions with $SAN into $TMP" >&2
CFLAGS="$SAN" LDFLAGS="-fsanitize=address,undefined" \
    "$PY" setup.py -q build_ext --build-lib "$TMP/lib" --build-temp "$TMP/tmp" --force >&2

LIB="$TMP/lib/fedtoken"
SO="$(ls "$LIB"/_mbrsa*.so)"
NATIVE_SO="$(ls "$LIB"/_native*.so)"
LIBASAN="$(gcc -print-file-name=libasan.so)"
LIBUBSAN="$(gcc -print-file-name=libubsan.so)"
[ -e "$LIBASAN" ] || { echo "error: libasan not found (gcc -print-file-name)" >&2; exit 2; }
[ -e "$LIBUBSAN" ] || { echo "error: libubsan not found (gcc -print-file-name)" >&2; exit 2; }

# The sanitized fedtoken._native and fedtoken._mbrsa for every interpreter
# started with this environment (pytest and the tests' subprocesses).
mkdir -p "$TMP/site"
cat >"$TMP/site/sitecustomize.py" <<'PY'
"""Loads fedtoken._native and fedtoken._mbrsa from FEDTOKEN_SANITIZED_LIB."""

import importlib.machinery
import importlib.util
import os
import sys

_DIR = os.environ["FEDTOKEN_SANITIZED_LIB"]
_NAMES = ("fedtoken._native", "fedtoken._mbrsa")


class _SanitizedExtensions:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in _NAMES:
            return None
        stem = name.rpartition(".")[2]
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            file = os.path.join(_DIR, stem + suffix)
            if os.path.isfile(file):
                return importlib.util.spec_from_file_location(name, file)
        raise ImportError(f"no sanitized build of {name} in {_DIR}", name=name)


sys.meta_path.insert(0, _SanitizedExtensions)
PY

# The sanitizer runtimes must be loaded before the interpreter's own
# libraries; the extensions are loaded from the temporary build only.
export LD_PRELOAD="$LIBASAN $LIBUBSAN"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export PYTHONPATH="$TMP/site${PYTHONPATH:+:$PYTHONPATH}"
export FEDTOKEN_SANITIZED_LIB="$LIB"
export FEDTOKEN_MBRSA_SO="$SO"

echo "==> checking that the sanitized builds are the ones loaded" >&2
"$PY" - "$NATIVE_SO" "$SO" <<'PY' >&2
import os
import sys

import fedtoken._mbrsa as mbrsa
import fedtoken._native as native

for module, want in ((native, sys.argv[1]), (mbrsa, sys.argv[2])):
    got = os.path.realpath(module.__file__)
    if got != os.path.realpath(want):
        sys.exit(f"error: {module.__name__} loaded from {got}, not {want}")
    print(f"    {module.__name__}: {got}")
print(f"    multi-buffer: {mbrsa.MULTIBUFFER}")
PY

echo "==> running the multi-buffer tests against $NATIVE_SO and $SO" >&2
"$PY" -m pytest -q -rs -p no:cacheprovider \
    tests/unit/test_multibuffer.py tests/unit/test_native_multibuffer.py \
    tests/unit/test_native_pipeline.py "$@"
