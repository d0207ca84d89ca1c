"""Throughput of ``clipguard eval`` vs CLIP_benchmark's zero-shot evaluation, same model and images.

Both sides classify the same uint8 images with the same text embeddings' recipe. clipguard keeps the
images as uint8 tensors and resizes + normalises on the device inside ZeroShotClassifier; CLIP_benchmark
runs the model's PIL preprocess (resize, crop, normalise) in a DataLoader, as its CLI does. Each side's
image pass is timed after one warm-up batch; text embeddings are timed separately. ``--compile`` compiles
clipguard's classifier first (as ``clipguard eval --compile``; compile_s apart from the timed pass).

``--batch-size auto`` searches clipguard's batch upward from 256 (``tuning.search_batch_size``: doubled while
img/s improves by 5 %, up to the whole set or an out-of-memory error; each trial on four batches, after a warm-up
batch) and both sides then run at the batch it found; the trials are in the record. ``--profile`` runs clipguard's
pass once more under ``torch.profiler`` and records which kernels and copies took the time (``tuning.profile_top``).

The record's ``roofline`` has one line per side: FLOPs of one forward at the model's input size (counted,
benchmarks/roofline.py) x images/s, against the device's peak in the matmul precision.

    python benchmarks/perf_eval.py --model ViT-B-32:none --n 512 --out benchmarks/results/perf_eval-cpu.json
"""

from __future__ import annotations

import argparse
import time

import roofline as rf
import torch
import tuning


