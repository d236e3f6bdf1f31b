"""Run by tests/test_distributed.py under ``torch.distributed.run`` (2 CPU ranks): the DDP
example's own ``quantize`` on a tiny Qwen2.5-VL with an offline processor."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(root: str) -> None:
    torch.set_num_threads(1)
    path = Path(__file__).parents[1] / "examples" / "qwen2_5_vl_ddp.py"
    spec = importlib.util.spec_from_file_location("qwen2_5_vl_ddp", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rank, world = example.init_distributed()

    from splitq_modifier.testing.families import (
        build_tiny_family,
        register_offline_processors,
        write_image_folder,
    )

    register_offline_processors()
    if rank == 0:
        tiny = build_tiny_family("qwen2_5_vl", f"{root}/fp")
        write_image_folder(f"{root}/images", 4, tiny.family.image_sizes)
    dist.barrier()
    save_dir = example.quantize(f"{root}/fp", f"{root}/images", num_samples=4,
                                max_length=1024, save_dir=f"{root}/q", epochs=1)  # fmt: skip
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for k, v in sorted(load_file(f"{save_dir}/model.safetensors").items()):
        digest.update(k.encode() + v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    with open(f"{root}/example_rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "world": world, "saved": digest.hexdigest()}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
