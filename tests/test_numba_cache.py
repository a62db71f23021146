"""No writable place for Numba's cache (read-only package and home): tinygemma still starts.

For real, in a fresh process: a copy of the package in a folder that cannot be written, HOME
in one too, NUMBA_CACHE_DIR unset. As root (who writes anywhere) the folder is made read-only
by a read-only bind mount in a private mount namespace (``unshare -m``); otherwise by chmod.
"""

from __future__ import annotations

import glob
import os
import shutil
import stat
import subprocess
import sys

import tinygemma

# Compiles one small kernel and checks it by hand: rows of 2s have RMS 2, so the normalised
# row is all ones and the output is the scale itself.
PROBE = """
import numpy as np
from tinygemma import kernels, numba_cache
x = np.full((2, 4), 2, np.float32)
scale = np.array([1, 2, 3, 4], np.float32)
out = np.empty_like(x)
kernels.rms_norm_rows(x, scale, 0.0, out)
assert np.allclose(out, scale), out
print("cache:", numba_cache.CACHE_DIR)
"""


def run_read_only(tmp_path, tmpdir):
    """Run PROBE on a read-only copy of the package with a read-only HOME."""
    ro = tmp_path / "ro"
    shutil.copytree(os.path.dirname(tinygemma.__file__), ro / "site" / "tinygemma",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (ro / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(HOME=str(ro / "home"), PYTHONPATH=str(ro / "site"), TMPDIR=str(tmpdir))
    cmd = [sys.executable, "-c", PROBE]
    if os.geteuid() == 0:
        cmd = ["unshare", "-m", "sh", "-c", f'mount --bind -o ro "{ro}" "{ro}" && exec "$@"',
               "sh", *cmd]
    else:
        for path in (ro / "site" / "tinygemma", ro / "home"):
            path.chmod(0o555)
    try:
        return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
    finally:
        for path in (ro / "site" / "tinygemma", ro / "home"):
            path.chmod(0o755)


def test_read_only_package_and_home_cache_in_the_temp_dir(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    p = run_read_only(tmp_path, tmpdir)
    assert p.returncode == 0, p.stderr[-2000:]
    fallback = tmpdir / f"tinygemma-numba-{os.getuid()}"
    assert p.stdout.strip() == f"cache: {fallback}"
    notices = [line for line in p.stderr.splitlines() if line.startswith("tinygemma:")]
    assert len(notices) == 1 and str(fallback) in notices[0], p.stderr
    assert "NUMBA_CACHE_DIR" in notices[0]
    # the compiled kernel landed there, in a folder only this user can write
    assert glob.glob(str(fallback / "*" / "attention.rms_norm_rows-*.nbi"))
    assert stat.S_IMODE(fallback.stat().st_mode) == 0o700


def test_temp_folder_of_another_user_is_not_used(tmp_path):
    """The cache holds code Numba loads: a fallback folder anyone may write is refused, and
    the kernels compile without a cache."""
    tmpdir = tmp_path / "tmp"
    planted = tmpdir / f"tinygemma-numba-{os.getuid()}"
    planted.mkdir(parents=True)
    planted.chmod(0o777)
    p = run_read_only(tmp_path, tmpdir)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "cache: None"
    assert "compiled at every start" in p.stderr and "NUMBA_CACHE_DIR" in p.stderr
    assert os.listdir(planted) == []


def test_no_usable_temp_dir_means_no_cache(monkeypatch, capsys):
    """tempfile.gettempdir() raises when no temporary directory is usable: no cache, a notice,
    no crash (in-process: every candidate folder is made to look read-only)."""
    import tempfile

    from tinygemma import numba_cache

    def no_temp():
        raise FileNotFoundError("No usable temporary directory found")
    monkeypatch.setattr(numba_cache, "_writable", lambda path: False)
    monkeypatch.setattr(tempfile, "gettempdir", no_temp)
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    assert numba_cache.choose_cache_dir() is None
    assert "compiled at every start" in capsys.readouterr().err
    assert "NUMBA_CACHE_DIR" not in os.environ


# Calls geglu_rows (attention.py), which inlines _exp from _llvm.py: gelu_tanh(1) = 0.8412.
HELPER_PROBE = """
import numpy as np
from tinygemma import kernels
out = np.empty((1, 1), np.float32)
kernels.geglu_rows(np.ones((1, 1), np.float32), np.ones((1, 1), np.float32), out)
print(float(out[0, 0]))
"""


def test_editing_a_helper_in_another_file_recompiles(tmp_path):
    """Numba's cache=True notices only a change in the kernel's own file (numba issue 1833);
    tinygemma stamps the kernels with a hash of all of kernels/. Edit ``_exp`` in _llvm.py to
    return 0 (then gelu_tanh(1) = 1 * sigmoid(...) computed from exp = 0 is 1.0): the cached
    geglu_rows of attention.py must not be reused."""
    site = tmp_path / "site"
    shutil.copytree(os.path.dirname(tinygemma.__file__), site / "tinygemma",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(PYTHONPATH=str(site), NUMBA_CACHE_DIR=str(tmp_path / "cache"))

    def run():
        p = subprocess.run([sys.executable, "-c", HELPER_PROBE], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return float(p.stdout)

    assert abs(run() - 0.8412) < 1e-3  # compiled, and cached
    assert glob.glob(str(tmp_path / "cache" / "*" / "attention.geglu_rows-*.nbi"))
    llvm = site / "tinygemma" / "kernels" / "_llvm.py"
    text = llvm.read_text()
    assert "    if x < f32(-87.33654):" in text
    llvm.write_text(text.replace("    if x < f32(-87.33654):", "    if x < f32(1e30):"))
    assert run() == 1.0


# A new process: imports the kernels (which install the release), reads how much of LLVM's
# library is resident, compiles a function (LLVM runs), checks its result by hand, and reads
# again. Prints: resident kB after the import, then after the compilation; clean mappings.
LLVM_PROBE = """
import numpy as np
from numba import njit
from tinygemma import kernels, numba_cache

def resident_kb():
    ranges = numba_cache._clean_llvm_mappings()
    total, inside = 0, None
    for line in open("/proc/self/smaps"):
        field = line.split()
        if "-" in field[0] and not field[0].endswith(":"):
            lo = int(field[0].split("-")[0], 16)
            inside = any(lo == start for start, _ in ranges)
        elif field[0] == "Rss:" and inside:
            total += int(field[1])
    return total, len(ranges)

before = resident_kb()

@njit
def triangle(n):  # 0 + 1 + ... + n - 1, compiled now: LLVM runs
    s = 0
    for i in range(n):
        s += i
    return s

assert triangle(100) == 4950
after = resident_kb()
assert triangle(10) == 45
print(before[0], after[0], after[1])
"""


def test_llvm_pages_leave_the_rss_after_a_compilation():
    """Importing Numba maps tens of MB of LLVM's library in; once a kernel is compiled (or
    loaded) the clean ones are released, and the compiled code still runs."""
    if not os.path.exists("/proc/self/smaps"):
        import pytest
        pytest.skip("reads Linux's /proc/self/smaps")
    env = dict(os.environ)
    env.pop("TINYGEMMA_RELEASE_LLVM", None)
    out = subprocess.run([sys.executable, "-c", LLVM_PROBE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    before, after, mappings = map(int, out.stdout.split())
    assert mappings >= 1 and before > 10_000  # kB: LLVM's initialisation touched > 10 MB
    assert after < 1_000, (before, after)
    env["TINYGEMMA_RELEASE_LLVM"] = "0"  # kept mapped: the compilation adds to it
    out = subprocess.run([sys.executable, "-c", LLVM_PROBE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[1]) > 10_000
