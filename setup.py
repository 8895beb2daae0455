"""Build of the optional native fast path (fedtoken._native).

Project metadata lives in pyproject.toml; this file only adds the C
extension. It is optional: without a compiler or the OpenSSL headers the
build skips it and fedtoken verifies in Python (same verdicts, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fedtoken._native",
            sources=["server/fedtoken/_native/fastverify.c"],
            libraries=["crypto"],
            optional=True,
        )
    ]
)
