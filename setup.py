"""Builds specee._C: C++ CPU ops always, CUDA ops when torch has CUDA and nvcc exists.

Build with `pip install --no-build-isolation -e .` so the extension links the torch you run.
SPECEE_DEBUG=1 builds with -g -lineinfo; SPECEE_NO_EXT=1 skips the extension (reference ops only);
SPECEE_CUDA_ARCHS="90a" (";"-separated) picks the CUDA architectures (default 80;89;90a). A CUDA torch and nvcc are
enough to build the CUDA ops; no GPU needs to be visible.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"specee setup: {msg}", file=sys.stderr)


def _extensions():
    if os.environ.get("SPECEE_NO_EXT") == "1":
        _say("SPECEE_NO_EXT=1: building without specee._C; ops use the torch reference.")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit("specee setup: torch is not installed. Install it first (e.g. `pip install torch==2.13.0`), "
                 "then build with `pip install --no-build-isolation -e .`.")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        _say(f"no C++ compiler ({cxx!r}) found, so specee._C is not built and ops use the torch reference. "
             "Install gcc/g++ (e.g. `apt install g++`) and reinstall to get the compiled ops.")
        return [], {}

    debug = os.environ.get("SPECEE_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    cxx_flags = opt + ["-std=c++17"]
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")  # at::parallel_for is inlined from headers: without it loops run serially
    sources = ["csrc/ops.cpp"]
    kwargs = dict(name="specee._C", sources=sources, extra_compile_args={"cxx": cxx_flags},
                  include_dirs=[os.path.join(ROOT, "csrc")], py_limited_api=False)
    if sys.platform.startswith("linux"):
        kwargs["extra_link_args"] = ["-fopenmp"]

    home = cpp_extension.CUDA_HOME
    if (torch.version.cuda is not None and home is not None
            and not any(os.path.exists(os.path.join(home, d, "libcudart.so")) for d in ("lib64", "lib"))):
        # torch takes CUDA_HOME = dirname(dirname(which nvcc)): a wrapper script such as /usr/local/bin/nvcc gives
        # /usr/local, where `-lcudart` then fails to link. Use the toolkit root if there is one, else CPU ops only.
        if os.path.exists("/usr/local/cuda/bin/nvcc") and not os.environ.get("CUDA_HOME"):
            _say(f"CUDA_HOME={home!r} has no libcudart.so; using /usr/local/cuda (set CUDA_HOME to override).")
            cpp_extension.CUDA_HOME = "/usr/local/cuda"
        else:
            _say(f"CUDA_HOME={home!r} has no lib64/libcudart.so (set CUDA_HOME to the CUDA toolkit root); "
                 "building the C++ CPU ops only.")
            cpp_extension.CUDA_HOME = None
    want_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is None:
        _say("torch has CUDA but nvcc was not found (set CUDA_HOME); building the C++ CPU ops only.")
    if want_cuda:
        cu = sorted(glob.glob("csrc/cuda/ops_cuda.cu"))
        if cu:
            # NOTE: no -use_fast_math: it flushes subnormal probabilities in the sampling kernels.
            nvcc = opt + ["-std=c++17", "-lineinfo"] if debug else opt + ["-std=c++17"]
            archs = os.environ.get("SPECEE_CUDA_ARCHS", "80;89;90a").split(";")
            for a in archs:
                nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}"]
            kwargs["sources"] = sources + cu
            kwargs["extra_compile_args"]["nvcc"] = nvcc
            kwargs["define_macros"] = [("SPECEE_WITH_CUDA", "1")]
            return [cpp_extension.CUDAExtension(**kwargs)], {"build_ext": cpp_extension.BuildExtension}
    return [cpp_extension.CppExtension(**kwargs)], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
