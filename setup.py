"""Build of datago's Cython core against the system libjpeg-turbo and libspng.

The libraries are found with pkg-config.  When pkg-config or a library is
missing, the build stops with one message naming the Debian package to install
instead of a compiler traceback.
"""

import os
import platform
import shutil
import subprocess
import sys

from setuptools import Extension, setup

# pkg-config name -> (what it is, Debian package that provides the development files)
LIBRARIES = {
    "libturbojpeg": ("libjpeg-turbo's TurboJPEG API", "libturbojpeg0-dev"),
    "spng": ("libspng", "libspng-dev"),
    "libdeflate": ("libdeflate", "libdeflate-dev"),
}


def _fail(message: str) -> None:
    bar = "=" * 72
    sys.stderr.write(f"\n{bar}\ndatago build error: {message}\n{bar}\n\n")
    raise SystemExit(f"datago build error: {message}")


def _modversion(name: str) -> str:
    return subprocess.run(["pkg-config", "--modversion", name], check=True,
                          capture_output=True, text=True).stdout.strip()


def _pkg_config(name: str) -> dict:
    what, debian = LIBRARIES[name]
    if shutil.which("pkg-config") is None:
        _fail("pkg-config was not found; it is needed to locate libjpeg-turbo and libspng. "
              "Install it with: apt-get install -y pkg-config")
    try:
        out = subprocess.run(["pkg-config", "--cflags", "--libs", name], check=True,
                             capture_output=True, text=True).stdout.split()
    except subprocess.CalledProcessError:
        _fail(f"{what} was not found by pkg-config (module '{name}'). "
              f"Install it with: apt-get install -y {debian}")
    flags = {"include_dirs": [], "library_dirs": [], "libraries": [], "extra_compile_args": []}
    for tok in out:
        if tok.startswith("-I"):
            flags["include_dirs"].append(tok[2:])
        elif tok.startswith("-L"):
            flags["library_dirs"].append(tok[2:])
        elif tok.startswith("-l"):
            flags["libraries"].append(tok[2:])
        else:
            flags["extra_compile_args"].append(tok)
    return flags


def _merge(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        for key, values in part.items():
            out.setdefault(key, [])
            out[key].extend(v for v in values if v not in out[key])
    return out


def _extensions():
    try:
        from Cython.Build import cythonize
    except ImportError:
        _fail("Cython is needed to build datago from source: pip install 'cython>=3.0'")
    opt = os.environ.get("DATAGO_CFLAGS", "-O3").split()
    # no FMA contraction: the float kernels give the same bits in every ISA build
    base = {"extra_compile_args": opt + ["-ffp-contract=off", "-Wno-unreachable-code"]}
    jpeg = _pkg_config("libturbojpeg")
    jpeg_version = {"define_macros": [("DATAGO_TURBOJPEG_VERSION",
                                       '"%s"' % _modversion("libturbojpeg"))]}
    png = _merge(_pkg_config("spng"), _pkg_config("libdeflate"))
    mods = {
        "datago._core._resample": _merge(base),
        "datago._core._jpeg": _merge(base, jpeg, jpeg_version),
        "datago._core._png": _merge(base, png),
        "datago._core._pipeline": _merge(base, jpeg, png),
        "datago._core._crc32c": _merge(base),
        "datago._core._protobuf": _merge(base),
        "datago._core._deflate": _merge(base, _pkg_config("libdeflate")),
    }
    if platform.machine().lower() in ("x86_64", "amd64") and os.environ.get("DATAGO_NO_AVX2") != "1":
        # the same kernels compiled for AVX2+FMA; chosen at import when the CPU has them
        mods["datago._core._resample_avx2"] = _merge(
            base, {"extra_compile_args": ["-mavx2", "-mfma"]})
    exts = [Extension(name, [os.path.join("src", *name.split(".")) + ".pyx"], **flags)
            for name, flags in mods.items()]
    return cythonize(exts, compiler_directives={"language_level": "3"},
                     include_path=["src"])


setup(ext_modules=_extensions())
