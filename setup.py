"""Builds gradreg_fast._C (C++17 + OpenMP, always) and gradreg_fast._cuda (when nvcc is found).

Neither links libtorch: kernels take raw pointers, so one binary serves every torch version and
the build environment needs no torch. Set GRADREG_NO_CUDA=1 to skip the CUDA core.
"""

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).parent.resolve()
INCLUDE = str(ROOT / "csrc" / "include")
CUDA_ARCHS = ("80", "90")  # SASS for these, plus PTX of the last one


def rel(paths):
    return sorted(str(p.relative_to(ROOT)) for p in paths)


def find_cuda():
    """(toolkit home, folder of its static runtime, None), or (None, None, why the CUDA core is skipped).

    The CUDA core links cudart statically (one binary for any driver); packaged toolkits often ship it apart."""
    if os.environ.get("GRADREG_NO_CUDA", "0") not in ("", "0"):
        return None, None, "GRADREG_NO_CUDA is set"
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for home in filter(None, candidates):
        home = Path(home)
        if (home / "include" / "cuda_runtime.h").exists() and (home / "bin" / "nvcc").exists():
            lib_dir = next((d for d in (home / "lib64", home / "lib") if (d / "libcudart_static.a").exists()), None)
            if lib_dir is None:
                return None, None, f"{home} has nvcc but no lib64/libcudart_static.a (the static CUDA runtime)"
            return home, lib_dir, None
    return None, None, "nvcc not found"


class BuildExt(build_ext):
    """Compiles csrc/cuda/*.cu with nvcc into objects that the _cuda extension links."""

    def build_extension(self, ext):
        if ext.name.endswith("_cuda"):
            cuda_home = Path(ext.cuda_home)
            build_dir = Path(self.build_temp) / "cuda"
            build_dir.mkdir(parents=True, exist_ok=True)
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
            gencode.append(f"-gencode=arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}")
            commands = []
            for source in ext.cuda_sources:
                obj = build_dir / (Path(source).stem + ".o")
                commands.append([
                    str(cuda_home / "bin" / "nvcc"), "-c", source, "-o", str(obj), "-O3", "-std=c++17",
                    "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", f"-I{INCLUDE}", "-Icsrc/cuda",
                    f"-DGRADREG_PTX_ARCH={CUDA_ARCHS[-1]}", *gencode,
                ])
                ext.extra_objects.append(str(obj))
            # One nvcc per source at a time, several sources at once: each nvcc runs mostly on one core.
            with ThreadPoolExecutor(max_workers=build_jobs()) as pool:
                for _ in pool.map(run_nvcc, commands):
                    pass
        super().build_extension(ext)


def build_jobs() -> int:
    """Compilers run at once: GRADREG_BUILD_JOBS, else one per core (the C++ sources through pybind11's
    ParallelCompile, the CUDA sources here)."""
    return max(1, int(os.environ.get("GRADREG_BUILD_JOBS") or os.cpu_count() or 1))


def run_nvcc(cmd):
    print(" ".join(cmd), flush=True)
    subprocess.check_call(cmd, cwd=ROOT)


ParallelCompile("GRADREG_BUILD_JOBS", default=0).install()


extensions = [
    Pybind11Extension(
        "gradreg_fast._C",
        rel((ROOT / "csrc" / "cpu").glob("*.cpp")),
        include_dirs=[INCLUDE],
        cxx_std=17,
        extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
        extra_link_args=["-fopenmp"],
    )
]

cuda_home, lib_dir, no_cuda = find_cuda()
if cuda_home is not None:
    cuda_ext = Pybind11Extension(
        "gradreg_fast._cuda",
        rel((ROOT / "csrc" / "cuda").glob("*.cpp")),
        include_dirs=[INCLUDE, str(cuda_home / "include")],
        cxx_std=17,
        extra_compile_args=["-O3"],
        extra_link_args=[f"-L{lib_dir}", "-lcudart_static", "-lrt", "-lpthread", "-ldl"],
    )
    cuda_ext.cuda_home = str(cuda_home)
    cuda_ext.cuda_sources = rel((ROOT / "csrc" / "cuda").glob("*.cu"))
    extensions.append(cuda_ext)
    print(f"gradreg_fast: building the CUDA core with {cuda_home}", file=sys.stderr)
else:
    print(f"gradreg_fast: {no_cuda}: building the CPU core only", file=sys.stderr)

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
