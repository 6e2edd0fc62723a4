"""Packaging: the sdist builds a wheel, and that one wheel works in a fresh environment on every kernel path this
CPU has (its kernels pick the ISA at run time: forcing ``ELUTQ_KERNEL=avx2`` runs what an AVX2-only machine
would, on any x86-64).  Slow: compiling the extension from the sdist takes minutes on 2 cores."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

from elutq import kernels

ROOT = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent(
    """
    import sys, torch, elutq
    from elutq.hlq import QuantConfig, quantize_weight
    from elutq.kernels import LUTLinear, active_path
    assert elutq.__file__.startswith(sys.prefix), elutq.__file__  # the wheel's copy, not the source tree
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))
    lin = LUTLinear(quantize_weight(w, QuantConfig(bits=3, group_size=64)))
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    ref = lin.reference(x.double())
    err = float((lin(x).double() - ref).norm() / ref.norm())
    assert err < 3e-2, err
    print(active_path(), elutq.__version__, f"{err:.2e}")
    """
)


@pytest.mark.slow
def test_sdist_builds_a_wheel_that_runs_every_kernel_path(tmp_path):
    dist = tmp_path / "dist"
    # --no-isolation: the build tools are those `.[dev]` installs (scikit-build-core, nanobind), no download.
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                       capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sdists, wheels = list(dist.glob("elutq-*.tar.gz")), list(dist.glob("elutq-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, list(dist.iterdir())
    names = subprocess.run(["tar", "tzf", str(sdists[0])], capture_output=True, text=True, check=True).stdout
    for part in ("pyproject.toml", "CMakeLists.txt", "src/elutq/csrc/lut_avx512.cpp", "src/elutq/static/chat.html",
                 "src/elutq/data/"):
        assert part in names, part
    # A fresh environment holding only the wheel; its dependencies come from this one's site-packages by a path
    # entry (not a site dir, so this environment's editable elutq stays out).
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    ask = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.run([str(env / "bin" / "python"), "-c", ask], capture_output=True, text=True,
                               check=True).stdout.strip())  # fmt: skip
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheels[0])],
                   check=True, timeout=600)  # fmt: skip
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    assert (site / "elutq" / "static" / "chat.html").is_file() and list((site / "elutq").glob("_native*.so"))
    for path in kernels.available_paths():
        r = subprocess.run([str(env / "bin" / "python"), "-c", CHECK], capture_output=True, text=True, timeout=600,
                           env={"ELUTQ_KERNEL": path, "PATH": "/usr/bin:/bin"})  # fmt: skip
        assert r.returncode == 0, (path, r.stderr[-3000:])
        assert r.stdout.split()[0] == path, r.stdout
