"""The vLLM side of ``benchmarks/vllm_engine.py`` (runs with the vLLM environment's python).

Subcommands, each printing one ``RESULT{json}`` line:

- ``stock DIR``: what a stock vLLM (this plugin not importable) does with the checkpoint:
  ``LLM(DIR)``'s exception, and vLLM's compressed-tensors config parser on its
  ``quantization_config``;
- ``engine DIR [--eager] [--tp N] [--sites FILE OUT]``: ``LLM(DIR).generate`` of the
  prompts (greedy, top-5 logprobs, fp32); with ``--sites`` (one in-process engine), also run
  every SplitQ layer of the loaded model on the inputs in ``FILE`` twice: with the mask of
  a text-only step, and after vLLM's multimodal embedding step
  (``SupportsMultiModal.embed_input_ids`` with the synthetic ``is_multimodal`` of ``FILE``)
  marked the vision positions; the outputs go to ``OUT``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _stock_parser(path: str) -> str:
    """What vLLM's own compressed-tensors config parser (the one a stock vLLM picks for
    ``quant_method: compressed-tensors``) raises for the checkpoint's config."""
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    with open(os.path.join(path, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    try:
        CompressedTensorsConfig.from_config(qc)
        return "accepted"
    except Exception as e:  # what it raises is the result
        return f"{type(e).__name__}: {e}"


def _stock(path: str) -> dict:
    parser = _stock_parser(path)
    from vllm import LLM

    try:
        LLM(path, skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
            max_model_len=64)  # fmt: skip
        error = "loaded"
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    import importlib.util

    return {
        "error": error,
        "parser": parser,
        "plugin_importable": importlib.util.find_spec("splitq_modifier") is not None,
    }


def _site_check(sites_file: str, out_file: str):
    """A function for ``LLM.apply_model``: run the model's SplitQ layers on the inputs."""

    def run(model):
        import torch
        from torch import nn
        from vllm.model_executor.models.interfaces import SupportsMultiModal

        from splitq_modifier.vllm.linear import SplitQLinearMethod
        from splitq_modifier.vllm.modality import MASK_BUFFER, attach_text_mask

        data = torch.load(sites_file, weights_only=False)
        layers = {
            n: m
            for n, m in model.named_modules()
            if isinstance(getattr(m, "quant_method", None), SplitQLinearMethod)
        }

        def outputs() -> dict:
            with torch.no_grad():
                res = {}
                for name, x in data["x"].items():
                    y = layers[name](x)
                    res[name] = (y[0] if isinstance(y, tuple) else y).clone()
                return res

        class TinyMultimodal(nn.Module, SupportsMultiModal):
            """vLLM's multimodal embedding step around the loaded language model."""

            def __init__(self, lm: nn.Module) -> None:
                super().__init__()
                self.lm = lm

            def get_language_model(self) -> nn.Module:
                return self.lm

        mm = TinyMultimodal(model)
        attached = attach_text_mask(mm)
        masks = {n: getattr(m, MASK_BUFFER, None) for n, m in layers.items()}
        text = outputs()
        ids, is_mm = data["input_ids"], data["is_multimodal"]
        mm_embeds = [data["mm_embeds"]]
        with torch.no_grad():
            embeds = mm.embed_input_ids(ids, mm_embeds, is_multimodal=is_mm)
        n = ids.shape[0]
        buf = next(b for b in masks.values() if b is not None)
        after_mm = buf[:n].clone()
        masked = outputs()
        with torch.no_grad():
            mm.embed_input_ids(ids)  # a text-only step (e.g. decode): no positions
        after_text = buf[:n].clone()
        torch.save(
            {
                "text": text,
                "masked": masked,
                "mask_after_mm_step": after_mm,
                "mask_after_text_step": after_text,
                "merged_ok": bool(torch.equal(embeds[is_mm], data["mm_embeds"])),
                "layer_types": {n: type(m).__name__ for n, m in layers.items()},
                "shared_mask": len({id(b) for b in masks.values() if b is not None}) == 1,
                "attached": attached,
            },
            out_file,
        )
        return sorted(layers)

    return run


def _engine(a: argparse.Namespace) -> dict:
    t0 = time.time()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        a.path,
        skip_tokenizer_init=True,
        enforce_eager=a.eager,
        dtype=a.dtype,
        max_model_len=64,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        tensor_parallel_size=a.tp,
        seed=0,
    )
    t1 = time.time()
    prompts = [TokensPrompt(prompt_token_ids=p) for p in json.loads(a.prompts)]
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, logprobs=5,
                            detokenize=False)  # fmt: skip
    outs = llm.generate(prompts, params, use_tqdm=False)
    t2 = time.time()
    res = {
        "outputs": [
            {
                "tokens": list(o.outputs[0].token_ids),
                "logprobs": [
                    {int(k): float(v.logprob) for k, v in step.items()}
                    for step in o.outputs[0].logprobs
                ],
            }
            for o in outs
        ],
        "start_s": t1 - t0,
        "gen_s": t2 - t1,
        "quantization": llm.llm_engine.vllm_config.model_config.quantization,
    }
    if a.sites:
        res["sites"] = llm.apply_model(_site_check(*a.sites))[0]
        res["stock_parser"] = _stock_parser(a.path)
        res["unpacking"] = _unpacking()
        res["matching"] = _matching(a.path)
        heavy = ("llmcompressor", "splitq_modifier.modifier", "splitq_modifier.calibrate",
                 "splitq_modifier.mocd", "splitq_modifier.split_linear")  # fmt: skip
        res["imported"] = sorted(m for m in sys.modules if m.startswith(heavy))
        import compressed_tensors

        res["compressed_tensors"] = compressed_tensors.__version__
    return res


