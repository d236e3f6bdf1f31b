"""Fidelity of a saved SplitQ model to its full-precision original, on real image-text data.

    python -m splitq_modifier.evaluate --model Qwen/Qwen2.5-VL-7B-Instruct \\
        --quantized Qwen2.5-VL-7B-Instruct-SplitQ-W4A4 --dataset lmms-lab/flickr30k \\
        --split test --num-samples 64

    # same, through the benchmark script
    python benchmarks/fidelity.py --model <hub id or path> --quantized <dir> --dataset <...>

Loads the user's FP model (hub id or folder) and a SplitQ model saved with
``save_pretrained(dir, save_compressed=True)``, both with ``AutoModelForImageTextToText``,
and the processor saved with the quantized model. On each image-text row of the dataset
(a hub dataset, a folder of images, or a ``save_to_disk`` folder, as for the examples):

- teacher-forced: the conversation (image + question, and the reference answer or caption
  as the assistant turn when the row has one) runs through both models; per position,
  KL(FP || Q) of the next-token distributions and top-1 agreement, overall and split into
  vision positions (the image/video tokens) and text positions;
- answer accuracy, where the dataset has answers (a column ``answer`` / ``answers`` /
  ``label``, with a ``question`` / ``prompt`` column or the default prompt): both models
  answer greedily; an answer counts as right when the normalised reference answer occurs in
  the normalised generation (the usual open-ended VQA scoring). Retention = Q / FP.

Prints a table and writes JSON with ``--out``. Needs the models' weights (and normally a GPU
for real sizes); the tests run it on tiny saved models.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import string
import sys
from typing import Any

import torch
from loguru import logger
from torch import nn
from tqdm import tqdm

from splitq_modifier.toolkit import (
    DEFAULT_PROMPT,
    caption_of,
    load_image_text_dataset,
    preserved_tokenizer_state,
)

__all__ = [
    "EvalSample",
    "answer_accuracy",
    "check_splitq_checkpoint",
    "evaluate",
    "fidelity_split",
    "load_models",
    "main",
    "make_samples",
    "normalize_answer",
]

_QUESTION_COLUMNS = ("question", "prompt", "query")
_ANSWER_COLUMNS = ("answer", "answers", "label")


# --------------------------------------------------------------------------- loading
def check_splitq_checkpoint(path: str) -> dict:
    """The ``quantization_config`` of a saved SplitQ model folder.

    :raises FileNotFoundError: no ``config.json`` in ``path``
    :raises ValueError: the config holds no ``splitq-packed`` group (not a SplitQ save)
    """
    from splitq_modifier.format.guard import decode_quantization_config
    from splitq_modifier.format.spec import FORMAT_NAME

    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(
            f"--quantized {path!r}: no config.json there; pass the folder a SplitQ model was "
            "saved to with model.save_pretrained(dir, save_compressed=True)"
        )
    with open(cfg_path) as f:
        qc = decode_quantization_config(json.load(f).get("quantization_config") or {})
    groups = qc.get("config_groups") or {}
    if not any(g.get("format") == FORMAT_NAME for g in groups.values()):
        raise ValueError(
            f"--quantized {path!r} is not a SplitQ checkpoint: its config.json has no "
            f"{FORMAT_NAME!r} quantization group (format {qc.get('format')!r})"
        )
    return qc


def _device_map(device: str | None) -> str | None:
    if device is not None:
        return None if device == "cpu" else device
    return "auto" if torch.cuda.is_available() else None


def load_models(
    model: str,
    quantized: str,
    device: str | None = None,
) -> tuple[nn.Module, nn.Module, Any]:
    """Load the FP model, the saved SplitQ model and the processor.

    :param model: hub id or folder of the full-precision model
    :param quantized: folder of the saved SplitQ model (its processor is used; the FP
        model's when the folder has none)
    :param device: ``"cpu"``, ``"cuda"``, ...; default ``device_map="auto"`` with a GPU
    :raises ValueError: ``quantized`` is not a SplitQ save, or the two models are of
        different architectures
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    import splitq_modifier  # noqa: F401  (the splitq-packed loader)

    check_splitq_checkpoint(quantized)
    fp_type = AutoConfig.from_pretrained(model).model_type
    q_type = AutoConfig.from_pretrained(quantized).model_type
    if fp_type != q_type:
        raise ValueError(
            f"--model {model!r} is a {fp_type!r} model but --quantized {quantized!r} is a "
            f"{q_type!r} model: pass the FP original of the quantized model"
        )
    device_map = _device_map(device)
    logger.info(f"SplitQ evaluate: loading FP {model} and SplitQ {quantized}")
    fp = AutoModelForImageTextToText.from_pretrained(model, dtype="auto", device_map=device_map)
    q = AutoModelForImageTextToText.from_pretrained(quantized, dtype="auto", device_map=device_map)
    try:
        processor = AutoProcessor.from_pretrained(quantized)
    except (OSError, ValueError):
        processor = AutoProcessor.from_pretrained(model)
    if getattr(processor, "image_processor", None) is None:
        processor = AutoProcessor.from_pretrained(model)
    if device is not None and device_map is None:
        fp.to(device)
        q.to(device)
    return fp.eval(), q.eval(), processor


# --------------------------------------------------------------------------- data
class EvalSample:
    """One evaluation row: teacher-forced inputs, prompt-only inputs, reference answers."""

    def __init__(self, forced: dict, prompt: dict, answers: list[str], question: str):
        self.forced = forced
        self.prompt = prompt
        self.answers = answers
        self.question = question


def _answers(row: dict) -> list[str]:
    for col in _ANSWER_COLUMNS:
        value = row.get(col)
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        out = []
        for v in values:
            if isinstance(v, dict):  # VQAv2 style: [{"answer": ...}, ...]
                v = v.get("answer")
            if v is not None and str(v).strip():
                out.append(str(v).strip())
        if out:
            return out
    return []


def _question(row: dict, default: str) -> str:
    for col in _QUESTION_COLUMNS:
        value = row.get(col)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return default


def make_samples(processor: Any, dataset, prompt: str = DEFAULT_PROMPT) -> list[EvalSample]:
    """Processed evaluation samples (tensors, batch 1) from image-text rows."""
    out = []
    with preserved_tokenizer_state(processor):
        for row in dataset:
            image = row["image"].convert("RGB")
            question = _question(row, prompt)
            answers = _answers(row)
            reference = answers[0] if answers else caption_of(row)
            user = [{"type": "image"}, {"type": "text", "text": question}]
            msgs = [{"role": "user", "content": user}]
            text_prompt = processor.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=True
            )
            text_forced = text_prompt
            if reference is not None:
                forced = msgs + [
                    {"role": "assistant", "content": [{"type": "text", "text": reference}]}
                ]
                text_forced = processor.apply_chat_template(forced, tokenize=False)
            enc = {
                name: dict(processor(text=[t], images=[image], return_tensors="pt"))
                for name, t in (("forced", text_forced), ("prompt", text_prompt))
            }
            out.append(EvalSample(enc["forced"], enc["prompt"], answers, question))
    return out


