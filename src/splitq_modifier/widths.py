"""Layer widths of real VLMs' language models, written from their published ``config.json``.

Widths only (no weights, nothing downloaded): enough to plan SplitQ's channel split and
transforms at every activation site and to check the plan's costs and checkpoint size
(``tests/test_layout.py``, ``benchmarks/scale.py``, ``benchmarks/size_report.py``).

Per model: ``hidden`` (residual width), ``intermediate`` (MLP width), ``q_out`` (query
projection width = heads x head_dim, also the input width of ``o_proj``), ``kv_out`` (key /
value projection width = KV heads x head_dim) and the number of decoder layers.

Left out: SmolVLM-256M (hidden 576, intermediate 1536). At that width 2% of the channels is
12, too few to align, and its MLP down projection (1536 -> 576) is so narrow on the output
side that even three balanced Kronecker factors of its input cost more than 5% of it (13%
with two); SplitQ runs on it with best-effort factors (:mod:`splitq_modifier.layout`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelWidths", "REAL_MODELS", "site_widths"]


@dataclass(frozen=True)
class ModelWidths:
    """The language-model widths of one published VLM."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    q_out: int
    kv_out: int
    layers: int

    def params_per_layer(self) -> int:
        """Weights of the seven linears of one decoder layer (biases excluded)."""
        h, i = self.hidden, self.intermediate
        return h * (self.q_out + 2 * self.kv_out) + self.q_out * h + 3 * h * i


def site_widths(m: ModelWidths) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Site name -> (input width, output widths of the site's linears), FlatQuant's layout."""
    return {
        "attn_in": (m.hidden, (m.q_out, m.kv_out, m.kv_out)),
        "attn_out": (m.q_out, (m.hidden,)),
        "mlp_in": (m.hidden, (m.intermediate, m.intermediate)),
        "mlp_down": (m.intermediate, (m.hidden,)),
    }


def _m(name, model_type, hidden, intermediate, heads, kv_heads, head_dim, layers) -> ModelWidths:
    return ModelWidths(
        name, model_type, hidden, intermediate, heads * head_dim, kv_heads * head_dim, layers
    )


#: name -> widths. (heads, kv heads, head_dim) as in each model's text config.
REAL_MODELS: dict[str, ModelWidths] = {
    m.name: m
    for m in (
        _m("Qwen2.5-VL-3B", "qwen2_5_vl", 2048, 11008, 16, 2, 128, 36),
        _m("Qwen2.5-VL-7B", "qwen2_5_vl", 3584, 18944, 28, 4, 128, 28),
        _m("Qwen2.5-VL-32B", "qwen2_5_vl", 5120, 27648, 40, 8, 128, 64),
        _m("Qwen2.5-VL-72B", "qwen2_5_vl", 8192, 29568, 64, 8, 128, 80),
        _m("Qwen2-VL-2B", "qwen2_vl", 1536, 8960, 12, 2, 128, 28),
        _m("Qwen2-VL-7B", "qwen2_vl", 3584, 18944, 28, 4, 128, 28),
        _m("Qwen3-VL-2B", "qwen3_vl", 2048, 6144, 16, 8, 128, 28),
        _m("Qwen3-VL-4B", "qwen3_vl", 2560, 9728, 32, 8, 128, 36),
        _m("Qwen3-VL-8B", "qwen3_vl", 4096, 12288, 32, 8, 128, 36),
        _m("Qwen3-VL-32B", "qwen3_vl", 5120, 25600, 64, 8, 128, 64),
        _m("LLaVA-1.5-7B", "llava", 4096, 11008, 32, 32, 128, 32),
        _m("LLaVA-1.5-13B", "llava", 5120, 13824, 40, 40, 128, 40),
        _m("Gemma-3-4B", "gemma3", 2560, 10240, 8, 4, 256, 34),
        _m("Gemma-3-12B", "gemma3", 3840, 15360, 16, 8, 256, 48),
        _m("Gemma-3-27B", "gemma3", 5376, 21504, 32, 16, 128, 62),
        _m("SmolVLM-500M", "idefics3", 960, 2560, 15, 5, 64, 32),
        _m("SmolVLM-2.2B", "idefics3", 2048, 8192, 32, 32, 64, 24),
        _m("InternVL3-2B", "internvl", 1536, 8960, 12, 2, 128, 28),
        _m("InternVL3-8B", "internvl", 3584, 18944, 28, 4, 128, 28),
        _m("InternVL2.5-8B", "internvl_chat", 4096, 14336, 32, 8, 128, 32),
        _m("Mistral-Small-3.1-24B", "mistral3", 5120, 32768, 32, 8, 128, 40),
    )
}
