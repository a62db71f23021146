"""Where Numba caches the compiled kernels: decided before ``kernels/`` decorates them.

Numba compiles the kernels on first use (20-60 s) and caches the machine code, so later starts
load it in about a second. It picks the cache folder when a kernel is decorated, trying in
order ``NUMBA_CACHE_DIR``, the package's ``__pycache__`` and the user's cache (``~/.cache/numba``);
with none of them writable (a read-only site-packages and home: a container, a service
account) the import fails with "cannot cache function ...: no locator available". So the same
places are tried here first; if none is writable, the cache goes to a folder of this user's
under the temporary directory (``tempfile.gettempdir()``), and if that fails too the kernels
are compiled at every start. Either fallback says so in one line on stderr.

Numba decides whether a cached kernel is stale by a hash of the kernel's own file only, but
the kernels inline helpers from the other files of ``kernels/`` (numba issue 1833): an edited
helper would leave stale machine code in use. So every kernel of ``kernels/`` is stamped with
one hash of all those files (``stamp_kernels_cache``): editing any of them recompiles them all.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import tempfile

from numba import config
from numba.misc.appdirs import AppDirs

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
KERNELS_DIR = os.path.join(PACKAGE_DIR, "kernels")


def _writable(path: str) -> bool:
    """Numba's own test (``_CacheLocator.ensure_cache_path``): make the folder, write a file."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def _own_folder(path: str) -> bool:
    """``path`` is a folder only this user can write (created so if missing).

    The cache holds pickles that Numba loads, i.e. code: a folder in a shared temporary
    directory that someone else made (or a symlink they planted) must not be used.
    """
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o022:
        return False
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return False
    return _writable(path)


def choose_cache_dir() -> str | None:
    """The folder Numba will cache in (``None``: no cache), setting ``NUMBA_CACHE_DIR`` when
    Numba's own choices are all read-only."""
    user_cache = AppDirs(appname="numba", appauthor=False).user_cache_dir
    for path in (config.CACHE_DIR, os.path.join(PACKAGE_DIR, "__pycache__"), user_cache):
        if path and _writable(path):
            return path
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    try:
        fallback = os.path.join(tempfile.gettempdir(), f"tinygemma-numba-{uid}")
    except OSError:  # FileNotFoundError: no usable temporary directory at all
        fallback = None
    if fallback and _own_folder(fallback):
        # Both: Numba re-reads NUMBA_* variables before each compilation.
        os.environ["NUMBA_CACHE_DIR"] = config.CACHE_DIR = fallback
        print(f"tinygemma: no writable Numba cache beside the package or in {user_cache}; "
              f"caching the compiled kernels in {fallback} (NUMBA_CACHE_DIR chooses)",
              file=sys.stderr)
        return fallback
    print("tinygemma: no writable folder for Numba's cache (set NUMBA_CACHE_DIR to one); "
          "the kernels are compiled at every start", file=sys.stderr)
    return None


CACHE_DIR = choose_cache_dir()