# --------------------------------------------------------------------------- metrics
def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def fidelity_split(
    fp: nn.Module, q: nn.Module, samples: list[EvalSample], vision_ids: list[int]
) -> dict:
    """KL(FP || Q) of next-token distributions and top-1 agreement, over all positions and
    split into vision positions (``input_ids`` in ``vision_ids``) and text positions; with
    the number of positions of each kind."""
    sums = {k: [0.0, 0.0, 0] for k in ("all", "text", "vision")}  # kl, agree, count
    ids_t = torch.tensor(vision_ids, dtype=torch.long)
    for s in tqdm(samples, desc="SplitQ evaluate: fidelity", leave=False):
        lf = fp(**_to(s.forced, _device(fp))).logits.float().log_softmax(-1)[0].cpu()
        lq = q(**_to(s.forced, _device(q))).logits.float().log_softmax(-1)[0].cpu()
        kl = (lf.exp() * (lf - lq)).sum(-1)
        agree = (lf.argmax(-1) == lq.argmax(-1)).float()
        vision = torch.isin(s.forced["input_ids"][0].cpu(), ids_t)
        for key, m in (("all", torch.ones_like(vision)), ("text", ~vision), ("vision", vision)):
            sums[key][0] += float(kl[m].sum())
            sums[key][1] += float(agree[m].sum())
            sums[key][2] += int(m.sum())
    out: dict[str, float | int] = {}
    for key, (kl, agree, n) in sums.items():
        out[f"positions_{key}"] = n
        if n:
            out[f"kl_{key}"] = kl / n
            out[f"top1_{key}"] = agree / n
    return out


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (VQA-style normalisation)."""
    text = text.lower()
    text = "".join(" " if c in string.punctuation else c for c in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _correct(generated: str, answers: list[str]) -> bool:
    gen = f" {normalize_answer(generated)} "
    return any(f" {normalize_answer(a)} " in gen for a in answers if normalize_answer(a))


@torch.no_grad()
def answer_accuracy(
    model: nn.Module, processor: Any, samples: list[EvalSample], max_new_tokens: int = 16
) -> tuple[float | None, list[str]]:
    """Greedy answers of ``model`` and the fraction that contain a reference answer
    (None when no sample has answers)."""
    scored, right, texts = 0, 0, []
    for s in tqdm(samples, desc="SplitQ evaluate: answers", leave=False):
        inputs = _to(s.prompt, _device(model))
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        text = processor.batch_decode(
            out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )[0]
        texts.append(text)
        if s.answers:
            scored += 1
            right += _correct(text, s.answers)
    return (right / scored if scored else None), texts


def evaluate(
    fp: nn.Module,
    q: nn.Module,
    processor: Any,
    dataset,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 16,
    accuracy: bool = True,
) -> dict:
    """All metrics of ``q`` against ``fp`` on ``dataset`` (rows with an ``image``)."""
    from splitq_modifier.arch import get_arch, vision_token_ids

    vision_ids = vision_token_ids(fp.config, get_arch(fp.config))
    if not vision_ids:
        raise ValueError(
            f"{type(fp).__name__}: no vision token id in its config, cannot split positions "
            "into vision and text (add the family to splitq_modifier.arch.ARCHITECTURES)"
        )
    samples = make_samples(processor, dataset, prompt)
    result: dict[str, Any] = {"samples": len(samples), "vision_token_ids": vision_ids}
    result.update(fidelity_split(fp, q, samples, vision_ids))
    if accuracy and any(s.answers for s in samples):
        acc_fp, gen_fp = answer_accuracy(fp, processor, samples, max_new_tokens)
        acc_q, gen_q = answer_accuracy(q, processor, samples, max_new_tokens)
        result.update(
            accuracy_fp=acc_fp,
            accuracy_q=acc_q,
            retention=acc_q / acc_fp if acc_fp else None,
            answered=sum(1 for s in samples if s.answers),
            same_answer=sum(a == b for a, b in zip(gen_fp, gen_q)) / len(samples),
            generations=[
                {"question": s.question, "answers": s.answers, "fp": a, "quantized": b}
                for s, a, b in zip(samples, gen_fp, gen_q)
            ],
        )
    return result


def _table(r: dict) -> str:
    def f(key: str, fmt: str = ".4g") -> str:
        v = r.get(key)
        return "n/a" if v is None else format(v, fmt)

    lines = [
        "| KL(FP‖Q) | KL text | KL vision | top-1 | top-1 text | top-1 vision |",
        "|---|---|---|---|---|---|",
        f"| {f('kl_all')} | {f('kl_text')} | {f('kl_vision')} | {f('top1_all', '.3f')} "
        f"| {f('top1_text', '.3f')} | {f('top1_vision', '.3f')} |",
        f"\n{r['samples']} samples, {r['positions_text']} text and {r['positions_vision']} "
        "vision positions",
    ]
    if "accuracy_q" in r:
        lines.append(
            f"answer accuracy FP {f('accuracy_fp', '.3f')}, SplitQ {f('accuracy_q', '.3f')}"
            f" (retention {f('retention', '.1%')}, {r['answered']} answered rows; same "
            f"answer as FP on {r['same_answer']:.1%})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Command line (see the module docstring); returns the metrics."""
    p = argparse.ArgumentParser(
        prog="python -m splitq_modifier.evaluate",
        description="KL / top-1 agreement (text vs vision) and answer accuracy of a saved "
        "SplitQ model against its FP original.",
    )
    p.add_argument("--model", required=True, help="FP model: hub id or folder")
    p.add_argument("--quantized", required=True, help="folder of the saved SplitQ model")
    p.add_argument("--dataset", required=True, help="hub dataset id, image folder or saved set")
    p.add_argument("--split", default="test")
    p.add_argument("--num-samples", "--eval", type=int, default=64, dest="num_samples")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="question for rows without one")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--no-accuracy", action="store_true", help="skip the generation pass")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    args = p.parse_args(argv)

    fp, q, processor = load_models(args.model, args.quantized, args.device)
    rows = load_image_text_dataset(args.dataset, args.split, args.num_samples, args.seed)
    result = evaluate(
        fp, q, processor, rows, args.prompt, args.max_new_tokens, not args.no_accuracy
    )
    result["args"] = vars(args)
    print(_table(result), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