def _clip_benchmark_loader(images, labels, preprocess, batch_size, workers):
    from PIL import Image

    class DS(torch.utils.data.Dataset):
        classes = None

        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            img = images[i]  # (3, H, W); an ImageStream gives (1, 3, H, W)
            img = img[0] if img.dim() == 4 else img
            return preprocess(Image.fromarray(img.permute(1, 2, 0).numpy())), int(labels[i])

    return torch.utils.data.DataLoader(DS(), batch_size=batch_size, num_workers=workers)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32:none")
    ap.add_argument("--dataset", default="toy")
    ap.add_argument("--n", type=int, default=512, help="images (0: the whole split)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--data-mode", default="auto", help="load_dataset mode: auto, memory or stream (read as used)")
    ap.add_argument("--batch-size", default="128", help="images per batch, or auto (searched upward from 256)")
    ap.add_argument("--workers", type=int, default=2, help="CLIP_benchmark DataLoader workers")
    ap.add_argument("--repeat", type=int, default=1, help="tile the images R times (longer timed runs on a GPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile clipguard's classifier first")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode (reduce-overhead: CUDA graphs)")
    ap.add_argument("--profile", action="store_true", help="profile clipguard's pass once more (kernels, copies)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import open_clip
    from clip_benchmark.metrics import zeroshot_classification as zc

    from clipguard.data.prompts import load_prompts
    from clipguard.data.registry import load_dataset
    from clipguard.models.classifier import ZeroShotClassifier, compile_classifier
    from clipguard.models.inference import predict_logits
    from clipguard.models.loader import load_clip
    from clipguard.models.text_embeddings import compute_text_embeddings
    from clipguard.records.metrics import classification_metrics
    from clipguard.records.schema import environment, write_record

    clip = load_clip(args.model, device=args.device)
    size = None if args.dataset == "toy" else clip.input_size  # other sets: brought to the model's input size
    data = load_dataset(args.dataset, split=args.split, limit=args.n or None, mode=args.data_mode, size=size)
    if args.repeat > 1:
        data.images, data.labels = data.images.repeat(args.repeat, 1, 1, 1), data.labels.repeat(args.repeat)
    prompts = load_prompts(data.name, fallback_classnames=data.classnames)
    dev, amp = clip.device, clip.precision != "fp32"

    t0 = time.perf_counter()
    emb = compute_text_embeddings(clip, prompts.classnames, prompts.templates)
    _sync(dev)
    text_s = time.perf_counter() - t0
    clf = ZeroShotClassifier.from_clip(clip, emb).eval()
    compile_s = compile_classifier(clf, tuple(data.images.shape[1:]), precision=clip.precision,
                                   mode=args.compile_mode) if args.compile else None

    def clean_pass(images, bs):
        return predict_logits(clf, images, batch_size=bs, precision=clip.precision, progress=False)

    search = None
    if args.batch_size == "auto":
        def measure(bs):
            clean_pass(data.images[:bs], bs)  # warm-up at this size
            return clean_pass(data.images[: min(4 * bs, len(data))], bs)[1]["images_per_s"]

        search = tuning.search_batch_size(measure, min(256, len(data)), limit=len(data))
        args.batch_size = search["batch_size"]
        print(f"batch size searched: {search['trials']} -> {args.batch_size} ({search['stopped']})")
    args.batch_size = int(args.batch_size)
    clean_pass(data.images[: args.batch_size], args.batch_size)  # warm-up
    ours, timing = clean_pass(data.images, args.batch_size)
    profile = tuning.profile_top(lambda: clean_pass(data.images, args.batch_size), dev) if args.profile else None

    # CLIP_benchmark: its own classifier weights and its run_classification over a preprocessed loader.
    preprocess = open_clip.image_transform(clip.input_size, is_train=False, mean=clip.mean, std=clip.std)
    loader = _clip_benchmark_loader(data.images, data.labels, preprocess, args.batch_size, args.workers)
    weights = zc.zero_shot_classifier(clip.model, clip.tokenizer, prompts.classnames, prompts.templates,
                                      dev.type, amp=amp)
    warm = _clip_benchmark_loader(data.images[: args.batch_size], data.labels[: args.batch_size], preprocess,
                                  args.batch_size, 0)
    zc.run_classification(clip.model, weights, warm, dev.type, amp=amp)
    _sync(dev)
    t0 = time.perf_counter()
    theirs, _ = zc.run_classification(clip.model, weights, loader, dev.type, amp=amp)
    _sync(dev)
    their_s = time.perf_counter() - t0

    agree = (ours.argmax(1) == theirs.argmax(1)).float().mean().item()
    ours_ips, theirs_ips = timing["images_per_s"], round(len(data) / their_s, 2)
    flops = rf.image_flops(clf, (3, *clip.input_size))  # the on-device resize of clipguard's input is not counted
    prec, what = rf.matmul_precision(clip.precision, dev), "one forward at the model's input size"
    rec = {
        "schema": "clipguard.perf/1", "benchmark": "perf_eval", "model_spec": args.model,
        "dataset": data.name, "split": data.split, "data_info": {k: str(v) for k, v in data.info.items()},
        "streamed": data.streamed, "n": len(data), "repeat": args.repeat, "batch_size": args.batch_size,
        "batch_search": search, "profile": profile,
        "resolution_in": list(data.images.shape[-2:]),
        "model_input": list(clip.input_size), "precision": clip.precision,
        "clipguard": {"images_per_s": ours_ips, "wall_s": timing["wall_s"], "text_embeddings_s": round(text_s, 3),
                      "compile_s": compile_s,
                      "compile_mode": args.compile_mode if args.compile else None,
                      "acc1": classification_metrics(ours, data.labels)["acc1"]},
        "clip_benchmark": {"images_per_s": theirs_ips, "wall_s": round(their_s, 4), "dataloader_workers": args.workers,
                           "acc1": classification_metrics(theirs, data.labels)["acc1"]},
        "speedup": round(ours_ips / theirs_ips, 3), "top1_agreement": agree,
        "roofline": [rf.roofline(f"clean eval ({side})", flops, ips, precision=prec, device=dev, flops_model=what)
                     for side, ips in (("clipguard", ours_ips), ("CLIP_benchmark", theirs_ips))],
        "environment": environment(dev, clip.precision),
    }
    write_record(args.out, rec)
    print(f"clipguard {ours_ips:,.1f} img/s  CLIP_benchmark {theirs_ips:,.1f} img/s  ratio {rec['speedup']:.2f}x  "
          f"(top-1 agreement {agree:.3f}) -> {args.out}")
    for line in rec["roofline"]:
        print(rf.describe(line))
    if profile:
        print(tuning.describe_profile(profile))


if __name__ == "__main__":
    main()
