"""Build of the optional native fast paths (fedtoken._native, fedtoken._mbrsa).

Project metadata lives in pyproject.toml; this file only adds the C
extensions. Both are optional: without a compiler or the OpenSSL headers the
build skips them and fedtoken verifies in Python (same verdicts, slower).

fedtoken._mbrsa (multi-buffer RSA verification) links Intel's crypto_mb
statically when its headers and libcrypto_mb.a are found in the build
environment: the PyPI packages ipp-crypto-include and ipp-crypto-static,
either in the venv itself (sys.prefix) or in pip's isolated build
environment (they are build requirements in pyproject.toml), or under
$FEDTOKEN_CRYPTO_MB_PREFIX. Without them, or if compiling/linking with them
fails, the module is built without crypto_mb and answers "not handled" to
every item, so the callers use OpenSSL. FEDTOKEN_CRYPTO_MB=0 forces that.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

MB_SOURCE = "server/fedtoken/_native/mbverify.c"
MB_HEADER = "server/fedtoken/_native/mbapi.h"  # the C API _native uses


def _prefixes() -> list[Path]:
    """Where the ipp-crypto wheels may have put their data files."""
    out: list[Path] = []
    env = os.environ.get("FEDTOKEN_CRYPTO_MB_PREFIX")
    if env:
        out.append(Path(env))
    out.append(Path(sys.prefix))
    # pip's isolated build env installs build requirements with --prefix
    # into an overlay whose site-packages is on sys.path: .../lib/pythonX.Y/
    # site-packages -> the prefix three levels up.
    for entry in sys.path:
        p = Path(entry)
        if p.name == "site-packages" and len(p.parents) >= 3:
            out.append(p.parents[2])
    try:  # wherever pip recorded the files (covers --prefix, --user, ...)
        from importlib.metadata import PackageNotFoundError, distribution

        for name in ("ipp-crypto-static", "ipp-crypto-include"):
            try:
                dist = distribution(name)
            except PackageNotFoundError:
                continue
            for f in dist.files or ():
                s = str(f).replace("\\", "/")
                for marker in ("lib/libcrypto_mb.a", "include/aggregator/crypto_mb/rsa.h"):
                    if s.endswith(marker):
                        located = Path(str(dist.locate_file(f))).resolve()
                        out.append(Path(str(located)[: -len(marker)]))
    except Exception as exc:  # noqa: BLE001 - detection must never break the build
        print(f"fedtoken: crypto_mb lookup through package metadata failed: {exc}")
    seen: list[Path] = []
    for p in out:
        if p not in seen:
            seen.append(p)
    return seen


def find_crypto_mb() -> tuple[Path, Path] | None:
    """(include dir holding crypto_mb/rsa.h, path of libcrypto_mb.a), or None."""
    if os.environ.get("FEDTOKEN_CRYPTO_MB") == "0":
        return None
    if sys.platform != "linux":
        return None
    include = lib = None
    for prefix in _prefixes():
        inc = prefix / "include" / "aggregator"
        if include is None and (inc / "crypto_mb" / "rsa.h").is_file():
            include = inc
        for libdir in ("lib", "lib64"):
            a = prefix / libdir / "libcrypto_mb.a"
            if lib is None and a.is_file():
                lib = a
    if include is None or lib is None:
        return None
    return include, lib


class BuildExt(build_ext):
    """Builds fedtoken._mbrsa with crypto_mb, and again without it if that fails."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name != "fedtoken._mbrsa" or not getattr(ext, "crypto_mb", False):
            super().build_extension(ext)
            return
        try:
            super().build_extension(ext)
            print("fedtoken: fedtoken._mbrsa built with crypto_mb")
        except Exception as exc:  # noqa: BLE001 - any failure: build the plain variant
            print(f"fedtoken: building fedtoken._mbrsa with crypto_mb failed ({exc}); "
                  "building it without (multi-buffer path unavailable)")
            ext.define_macros = [m for m in ext.define_macros if m[0] != "FEDTOKEN_CRYPTO_MB"]
            ext.include_dirs = []
            ext.extra_objects = []
            ext.extra_link_args = []
            ext.libraries = []
            self.force = True  # recompile: the object was built with the macro
            ext.crypto_mb = False  # type: ignore[attr-defined]
            super().build_extension(ext)


def mbrsa_extension() -> Extension:
    found = find_crypto_mb()
    if found is None:
        print("fedtoken: crypto_mb not found; fedtoken._mbrsa built without it")
        ext = Extension("fedtoken._mbrsa", sources=[MB_SOURCE], optional=True)
        ext.crypto_mb = False  # type: ignore[attr-defined]
        return ext
    include, lib = found
    print(f"fedtoken: crypto_mb found: {include}, {lib}")
    ext = Extension(
        "fedtoken._mbrsa",
        sources=[MB_SOURCE],
        depends=[MB_HEADER],
        include_dirs=[str(include)],
        define_macros=[("FEDTOKEN_CRYPTO_MB", "1")],
        # Static archive first, then the libcrypto its OpenSSL glue needs.
        # -Wl,--exclude-libs keeps crypto_mb's symbols out of our dynamic
        # symbol table (no clash with another copy in the process).
        extra_objects=[str(lib)],
        extra_link_args=["-Wl,--exclude-libs,libcrypto_mb.a"],
        libraries=["crypto"],
        optional=True,
    )
    ext.crypto_mb = True  # type: ignore[attr-defined]
    return ext


setup(
    ext_modules=[
        Extension(
            "fedtoken._native",
            sources=["server/fedtoken/_native/fastverify.c"],
            depends=[MB_HEADER, "server/fedtoken/_native/pipeline.h",
                     "server/fedtoken/_native/sigcache.h"],
            libraries=["crypto"],
            optional=True,
        ),
        mbrsa_extension(),
    ],
    cmdclass={"build_ext": BuildExt},
)
