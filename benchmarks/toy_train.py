"""Reproduce the committed toy weights: two toy CLIPs (seeds 0 and 1) and the ToyCNN surrogate.

    python benchmarks/toy_train.py --out clipguard/assets [--only clip-seed0|clip-seed1|cnn]

Deterministic on CPU: fixed torch seeds, fixed data seeds, two threads. About two minutes on 2 cores.
The CLIPs see only freshly generated captioned images (never the labelled splits); the CNN trains on
toy_split("train") plus extra images from its own seed. Both are scored on toy_split("test").
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from clipguard.data.toy import TOY_CLASSNAMES, TOY_TEMPLATES, caption_set, class_set, toy_split
from clipguard.fsutil import atomic_write
from clipguard.models.toy import (
    TOY_MEAN,
    TOY_MODEL_NAME,
    TOY_STD,
    TOY_VARIANTS,
    ToyCNN,
    register_toy_config,
    toy_cnn_path,
    toy_weights_path,
)

log = logging.getLogger("clipguard.toy_train")

# STACK-NOTES settings: reaches zero-shot acc1 ~0.99 on the toy test split in well under two minutes.
CLIP_STEPS, CLIP_BATCH, CLIP_LR, CLIP_WD, CLIP_WARMUP = 2000, 128, 4e-3, 0.05, 50
CHUNK_STEPS = 100  # fresh images every 100 steps: each caption image is seen once, so no overfitting
CNN_EPOCHS, CNN_BATCH, CNN_LR, CNN_EXTRA_PER_CLASS, CNN_SEED, CNN_DATA_SEED = 8, 128, 3e-3, 300, 0, 3_000


def _normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the normalised float input the toy CLIP expects."""
    mean, std = torch.tensor(TOY_MEAN).view(1, 3, 1, 1), torch.tensor(TOY_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 zero-shot accuracy over TOY_CLASSNAMES, class embeddings averaged over TOY_TEMPLATES."""
    model.eval()
    weights = []
    for name in TOY_CLASSNAMES:
        emb = F.normalize(model.encode_text(tokenizer([t.format(c=name) for t in TOY_TEMPLATES])), dim=-1)
        weights.append(F.normalize(emb.mean(0), dim=-1))
    feats = F.normalize(model.encode_image(_normalise(images)), dim=-1)
    return (feats @ torch.stack(weights).T).argmax(-1).eq(labels).float().mean().item()


def _sort_header(path: Path) -> None:
    """Rewrite a safetensors JSON header with sorted keys, in place (same length, so offsets hold)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(canonical) > n:  # never expected: the same content cannot grow; leave the file as written
            return
        f.seek(8)
        f.write(canonical.ljust(n, b" "))  # safetensors pads its header with spaces too


def _atomic_save(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    def write(tmp: str) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
        # safetensors writes metadata in hash order; sorted keys make rebuilds byte-identical.
        _sort_header(Path(tmp))

    atomic_write(path, write)  # readers never see a half-written file


def _lr_factor(step: int) -> float:
    """Linear warm-up over CLIP_WARMUP steps, then cosine decay to zero at CLIP_STEPS."""
    return min(1.0, (step + 1) / CLIP_WARMUP) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / CLIP_STEPS)))


