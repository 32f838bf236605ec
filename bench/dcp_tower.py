"""DCP-Prune's encoder stage against the unpruned tower, at tower depths 3 to 23.

DCP prunes inside the vision tower (an ACGR stage after every second layer), which pays
only if the scoring costs less than the layers it shortens. This bench builds CLIP towers
of one width at several depths (random weights, seeded; timing does not depend on what
the weights learnt, except whether TATCS is chosen, which is reported), and times per
image, in this run:

* ``tower``: the unpruned tower up to the feature layer (LLaVA's layer -2);
* ``vanilla stage``: the tower and the projection of every patch (what vanilla serves);
* ``dcp stage``: DCP's tower with its scoring, and the projection of the kept tokens.

    python bench/dcp_tower.py [--width 256] [--heads 4] [--depths 3,7,11,15,19,23]
        [--budgets 64,16] [--llm-width 1024] [--threads 1] [--repeats 5] [--json out.json]

The limit is ``dcp stage / tower < 1`` at every depth, the saving growing with depth.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from timing import median_ms  # bench/ is the script's directory

PROMPT_NOUNS = 3  # noun embeddings TATCS compares with


def build_tower(width: int, heads: int, depth: int, seed: int = 0):
    """A CLIP-L/336-shaped tower (14 px patches, 577 tokens) of ``depth`` layers up to
    the feature layer, with one layer after it as in LLaVA."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from vllm_vtprune.families.llava import HfClipTower

    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width,
                           num_attention_heads=heads, num_hidden_layers=depth + 1,
                           image_size=336, patch_size=14, projection_dim=width)
    torch.manual_seed(seed)
    model = CLIPVisionModel(cfg).eval()
    return HfClipTower(getattr(model, "vision_model", model), cfg, -2)  # transformers 4 / 5


def pixels():
    from transformers import CLIPImageProcessor

    from vllm_vtprune.data import shapes_vqa as sv

    image = sv.make_sample(sv.split_of("hard").heldout_seed, 0, split="hard").image
    proc = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size=336)
    return proc(images=[image], return_tensors="pt")["pixel_values"]


def measure(tower, project, px, text, budgets, repeats) -> dict:
    from vllm_vtprune import pipeline
    from vllm_vtprune import spec as spec_mod

    row = {"tower_ms": median_ms(lambda: pipeline.run_layers(
        tower, tower.embed(px), 0, tower.num_layers), repeats)}
    row["vanilla_stage_ms"] = median_ms(
        lambda: pipeline.prune_image(tower, project, px, None, text), repeats)
    for k in budgets:
        spec = spec_mod.parse(f"dcp:{k}")
        row[f"dcp{k}_ms"] = median_ms(
            lambda: pipeline.prune_image(tower, project, px, spec, text), repeats)
        row[f"dcp{k}_tatcs"] = used_tatcs(tower, project, px, spec, text)
    return row


def used_tatcs(tower, project, px, spec, text) -> bool:
    """Whether the last stage switched to TATCS (its output is then a plain subset of the
    stage's raw tokens, which ACGR's graph update never gives)."""
    from vllm_vtprune.methods import dcp

    calls = []
    original = dcp._tatcs

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dcp._tatcs = spy
    try:
        from vllm_vtprune import pipeline

        pipeline.prune_image(tower, project, px, spec, text)
    finally:
        dcp._tatcs = original
    return bool(calls)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depths", default="3,7,11,15,19,23")
    p.add_argument("--budgets", default="64,16")
    p.add_argument("--llm-width", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    torch.manual_seed(1)
    project = torch.nn.Linear(args.width, args.llm_width).eval()
    text = torch.randn(PROMPT_NOUNS, args.llm_width)
    px = pixels()
    rows = []
    with torch.no_grad():
        for depth in [int(d) for d in args.depths.split(",")]:
            row = {"depth": depth, **measure(build_tower(args.width, args.heads, depth),
                                             project, px, text, budgets, args.repeats)}
            rows.append(row)
            print(format_row(row, budgets), flush=True)
    print(f"width {args.width}, {args.heads} heads, {args.threads} thread(s), median of "
          f"{args.repeats}; limit: dcp stage / tower < 1 at every depth")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2)
                                   + "\n")


def format_row(row: dict, budgets) -> str:
    parts = [f"depth {row['depth']:>2}: tower {row['tower_ms']:7.1f} ms, vanilla stage "
             f"{row['vanilla_stage_ms']:7.1f} ms"]
    for k in budgets:
        ratio = row[f"dcp{k}_ms"] / row["tower_ms"]
        tatcs = " TATCS" if row[f"dcp{k}_tatcs"] else ""
        parts.append(f"dcp:{k} {row[f'dcp{k}_ms']:7.1f} ms ({ratio:.2f}x tower{tatcs})")
    return "; ".join(parts)


if __name__ == "__main__":
    main()
