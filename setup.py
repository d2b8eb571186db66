"""Build the compiled data path, shmchan._cext, from shmchan/_native/.

Everything else about the package is in pyproject.toml. The C sources are compiled with
warnings as errors; set SHMCHAN_NO_WERROR=1 to build with a compiler that warns about
something new. SHMCHAN_SANITIZE=address,undefined builds with those sanitizers (CI runs
the C-facing tests so; the process must then preload the ASan runtime).
"""

from __future__ import annotations

import os

from setuptools import Extension, setup

cflags = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]
if not os.environ.get("SHMCHAN_NO_WERROR"):
    cflags.append("-Werror")
ldflags: list[str] = []
sanitize = os.environ.get("SHMCHAN_SANITIZE", "")
if sanitize:
    cflags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all", "-g", "-O1"]
    ldflags += [f"-fsanitize={sanitize}"]

setup(
    ext_modules=[
        Extension(
            "shmchan._cext",
            sources=["shmchan/_native/shmchan.c", "shmchan/_native/cext.c"],
            depends=["shmchan/_native/shmchan.h"],
            include_dirs=["shmchan/_native"],
            extra_compile_args=cflags,
            extra_link_args=ldflags,
        )
    ],
)
