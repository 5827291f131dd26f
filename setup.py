"""Builds the C++ CPU kernels of cai_kernels.

The same sources in ``csrc/cpu`` are compiled once per SIMD capability into separate extension
modules (``cai_kernels._C_avx512``, ``cai_kernels._C_avx2`` on x86-64, ``cai_kernels._C_default``
elsewhere). At import, ``cai_kernels._extension`` loads the widest one the running CPU supports, so
one wheel works on AVX2-only machines too.

Why several modules: ATen's ``at::vec::Vectorized`` compiles to its scalar fallback unless the
capability macros (``CPU_CAPABILITY=AVX512`` + ``CPU_CAPABILITY_AVX512``) and the matching ``-m``
flags are set for the translation unit; flags are per extension in setuptools, hence one per width.

Environment:
  CAI_KERNELS_BUILD=0          skip the extension (the library then runs on its reference ops)
  CAI_KERNELS_CAPABILITIES     comma list to build, e.g. "avx2" (default: all for this arch)
"""

import glob
import os
import platform
import sys

from setuptools import setup

CAPABILITY_FLAGS = {
    # Mirrors the flags ATen builds its own AVX512 / AVX2 kernels with.
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
}


def _capabilities_to_build():
    requested = os.environ.get("CAI_KERNELS_CAPABILITIES")
    if requested:
        return [c.strip() for c in requested.split(",") if c.strip()]
    if platform.machine().lower() in ("x86_64", "amd64"):
        return ["avx512", "avx2"]
    return ["default"]


def _extensions():
    if os.environ.get("CAI_KERNELS_BUILD", "1") == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("cai-kernels: torch is not importable at build time; building without the C++ "
              "extension (install torch first, then `pip install --no-build-isolation .`)",
              file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """A failed compile leaves that capability out instead of failing the install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001 - any compiler failure
                print(f"cai-kernels: WARNING: building {ext.name} failed ({error}); "
                      "the library will fall back to another capability or the reference ops",
                      file=sys.stderr)

    sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    common = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-unused-function", "-Wno-unknown-pragmas"]
    extensions = [
        CppExtension(
            name=f"cai_kernels._C_{capability}",
            sources=sources,
            include_dirs=[os.path.abspath("csrc/cpu")],
            extra_compile_args={"cxx": common + CAPABILITY_FLAGS[capability]
                                + [f"-DCAI_CAPABILITY_NAME={capability}"]},
            extra_link_args=["-fopenmp"],
        )
        for capability in _capabilities_to_build()
    ]
    return extensions, {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
