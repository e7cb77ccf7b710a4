"""The compiled cores were built and link: the CPU core always, the CUDA core wherever nvcc is found."""

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

CPU_CORE_FUNCTIONS = ("gradient_magnitude_forward", "gradient_magnitude_backward", "warp_forward", "warp_backward",
                      "descriptor_forward", "descriptor_backward", "penalty_derivative", "cpu_isa", "set_cpu_isa")


def test_cpu_core_imports():
    core = importlib.import_module("gradreg_fast._C")
    missing = [name for name in CPU_CORE_FUNCTIONS if not hasattr(core, name)]
    assert not missing, f"gradreg_fast._C lacks {missing}"


def test_cpu_core_rejects_unknown_dtype_names():
    core = importlib.import_module("gradreg_fast._C")
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float64'"):
        core.gradient_magnitude_forward("float16", 0, 0, 0, 1, 1, 1, 0.0, 1)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH, so no CUDA core was built")
@pytest.mark.skipif(os.environ.get("GRADREG_NO_CUDA", "0") not in ("", "0"),
                    reason="GRADREG_NO_CUDA is set, so setup.py built no CUDA core")
def test_cuda_core_imports_where_nvcc_exists():
    # Importing resolves every symbol of the extension, cudart included: a core that compiled but does
    # not link fails here, with or without a GPU.
    core = importlib.import_module("gradreg_fast._cuda")
    assert hasattr(core, "gradient_magnitude_forward")
    assert hasattr(core, "device_check")


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist `python -m build --sdist` makes of this checkout (build isolation, as pip and CI use)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout: the sdist is compared with the tracked files")
    out = tmp_path_factory.mktemp("sdist")
    run = subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(ROOT)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (archive,) = out.glob("gradreg_fast-*.tar.gz")
    return archive


def test_sdist_ships_every_source_the_build_needs(sdist):
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    tracked = subprocess.run(["git", "ls-files", "csrc"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert tracked, "git lists no file under csrc/"
    missing = sorted(set(tracked) - names)
    assert not missing, f"the sdist lacks {missing}"
    for needed in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "gradreg_fast/data/abdomen/ct.nii.gz",
                   "gradreg_fast/data/abdomen/mr_labels.nii.gz"):
        assert needed in names, f"the sdist lacks {needed}"
    strays = sorted(n for n in names if n.startswith(("tests/", "build/", "benchmarks/")) or n.endswith(".so")
                    or "__pycache__" in n)
    assert not strays, f"the sdist ships {strays[:10]}"


@pytest.mark.slow
def test_wheel_built_from_the_sdist_alone_imports(sdist, tmp_path):
    # The CPU core only (GRADREG_NO_CUDA): the check is that the sdist compiles without the checkout beside it.
    env = dict(os.environ, GRADREG_NO_CUDA="1")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "wheel"),
                          str(sdist)], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("gradreg_fast-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "unpacked")
    assert any(n.startswith("gradreg_fast/_C.") for n in names), names
    assert any(n.endswith("licenses/LICENSE") for n in names), names
    assert "gradreg_fast/data/abdomen/mr.nii.gz" in names
    # Imported from the unpacked wheel, not from this checkout: the core it built runs an op.
    probe = ("import gradreg_fast, torch; from pathlib import Path; "
             "assert Path(gradreg_fast.__file__).parent == Path('unpacked/gradreg_fast').resolve(), gradreg_fast.__file__; "
             "x = torch.rand(1, 1, 5, 4, 3, dtype=torch.float64); "
             "torch.testing.assert_close(gradreg_fast.gradient_magnitude(x, backend='cpu'), "
             "gradreg_fast.gradient_magnitude(x, backend='reference')); print(gradreg_fast._C.cpu_isa())")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path / "unpacked")))
    assert run.returncode == 0, run.stderr[-3000:]
