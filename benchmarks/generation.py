"""Generation speed: lmdistill's lean decode loop (`lmdistill.models.decode`) against `transformers`' `generate`,
the two backends of `lmdistill.models.generation.generate_replies`, on the same models and prompts.

    python benchmarks/generation.py            # writes benchmarks/results/generation_<device>.json

Batch 8 left-padded prompts (8 to 24 tokens), 64 new tokens with no stop token (so both do the same number of
steps), greedy and sampled (temperature 1, without and with top-p 0.95), fp32, the presets `nano` and `micro` built with the
MiniMind tokenizer (6,400 tokens). Each measurement is the median of 5 calls after one warm-up, the backends
alternating. Greedy outputs are checked equal token for token.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "minimind_tokenizer"


def measure(model, tok, prompts, backend: str, temperature: float, top_p: float) -> tuple[float, list]:
    from lmdistill.models.generation import generate_replies

    stops = [-1]  # no stop: every call runs all 64 steps
    t0 = time.perf_counter()
    replies = generate_replies(model, tok, prompts, max_new_tokens=64, batch_size=len(prompts), eos_token_ids=stops,
                               temperature=temperature, top_p=top_p, backend=backend,
                               progress=False)
    return time.perf_counter() - t0, replies


def main() -> None:
    from lmdistill.models import load_model
    from lmdistill.tokenizer import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if not TOKENIZER.is_dir():
        print(f"skipped: {TOKENIZER} not present")
        return
    tok = load_tokenizer(TOKENIZER)
    prompts = [[(7 * i + j) % 6000 + 100 for j in range(8 + 2 * i)] for i in range(8)]
    rows = []
    for preset in ("nano", "micro"):
        torch.manual_seed(0)
        model = load_model(preset, tokenizer=tok, verbose=False).eval()
        for temperature, top_p in ((0.0, 1.0), (1.0, 1.0), (1.0, 0.95)):
            times = {"lean": [], "hf": []}
            for backend in ("lean", "hf"):
                measure(model, tok, prompts, backend, temperature, top_p)  # warm-up
            for _ in range(5):
                for backend in ("lean", "hf"):
                    seconds, replies = measure(model, tok, prompts, backend, temperature, top_p)
                    times[backend].append(seconds)
                    if temperature == 0.0:
                        times.setdefault(f"{backend}_replies", replies)
            same = times.pop("lean_replies", None) == times.pop("hf_replies", None) if temperature == 0.0 else None
            lean, hf = statistics.median(times["lean"]), statistics.median(times["hf"])
            sampling = "greedy" if temperature == 0 else "temperature 1" if top_p == 1 else f"top-p {top_p:g}"
            rows.append({"model": preset, "sampling": sampling,
                         "lean_seconds": lean, "hf_seconds": hf, "tokens_per_sec_lean": 8 * 64 / lean,
                         "tokens_per_sec_hf": 8 * 64 / hf, "speedup": hf / lean, "greedy_equal": same,
                         "all_lean_seconds": times["lean"], "all_hf_seconds": times["hf"]})
    print("| model | sampling | lean tokens/s | generate tokens/s | lean vs generate | greedy equal |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['sampling']} | {r['tokens_per_sec_lean']:.0f} | {r['tokens_per_sec_hf']:.0f} | "
              f"{r['speedup']:.2f}x | {r['greedy_equal'] if r['greedy_equal'] is not None else '-'} |")
    out = Path(a.out or Path(__file__).parent / "results" / "generation_cpu.json")
    machine = {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
