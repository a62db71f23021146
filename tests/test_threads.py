"""One loaded model shared by several threads gives what each thread would get alone.

Each case runs in a fresh process, so that the threads' first use of the model is concurrent:
that is when the shared state (unpacked panels, stacked projections, float32 copies kept for
prefill, norm scales, the tokenizer) is built, and when a shared scratch buffer once mixed two
threads' prefills (wrong logits, and float32 copies kept corrupted for the rest of the process).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SCRIPT = """
import sys, threading
import numpy as np
sys.path.insert(0, {tests!r})
from tiny import write_hf
import tinygemma as tg
from tinygemma.kernels import FastGemma

def model():
    if {demo!r}:
        return tg.load_demo()
    path = write_hf({folder!r}, family=3, hidden_size=256, intermediate_size=512,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                    head_dim=64, vocab_size=512)
    m = tg.load(path)  # bf16; keep_f32_bytes=0: every prefill decodes tiles of rows
    return FastGemma(m.config, m.weights, keep_f32_bytes={keep_f32_bytes})

def run(m, ids):
    # a prefill (more than 8 tokens: BLAS on decoded matrices), then greedy decode steps
    cache = m.new_cache(len(ids) + 6, {kv_dtype!r})
    logits = [m.forward(ids, cache=cache)]
    for _ in range(6):
        token = int(np.argmax(logits[-1][-1]))
        logits.append(m.forward(np.array([token]), cache=cache))
    return logits

rng = np.random.default_rng(0)
prompts = [rng.integers(0, 512, 20 + 11 * i) for i in range({threads})]
shared = model()
got = [None] * len(prompts)
start = threading.Barrier(len(prompts))

def work(i):
    start.wait()  # the threads' first use of the fresh model is at the same moment
    got[i] = run(shared, prompts[i])

threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
for t in threads:
    t.start()
for t in threads:
    t.join()
alone = [run(model(), p) for p in prompts]
later = [run(shared, p) for p in prompts]  # the shared model afterwards, one thread
bad = [i for i in range(len(prompts)) if any(not np.array_equal(a, b) for a, b in zip(got[i], alone[i]))]
bad_later = [i for i in range(len(prompts)) if any(not np.array_equal(a, b) for a, b in zip(later[i], alone[i]))]
print("differ", bad, "later", bad_later)
assert not bad and not bad_later
"""


def run_script(tmp_path, layer=None, **kw):
    env = dict(os.environ)
    if layer:
        env["NUMBA_THREADING_LAYER"] = layer
    args = dict(tests=str(TESTS), folder=str(tmp_path / "ckpt"), demo=False, keep_f32_bytes=0,
                threads=4, kv_dtype=None)
    args.update(kw)
    code = textwrap.dedent(SCRIPT).format(**args)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


@pytest.mark.parametrize("keep_f32_bytes", [0, 1 << 30], ids=["tiles", "kept-f32"])
def test_threads_share_a_fresh_bf16_model(tmp_path, keep_f32_bytes):
    run_script(tmp_path, keep_f32_bytes=keep_f32_bytes)


def test_threads_under_numbas_workqueue_layer(tmp_path):
    """workqueue aborts the process when two threads launch parallel regions at once
    (SIGABRT); the launches take turns there."""
    run_script(tmp_path, layer="workqueue", threads=3)


def test_threads_share_the_fresh_demo_model(tmp_path):
    """The demo: Q4_K/Q6_K panels unpacked and float32 copies built by the first prompts,
    which two threads run at once."""
    run_script(tmp_path, demo=True, threads=2, keep_f32_bytes=None)


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
def test_threads_share_a_model_with_compact_caches(tmp_path, kv_dtype):
    """Each thread's own compact cache, read by the attention kernels of both paths (prefill
    decodes it for BLAS, decode reads the stored bits) while the other thread's runs."""
    run_script(tmp_path, kv_dtype=kv_dtype, threads=3)


BLAS_IDLE = """
import os, sys, threading, time
import numpy as np  # before tinygemma, as most notebooks do: OpenBLAS keeps its long spin

a = np.ones((256, 256), np.float32)
a @ a  # OpenBLAS's threads are up
blas = set(os.listdir("/proc/self/task")) - {{str(threading.get_native_id())}}  # its workers

def blas_cpu_ns():
    # run time of OpenBLAS's workers, in ns (/proc/<pid>/task/<tid>/schedstat, first field)
    return sum(int(open(f"/proc/self/task/{{t}}/schedstat").read().split()[0]) for t in blas)

sys.path.insert(0, {tests!r})
from tiny import write_gguf
import tinygemma as tg
model = tg.load(write_gguf({path!r}, qtype="Q8_0", hidden_size=256, intermediate_size=512,
                           head_dim=64, num_attention_heads=4, num_key_value_heads=1))
ids = np.random.default_rng(0).integers(0, 300, 300)
model.forward(ids, last_only=True)  # kernels compiled or loaded
a @ a
time.sleep(1.0)  # OpenBLAS's workers spin ~0.1 s after a product, then sleep
idle = blas_cpu_ns()
model.forward(ids, last_only=True)  # a prefill: 300 tokens
time.sleep(0.5)  # a worker woken would spin on for ~0.1 s: its run time counted by now
after = blas_cpu_ns()
a @ a
time.sleep(0.5)
woken = blas_cpu_ns()
print("workers", len(blas), "prefill", after - idle, "product", woken - after)
assert blas and after == idle < woken
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads Linux's /proc")
def test_panel_prefill_leaves_openblas_threads_asleep(tmp_path):
    """NumPy imported first (OpenBLAS's threads then spin ~0.1 s after each product, and took
    the cores from the kernels' threads: a prefill 2x slower). A prefill over panels makes no
    BLAS call, so OpenBLAS's sleeping workers get no CPU time at all during it; a product
    afterwards wakes them (the probe sees BLAS work)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2")  # at least one worker, on any machine
    env.pop("OPENBLAS_THREAD_TIMEOUT", None)
    code = textwrap.dedent(BLAS_IDLE).format(tests=str(TESTS), path=str(tmp_path / "m.gguf"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


PRELOAD = """
import numpy as np
import tinygemma as tg
from tinygemma.kernels import attention, gemm

kernels = [gemm.gemm_panels_g32, gemm.gemm_panels_g16, attention.attend_prefill]
model = tg.load_demo()
model.preloading.join()
loaded = [list(k.signatures) for k in kernels]
assert all(loaded), loaded  # the demo's Q5_0/Q8_0 (G=32), Q6_K (G=16), Q4_K, attention
model.forward(np.arange(2, 8), cache=model.new_cache(8), last_only=True)
model.forward(np.arange(2, 40), cache=model.new_cache(40), last_only=True)  # a prefill
added = [[s for s in k.signatures if s not in was] for k, was in zip(kernels, loaded)]
assert not any(added), added  # every kernel the prefill ran was loaded by the preload
"""


def test_the_preload_thread_loads_every_prefill_kernel_of_the_demo():
    """``FastGemma``'s preload thread loads the prefill's kernels for exactly the model's
    formats, in a fresh process: a prefill afterwards loads (or compiles) none."""
    env = dict(os.environ)
    env.pop("TINYGEMMA_PRELOAD", None)
    r = subprocess.run([sys.executable, "-c", PRELOAD], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
