"""Whether encoding the images of an encoder step together is faster than one at a time.

The served pipeline runs the vision tower per image, which keeps a request's kept set
independent of what it is batched with by construction. Batching pays only where the
tower's matrix products are too small to keep the cores busy one image at a time. This
times, in one run, B copies of an image through a CLIP-336/14 tower (random weights,
3 layers) looped one at a time and as one batch, at 1 and 2 threads, and reports whether
the batched outputs are bitwise those of the image alone on this CPU (which BLAS does not
promise across CPUs).

    python bench/encoder_batch.py [--widths 64,256] [--batches 4,8] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv=None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dcp_tower import build_tower, pixels
    from timing import median_ms

    from vllm_vtprune import pipeline

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="64,256")
    p.add_argument("--batches", default="4,8")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    px = pixels()
    print("| threads | width | images | one at a time ms | batched ms | batched / looped "
          "| batched rows bitwise alone's |\n|---|---|---|---|---|---|---|")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for width in [int(w) for w in args.widths.split(",")]:
            tower = build_tower(width, 4, 3)
            run = lambda x: pipeline.run_layers(tower, tower.embed(x), 0,  # noqa: E731
                                                tower.num_layers)
            for b in [int(x) for x in args.batches.split(",")]:
                batch = px.repeat(b, 1, 1, 1)
                with torch.no_grad():
                    looped = median_ms(lambda: [run(batch[i:i + 1]) for i in range(b)],
                                   args.repeats)
                    together = median_ms(lambda: run(batch), args.repeats)
                    alone, out = run(batch[:1]), run(batch)
                same = all(torch.equal(alone[0], out[i]) for i in range(b))
                print(f"| {threads} | {width} | {b} | {looped:.1f} | {together:.1f} | "
                      f"{together / looped:.2f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
