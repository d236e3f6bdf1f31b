"""Run by tests/test_distributed.py under ``torch.distributed.run`` (2 CPU ranks, gloo):
SplitQ oneshot on a tiny planted LLaVA with the same dataset passed to every rank."""

from __future__ import annotations

import datetime
import hashlib
import json
import sys

import torch
import torch.distributed as dist


def main(root: str, epochs: int) -> None:
    # compressed_tensors.offload.init_dist() needs a GPU; a short timeout turns a hang into an error
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    torch.set_num_threads(1)
    from llmcompressor import oneshot

    import splitq_modifier  # noqa: F401
    from splitq_modifier import SplitQModifier
    from splitq_modifier.testing.tiny import (
        build_tiny_vlm,
        calibration_dataset,
        collate,
        synthetic_samples,
    )

    rank = dist.get_rank()
    tiny = build_tiny_vlm("llava", hidden=64, layers=2, path=f"{root}/fp")
    dist.barrier()  # the model folder is written before any rank reads its config back
    seen = []
    tiny.model.get_input_embeddings().register_forward_pre_hook(
        lambda m, a: seen.append(int(a[0].sum()))
    )
    modifier = SplitQModifier(epochs=epochs, batch_size=4)
    oneshot(
        model=tiny.model,
        dataset=calibration_dataset(synthetic_samples(tiny, 16)),
        data_collator=collate,
        recipe=[modifier],
        num_calibration_samples=16,
        processor=tiny.tokenizer,
    )
    digest = hashlib.sha256()
    for k, v in sorted(tiny.model.state_dict().items()):
        digest.update(
            k.encode() + v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        )
    # every rank calls save_pretrained (llm-compressor compresses with collectives under
    # torch.distributed); transformers writes the files from rank 0 only
    tiny.model.save_pretrained(f"{root}/q", save_compressed=True)
    report = {k: v for k, v in modifier.report.items()}
    out = {"rank": rank, "hash": digest.hexdigest(), "report": report, "seen": sorted(set(seen))}
    with open(f"{root}/rank{rank}.json", "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
