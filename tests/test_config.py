"""Config files in both styles in use (transformers 4.x and 5.x) and the Gemma 1 presets."""

import json

import pytest

from tinygemma.config import FULL, GEMMA_2B, GEMMA_7B, SLIDING, GemmaConfig, count_parameters
from tinygemma.errors import CheckpointError

# google/gemma-2b config.json as released (transformers 4.38): "hidden_act": "gelu".
GEMMA_2B_JSON = {
    "architectures": ["GemmaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 2, "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 16384,
    "max_position_embeddings": 8192, "model_type": "gemma", "num_attention_heads": 8,
    "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
    "transformers_version": "4.38.0.dev0", "use_cache": True, "vocab_size": 256000}

GEMMA_7B_JSON = {**GEMMA_2B_JSON, "hidden_size": 3072, "intermediate_size": 24576,
                 "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 16}

# A Gemma 3 4B-style text config, transformers 4.x keys.
GEMMA3_4X = {
    "model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 2560,
    "intermediate_size": 10240, "num_hidden_layers": 34, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "query_pre_attn_scalar": 256, "sliding_window": 1024, "sliding_window_pattern": 6,
    "final_logit_softcapping": None, "attn_logit_softcapping": None, "torch_dtype": "bfloat16"}


def gemma3_5x():
    d = {k: v for k, v in GEMMA3_4X.items()
         if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling",
                      "sliding_window_pattern", "torch_dtype")}
    d["dtype"] = "bfloat16"
    d["rope_parameters"] = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    d["layer_types"] = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(34)]
    return d


def test_official_gemma_2b_and_7b_configs_equal_the_presets():
    assert GemmaConfig.from_dict(GEMMA_2B_JSON) == GEMMA_2B
    assert GemmaConfig.from_dict(GEMMA_7B_JSON) == GEMMA_7B
    assert GEMMA_2B.num_kv_heads == 1 and GEMMA_7B.num_kv_heads == GEMMA_7B.num_heads
    assert GEMMA_7B.num_heads * GEMMA_7B.head_dim != GEMMA_7B.hidden_size


def test_parameter_counts_of_the_paper():
    # Gemma paper table 2: 2B has 524M embedding + 1981M non-embedding parameters,
    # 7B 786M + 7751M (the paper truncates to millions).
    p2, p7 = count_parameters(GEMMA_2B), count_parameters(GEMMA_7B)
    assert p2["embedding"] == 524_288_000 and p7["embedding"] == 786_432_000
    assert (p2["total"] - p2["embedding"]) // 10**6 == 1981
    assert (p7["total"] - p7["embedding"]) // 10**6 == 7751


def test_gemma3_4x_and_5x_styles_read_the_same():
    a, b = GemmaConfig.from_dict(GEMMA3_4X), GemmaConfig.from_dict(gemma3_5x())
    assert a == b
    assert a.rope_theta == 1e6 and a.rope_local_theta == 1e4 and a.rope_scaling_factor == 8.0
    assert a.layer_types[:6] == (SLIDING,) * 5 + (FULL,)
    assert a.rope_scale(5) == 8.0 and a.rope_scale(0) == 1.0 and a.rope_base(0) == 1e4
    assert a.qk_norm and a.sandwich_norms and a.window(0) == 1024 and a.window(5) is None


def test_gemma2_defaults_alternate_local_and_global():
    d = {"model_type": "gemma2", "vocab_size": 256000, "hidden_size": 2304,
         "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
         "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
         "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
         "hidden_activation": "gelu_pytorch_tanh"}
    c = GemmaConfig.from_dict(d)
    assert c.layer_types[:2] == (SLIDING, FULL) and c.attn_logit_softcap == 50.0
    assert c.attn_scale == 256 ** -0.5 and not c.qk_norm


def test_multimodal_gemma3_reads_its_text_config():
    d = {"model_type": "gemma3", "text_config": GEMMA3_4X, "vision_config": {}}
    assert GemmaConfig.from_dict(d) == GemmaConfig.from_dict(GEMMA3_4X)


@pytest.mark.parametrize("change, words", [
    ({"model_type": "llama"}, "not Gemma"),
    ({"hidden_act": "relu"}, "activation"),
    ({"num_key_value_heads": 3}, "multiple"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
    ({"num_hidden_layers": "18"}, "num_hidden_layers"),
])
def test_bad_configs_are_named(change, words):
    with pytest.raises(CheckpointError, match=words):
        GemmaConfig.from_dict({**GEMMA_2B_JSON, **change})


def test_missing_key_and_missing_file(tmp_path):
    d = dict(GEMMA_2B_JSON)
    del d["hidden_size"]
    with pytest.raises(CheckpointError, match="hidden_size"):
        GemmaConfig.from_dict(d)
    with pytest.raises(CheckpointError, match="config.json"):
        GemmaConfig.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        GemmaConfig.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(GEMMA_2B_JSON))
    assert GemmaConfig.from_json(tmp_path / "config.json") == GEMMA_2B


def test_a_huge_layer_count_fails_fast():
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        GemmaConfig.from_dict({**GEMMA_2B_JSON, "num_hidden_layers": 10**9})
