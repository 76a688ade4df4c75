"""Builds the optional compiled extension ``faststeal._C`` from ``csrc/``.

The C++ CPU kernels are always compiled; the CUDA kernels too when a CUDA toolkit is found
(``FASTSTEAL_NO_CUDA=1`` skips them, ``TORCH_CUDA_ARCH_LIST`` picks the GPUs, default 9.0).
``FASTSTEAL_NO_EXT=1`` skips the extension entirely. A failed build prints a warning and leaves a
working pure-PyTorch install (the ops then use their reference implementations).
"""

import glob
import os
import sys

from setuptools import setup

if os.path.isdir("/usr/local/cuda") and "CUDA_HOME" not in os.environ:
    # torch's guess of CUDA_HOME is wrong on some machines; the toolkit lives here.
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

ext_modules = []
cmdclass = {}
if os.environ.get("FASTSTEAL_NO_EXT") != "1":
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

        sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        with_cuda = (CUDA_HOME is not None and bool(cuda_sources)
                     and os.environ.get("FASTSTEAL_NO_CUDA") != "1")
        # -fno-math-errno: std::sqrt etc. inline (and vectorize); nothing here reads errno.
        cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno"]
        if with_cuda:
            ext = CUDAExtension(
                "faststeal._C", sources + cuda_sources,
                define_macros=[("WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--use_fast_math",
                                                         "-lineinfo"]},
                extra_link_args=["-fopenmp"])
        else:
            ext = CppExtension("faststeal._C", sources, extra_compile_args={"cxx": cxx},
                               extra_link_args=["-fopenmp"])
        ext_modules = [ext]

        class SafeBuildExtension(BuildExtension):
            """Never fail the install because the extension did not build."""

            def run(self):
                try:
                    super().run()
                except Exception as exc:  # compiler missing, CUDA mismatch, ...
                    print(f"WARNING: building faststeal._C failed ({exc}); faststeal will use "
                          "its pure-PyTorch reference ops. See `faststeal info`.", file=sys.stderr)

        cmdclass = {"build_ext": SafeBuildExtension.with_options(use_ninja=True)}
    except ImportError as exc:
        print(f"WARNING: torch is not importable at build time ({exc}); skipping faststeal._C. "
              "Install torch first and build with --no-build-isolation.", file=sys.stderr)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
