"""Quantize Qwen2.5-VL with SplitQ on several GPUs (data parallel), in the toolkit's DDP style.

    torchrun --nproc-per-node 4 examples/qwen2_5_vl_ddp.py                    # Qwen2.5-VL-7B
    torchrun --nproc-per-node 8 examples/qwen2_5_vl_ddp.py --model Qwen/Qwen2.5-VL-72B-Instruct

What changes against the single-GPU example (``examples/qwen2_5_vl_example.py``):

1. each rank initialises the process group and its own GPU with compressed-tensors'
   ``init_dist()`` (on a machine without GPUs, gloo: how the tests run this script);
2. the model is loaded inside ``load_offloaded_model()`` with ``device_map="auto_offload"``:
   every rank shares one copy of the weights offloaded to CPU (or disk), and the sequential
   pipeline onloads one decoder layer at a time to each rank's GPU; the frozen SplitQ layers
   are offloaded again like the layers they replace;
3. every rank is given the same calibration ``Dataset``; each calibrates on its own share
   (ranks ``[r N/R, (r+1) N/R)``). SplitQ all-reduces its channel statistics (every rank
   selects the same channels), its per-layer training gradients every step and its GPTQ
   Hessians, so all ranks end with bit-identical layers. The cached layer inputs wait in CPU
   memory (``cache_device: cpu``): a GPU holds one batch, not all samples;
4. every rank calls ``save_pretrained`` (llm-compressor compresses with collectives under
   torch.distributed); transformers writes the files once, from rank 0.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os

import torch
import torch.distributed as dist

import splitq_modifier  # noqa: F401  (registers SplitQModifier and the splitq-packed format)


def _single_gpu_example():
    """The single-GPU example module (its calibration-data and save helpers are reused)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen2_5_vl_example.py")
    spec = importlib.util.spec_from_file_location("qwen2_5_vl_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def init_distributed() -> tuple[int, int]:
    """Start the process group: NCCL on one GPU per rank, gloo without GPUs."""
    if torch.cuda.is_available():
        from compressed_tensors.offload import init_dist

        init_dist()
    else:
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size()


def load_model(model_id: str):
    """The model, offloaded to CPU and shared by the ranks when GPUs are present."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    if not torch.cuda.is_available():
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(model_id, dtype="auto")
    from compressed_tensors.offload import load_offloaded_model

    with load_offloaded_model():
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(
            model_id, dtype="auto", device_map="auto_offload"
        )


def quantize(
    model_id: str,
    dataset: str,
    split: str = "test",
    num_samples: int = 256,
    max_length: int = 2048,
    save_dir: str | None = None,
    epochs: int = 15,
    seed: int = 42,
) -> str:
    """Calibrate with SplitQ W4A4 on all ranks and save; returns the save folder."""
    from llmcompressor import oneshot
    from transformers import AutoProcessor

    from splitq_modifier import SplitQModifier
    from splitq_modifier.toolkit import (
        build_calibration_set,
        collate_one,
        load_image_text_dataset,
        vision_ignore_patterns,
    )

    single = _single_gpu_example()
    model = load_model(model_id)
    processor = AutoProcessor.from_pretrained(model_id)
    rows = load_image_text_dataset(dataset, split, num_samples, seed)  # same on every rank
    calib = build_calibration_set(processor, rows, max_length=max_length)
    recipe = [
        SplitQModifier(
            weight_bits=4,
            activation_bits=4,
            epochs=epochs,
            ignore=vision_ignore_patterns(model),
            cache_device="cpu",
            seed=seed,
        )
    ]
    oneshot(
        model=model,
        processor=processor,
        dataset=calib,
        recipe=recipe,
        num_calibration_samples=len(calib),
        max_seq_length=max_length,
        data_collator=collate_one,
        sequential_targets=single.SEQUENTIAL_TARGETS,
    )
    save_dir = save_dir or model_id.rstrip("/").split("/")[-1] + "-SplitQ-W4A4"
    model.save_pretrained(save_dir, save_compressed=True)  # every rank; rank 0 writes
    if dist.get_rank() == 0:
        processor.save_pretrained(save_dir)
    dist.barrier()
    return save_dir


def main(argv: list[str] | None = None) -> str:
    """Command line (under torchrun): quantize on all ranks and save."""
    single = _single_gpu_example()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=single.MODEL_ID, help="hub id or local folder")
    p.add_argument("--dataset", default=single.DEFAULT_DATASET, help="hub id or image folder")
    p.add_argument("--split", default="test")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--save-dir", default=None)
    p.add_argument("--epochs", type=int, default=15)
    args = p.parse_args(argv)
    rank, world = init_distributed()
    save_dir = quantize(args.model, args.dataset, args.split, args.num_samples,
                        args.max_length, args.save_dir, args.epochs)  # fmt: skip
    if rank == 0:
        print(f"saved to {save_dir} after calibrating on {world} ranks")
    dist.barrier()
    dist.destroy_process_group()
    return save_dir


if __name__ == "__main__":
    main()