def kernels_source_hash() -> bytes:
    """SHA-256 of the names and contents of every ``.py`` file of ``kernels/``."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(KERNELS_DIR)):
        if name.endswith(".py"):
            with open(os.path.join(KERNELS_DIR, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.digest()


def stamp_kernels_cache() -> None:
    """Make Numba stamp the cache of every kernel in ``kernels/`` with ``kernels_source_hash``.

    Numba picks a cache locator per function from ``CacheImpl._locator_classes`` when the
    function is decorated; each of them gets a variant, tried first, that takes only the files
    of ``kernels/`` and whose source stamp is the hash of them all (so the folders stay
    Numba's own choice, NUMBA_CACHE_DIR and the fallback above included). Other code's
    ``cache=True`` is left alone. Must run before ``kernels/`` is imported.
    """
    from numba.core import caching
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    if impl is None or getattr(impl, "_tinygemma_stamped", False):
        return  # None: Numba's internals moved, its own stamps (the trap above) stay
    stamp = kernels_source_hash()

    def stamped(locator):
        class KernelsLocator(locator):
            @classmethod
            def from_function(cls, py_func, py_file):
                if os.path.dirname(os.path.abspath(py_file)) != KERNELS_DIR:
                    return None
                return super().from_function(py_func, py_file)

            def get_source_stamp(self):
                return stamp
        KernelsLocator.__name__ = KernelsLocator.__qualname__ = "Kernels" + locator.__name__
        return KernelsLocator

    originals = list(impl._locator_classes)
    impl._locator_classes = [stamped(c) for c in originals] + originals
    impl._tinygemma_stamped = True


stamp_kernels_cache()


def is_cold(*modules) -> bool:
    """Whether using the cached kernels of ``modules`` will compile them first (20-60 s).

    True when no kernel has anything in the cache for its current source (Numba's index files
    are missing, or stamped with an older source): the first run, or the first after an
    upgrade; without a cache, always. Kernels for a weight type no model has used yet compile
    when first needed, a few seconds, without notice.
    """
    from numba.core.dispatcher import Dispatcher
    if CACHE_DIR is None:
        return True
    caches = [v._cache for m in modules for v in vars(m).values()
              if isinstance(v, Dispatcher) and hasattr(v._cache, "_cache_file")]  # cache=True
    if not caches:
        return False  # no cached kernels found: nothing to say
    try:  # Numba's own test of its index (IndexDataCacheFile._load_index): {} if stale or absent
        return not any(c._cache_file._load_index() for c in caches)
    except Exception:  # Numba's internals changed: say nothing rather than guess
        return False


# ---- LLVM's pages, once the kernels are loaded -----------------------------------------------
LLVM_LIBRARY = "libllvmlite"  # llvmlite's one shared library: all of LLVM, ~180 MB of it
_MADV_DONTNEED = 4  # Linux
_llvm_ranges: list[tuple[int, int]] | None = None  # its clean mappings, found once


def _clean_llvm_mappings() -> list[tuple[int, int]]:
    """(start, length) of each mapping of LLVM's library that holds no private page: its
    machine code and read-only data. Mappings the dynamic linker wrote (relocated pointers,
    now read-only) and its writable data hold private pages and are left out."""
    ranges, current = [], None
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                field = line.split(maxsplit=2)
                if "-" in field[0] and not field[0].endswith(":"):  # a mapping's first line
                    current = None
                    if LLVM_LIBRARY in line and len(field) > 1 and not field[1].startswith("rw"):
                        lo, hi = (int(x, 16) for x in field[0].split("-"))
                        current = [lo, hi - lo, True]
                        ranges.append(current)
                elif current is not None and field[0] in ("Private_Dirty:", "Anonymous:"):
                    current[2] = current[2] and int(field[1]) == 0
    except OSError:
        return []
    return [(lo, n) for lo, n, clean in ranges if clean]


def release_llvm_pages() -> int:
    """Unmap LLVM's pages from this process's RSS; the bytes of the mappings it advised.

    Numba goes through LLVM to load each cached kernel (its bitcode reader and linker) and
    to compile; importing Numba runs LLVM's initialisation. That leaves ~70 MB of
    libllvmlite.so mapped in, about the size of the demo's embedding panels' third, while a
    forward pass never runs a line of LLVM (Numba calls the kernels' machine code). Only
    mappings without a private page are advised (``MADV_DONTNEED``): code and read-only data
    as in the file, which the kernel maps again from the page cache when LLVM next runs (a
    kernel for new argument types). Linux only; elsewhere, and without ctypes, nothing."""
    global _llvm_ranges
    if not sys.platform.startswith("linux"):
        return 0
    if _llvm_ranges is None:
        _llvm_ranges = _clean_llvm_mappings()
    try:
        import ctypes
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return 0
    return sum(n for lo, n in _llvm_ranges if madvise(lo, n, _MADV_DONTNEED) == 0)


def release_llvm_after_loading() -> None:
    """From now on, release LLVM's pages (``release_llvm_pages``) whenever Numba has finished
    loading or compiling a kernel: when this thread lets go of Numba's compiler lock, which
    every load and compilation holds. Once per process; ``TINYGEMMA_RELEASE_LLVM=0`` keeps
    them mapped."""
    global _releasing
    if _releasing or os.environ.get("TINYGEMMA_RELEASE_LLVM") == "0":
        return
    import numba.core.event as ev
    from numba.core.compiler_lock import global_compiler_lock

    class AfterLoading(ev.Listener):
        def on_start(self, event):
            pass

        def on_end(self, event):  # the lock is let go: held still if this was a nested hold
            if not global_compiler_lock.is_locked():
                release_llvm_pages()

    ev.register("numba:compiler_lock", AfterLoading())
    _releasing = True


_releasing = False
