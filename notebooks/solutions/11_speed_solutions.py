"""Solutions to the exercises of chapter 11 (speed)."""

import math
import time

import numpy as np

from tinygemma.config import count_parameters


def bf16_roofline(config, bandwidth):
    """1. Every weight read once per token at 2 bytes: tokens/s <= bandwidth / (2 * params)."""
    return bandwidth / (2 * count_parameters(config)["total"])


def ridge_tokens(peak_flops, bandwidth, bytes_per_weight):
    """2. Intensity 2T / b reaches the ridge pi / beta at T = pi * b / (2 beta)."""
    return max(1, math.ceil(peak_flops * bytes_per_weight / (2 * bandwidth)))


def head_share(model, repeats=5):
    """3. The best time of the output-layer matvec over the best time of a decode step."""
    ids = np.array(model.tokenizer.encode("The history of the written word"))
    cache = model.new_cache(len(ids) + repeats + 2)
    model.forward(ids, cache=cache, last_only=True)
    x = np.ones((1, model.config.hidden_size), np.float32)
    head, step = [], []
    for k in range(repeats):
        t0 = time.perf_counter()
        model.linear(x, "embed")
        head.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        model.forward(np.array([ids[-1]]), cache=cache, last_only=True)
        step.append(time.perf_counter() - t0)
    return min(head) / min(step)