def _matching(path: str) -> dict:
    """Which site each vLLM layer name gets from the plugin's config, for the text-only
    checkpoint and for the VLM it was cut from (``../vlm``, targets
    ``re:^model\\.language_model\\...``) under LLaVA's vLLM renames, and the errors for layers
    that do not match a site."""
    from vllm.model_executor.models.utils import WeightsMapper

    from splitq_modifier.vllm.config import SplitQConfig

    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def config(folder: str, mapper=None) -> SplitQConfig:
        with open(os.path.join(folder, "config.json")) as f:
            cfg = SplitQConfig.from_config(json.load(f)["quantization_config"])
        cfg.packed_modules_mapping = dict(packed)
        if mapper is not None:
            cfg.apply_vllm_mapper(mapper.get_rename_mapper())
        return cfg

    def members(cfg: SplitQConfig, name: str):
        try:
            spec = cfg.site_spec(name)
            return None if spec is None else list(spec.members)
        except ValueError as e:
            return f"{type(e).__name__}: {e}"

    llava = WeightsMapper(
        orig_to_new_prefix={
            "model.language_model.": "language_model.model.",
            "model.vision_tower.": "vision_tower.",
            "model.multi_modal_projector.": "multi_modal_projector.",
            "lm_head.": "language_model.lm_head.",
        }
    )
    vlm = os.path.join(os.path.dirname(path.rstrip("/")), "vlm")
    text, mapped, unmapped = config(path), config(vlm, llava), config(vlm)
    name = "language_model.model.layers.1.mlp.gate_up_proj"
    out = {
        "text": members(text, "model.layers.1.self_attn.qkv_proj"),
        "text_o": members(text, "model.layers.1.self_attn.o_proj"),
        "vlm_mapped": members(mapped, name),
        "vlm_unmapped": members(unmapped, name),
        "vision": members(mapped, "visual.blocks.0.attn.qkv"),
        "lm_head": members(mapped, "language_model.lm_head"),
        "unfused": members(text, "model.layers.0.self_attn.q_proj"),
        "member_alone": members(text, "model.layers.0.self_attn.k_proj"),
    }
    text.packed_modules_mapping["qkvo_proj"] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    out["mixed"] = members(text, "model.layers.0.self_attn.qkvo_proj")
    text.packed_modules_mapping["qx_proj"] = ["q_proj", "x_proj"]
    out["partial"] = members(text, "model.layers.0.self_attn.qx_proj")
    return out


def _unpacking() -> dict:
    """Per bit width: does the runtime read the format's dense bit stream (written out bit by
    bit here) in vLLM's environment, whose compressed-tensors (0.17) packs 3-bit codes
    differently? ``ok`` or the codes it read wrong."""
    import torch

    from splitq_modifier.runtime import unpack_path_weight

    out = {}
    for b in (2, 3, 4, 8):
        codes = [(7 * i + 3) % (1 << b) - (1 << (b - 1)) for i in range(96)]
        acc = 0
        for k, c in enumerate(codes):
            acc |= (c + (1 << (b - 1))) << (k * b)
        words = [(acc >> (32 * i)) & 0xFFFFFFFF for i in range(96 * b // 32)]
        words = torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w for w in words]])
        got = unpack_path_weight(words.to(torch.int32), b, 96).flatten().tolist()
        out[b] = "ok" if got == codes else f"wrong: {got[:12]}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["stock", "engine"])
    ap.add_argument("path")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--prompts", default="[[5, 17, 33]]")
    ap.add_argument("--sites", nargs=2, default=None, metavar=("FILE", "OUT"))
    a = ap.parse_args()
    res = _stock(a.path) if a.cmd == "stock" else _engine(a)
    print("RESULT" + json.dumps(res), flush=True)


if __name__ == "__main__":
    sys.exit(main())
