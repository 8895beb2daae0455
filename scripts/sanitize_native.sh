#!/usr/bin/env bash
# Sanitizer run of the native extensions (ASan + UBSan).
#
#   scripts/sanitize_native.sh [pytest options]
#
# Builds fedtoken._native and fedtoken._mbrsa (with crypto_mb when setup.py
# finds it, see setup.py) with -fsanitize=address,undefined into a temporary
# directory, never touching the in-tree build, then runs against that build:
#   - tests/unit/test_multibuffer.py (Wycheproof + the 100,000-item
#     differential test), loading the sanitized _mbrsa through
#     FEDTOKEN_MBRSA_SO;
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

SO="$(ls "$TMP"/lib/fedtoken/_mbrsa*.so)"
LIBASAN="$(gcc -print-file-name=libasan.so)"
LIBUBSAN="$(gcc -print-file-name=libubsan.so)"
[ -e "$LIBASAN" ] || { echo "error: libasan not found (gcc -print-file-name)" >&2; exit 2; }

echo "==> running the multi-buffer tests against $SO" >&2
# The sanitizer runtimes must be loaded before the interpreter's own
# libraries; the extension is loaded from the temporary build only.
LD_PRELOAD="$LIBASAN $LIBUBSAN" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
FEDTOKEN_MBRSA_SO="$SO" \
    "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_multibuffer.py "$@"