def train_clip(variant: str, out: Path) -> float:
    """Train one toy CLIP variant, save fp16 weights, return test acc1 after the fp16 round trip."""
    import open_clip

    register_toy_config()
    seed = TOY_VARIANTS[variant]
    torch.manual_seed(seed)
    model = open_clip.create_model(TOY_MODEL_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(TOY_MODEL_NAME)
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=CLIP_LR, weight_decay=CLIP_WD)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor)  # stepped per batch

    model.train()
    for step in range(CLIP_STEPS):
        if step % CHUNK_STEPS == 0:
            # Data seed depends on the model seed too, so the two CLIPs are more independent surrogates.
            chunk_seed = 10_000 + 1_000 * seed + step // CHUNK_STEPS
            images, captions = caption_set(CHUNK_STEPS * CLIP_BATCH, seed=chunk_seed)
            # Only 108 distinct captions: tokenize each once and index.
            unique = sorted(set(captions))
            tokens = tokenizer(unique)[torch.tensor([unique.index(c) for c in captions])]
        i = (step % CHUNK_STEPS) * CLIP_BATCH
        img_f, txt_f, scale = model(_normalise(images[i:i + CLIP_BATCH]), tokens[i:i + CLIP_BATCH])
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % 500 == 0 or step == CLIP_STEPS - 1:
            log.info("clip seed %d step %d/%d loss %.4f logit scale %.1f",
                     seed, step, CLIP_STEPS, loss.item(), scale.item())

    # Score what is actually shipped: fp16 weights loaded back into a fresh fp32 model.
    state = {k: v.detach().half() for k, v in model.state_dict().items()}
    check = open_clip.create_model(TOY_MODEL_NAME, pretrained=None)
    check.load_state_dict(state, strict=True)
    acc = zero_shot_accuracy(check, tokenizer, *toy_split("test"))
    _atomic_save(state, out / toy_weights_path(variant).name, _metadata(
        config=TOY_MODEL_NAME, seed=seed, steps=CLIP_STEPS, batch=CLIP_BATCH, dtype="float16",
        zero_shot_test_acc1=f"{acc:.4f}", mean=",".join(map(str, TOY_MEAN)), std=",".join(map(str, TOY_STD)),
    ))
    return acc


def train_cnn(out: Path) -> float:
    """Train the ToyCNN with cross-entropy, save fp32 weights, return its test accuracy."""
    torch.manual_seed(CNN_SEED)
    train_x, train_y = toy_split("train")
    extra_x, extra_y = class_set(CNN_EXTRA_PER_CLASS, seed=CNN_DATA_SEED)
    x, y = torch.cat([train_x, extra_x]).float() / 255, torch.cat([train_y, extra_y])
    model = ToyCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=CNN_LR, weight_decay=1e-4)
    steps = CNN_EPOCHS * math.ceil(len(x) / CNN_BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=CNN_LR, total_steps=steps)

    for epoch in range(CNN_EPOCHS):
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), CNN_BATCH):
            idx = order[i:i + CNN_BATCH]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
        log.info("cnn epoch %d/%d loss %.4f", epoch + 1, CNN_EPOCHS, loss.item())

    model.eval()
    test_x, test_y = toy_split("test")
    with torch.no_grad():
        acc = model(test_x.float() / 255).argmax(-1).eq(test_y).float().mean().item()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    _atomic_save(state, out / toy_cnn_path().name, _metadata(
        model="ToyCNN", seed=CNN_SEED, epochs=CNN_EPOCHS, train_images=len(x), dtype="float32",
        test_acc1=f"{acc:.4f}",
    ))
    return acc


def _metadata(**fields) -> dict[str, str]:
    import open_clip

    versions = {"torch": torch.__version__, "open_clip": open_clip.__version__}
    return {**{k: str(v) for k, v in fields.items()}, **versions}


JOBS = {f"clip-{variant}": functools.partial(train_clip, variant) for variant in TOY_VARIANTS}
JOBS["cnn"] = train_cnn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the .safetensors files")
    parser.add_argument("--only", choices=sorted(JOBS), help="train just one model")
    args = parser.parse_args(argv)
    # open_clip logs its model-creation steps at INFO on the root logger: keep those quiet.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(2)  # same thread count everywhere keeps CPU float reductions reproducible

    results = []
    for name in [args.only] if args.only else list(JOBS):
        start = time.perf_counter()
        acc = JOBS[name](args.out)
        results.append((name, acc, time.perf_counter() - start))
    for name, acc, seconds in results:
        print(f"{name}: test acc1 {acc:.4f}, {seconds:.0f} s")


if __name__ == "__main__":
    main()
