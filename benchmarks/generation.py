"""Generation speed: lmdistill's lean decode loop (`lmdistill.models.decode`) against `transformers`' `generate`,
the two backends of `lmdistill.models.generation.generate_replies`, on the same models and prompts.

    python benchmarks/generation.py                 # CPU, fp32 -> benchmarks/results/generation_cpu.json
    python benchmarks/generation.py --device cuda   # bf16, CUDA events, peak GPU memory -> results/generation_cuda.json

Batch 8 left-padded prompts (8 to 24 tokens), 64 new tokens with no stop token (so both do the same number of
steps), greedy and sampled (temperature 1, without and with top-p 0.95), fp32 on CPU and bf16 weights by default on
CUDA (`--dtype`), the presets `nano` and `micro` built with the MiniMind tokenizer (6,400 tokens). Each measurement is
the median of 5 calls after one warm-up, the backends alternating; wall clock on CPU, CUDA events on a GPU, where each
row also holds the peak allocated memory of each backend's calls (torch.cuda.max_memory_allocated after
reset_peak_memory_stats). Greedy outputs are checked equal token for token.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from device import DATA_DIR, Clock, Memory, add_device_options, is_cuda, machine_record, resolve, results_path

TOKENIZER = DATA_DIR / "minimind_tokenizer"


def measure(model, tok, prompts, backend: str, temperature: float, top_p: float, clock: Clock) -> tuple[float, list]:
    from lmdistill.models.generation import generate_replies

    stops = [-1]  # no stop: every call runs all 64 steps
    clock.start()
    replies = generate_replies(model, tok, prompts, max_new_tokens=64, batch_size=len(prompts), eos_token_ids=stops,
                               temperature=temperature, top_p=top_p, backend=backend,
                               progress=False)
    return clock.stop(), replies


def main() -> None:
    from lmdistill.models import load_model
    from lmdistill.tokenizer import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_device_options(p)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dtype = resolve(p, a.device, a.dtype)
    torch.set_num_threads(a.threads)
    clock, memory = Clock(a.device), Memory(a.device)
    if not TOKENIZER.is_dir():
        print(f"skipped: {TOKENIZER} not present")
        return
    tok = load_tokenizer(TOKENIZER)
    prompts = [[(7 * i + j) % 6000 + 100 for j in range(8 + 2 * i)] for i in range(8)]
    rows = []
    for preset in ("nano", "micro"):
        torch.manual_seed(0)
        where = a.device if is_cuda(a.device) else None  # on CPU built exactly as before
        model = load_model(preset, tokenizer=tok, dtype=dtype if is_cuda(a.device) else None, device=where,
                           verbose=False).eval()
        for temperature, top_p in ((0.0, 1.0), (1.0, 1.0), (1.0, 0.95)):
            times, peaks = {"lean": [], "hf": []}, {"lean": [], "hf": []}
            for backend in ("lean", "hf"):
                measure(model, tok, prompts, backend, temperature, top_p, clock)  # warm-up
            for _ in range(5):
                for backend in ("lean", "hf"):
                    memory.reset()
                    seconds, replies = measure(model, tok, prompts, backend, temperature, top_p, clock)
                    times[backend].append(seconds)
                    peaks[backend].append(memory.peak())
                    if temperature == 0.0:
                        times.setdefault(f"{backend}_replies", replies)
            same = times.pop("lean_replies", None) == times.pop("hf_replies", None) if temperature == 0.0 else None
            lean, hf = statistics.median(times["lean"]), statistics.median(times["hf"])
            sampling = "greedy" if temperature == 0 else "temperature 1" if top_p == 1 else f"top-p {top_p:g}"
            rows.append({"model": preset, "sampling": sampling,
                         "lean_seconds": lean, "hf_seconds": hf, "tokens_per_sec_lean": 8 * 64 / lean,
                         "tokens_per_sec_hf": 8 * 64 / hf, "speedup": hf / lean, "greedy_equal": same,
                         "all_lean_seconds": times["lean"], "all_hf_seconds": times["hf"]})
            if is_cuda(a.device):  # a CPU process's RSS peak would not tell the two backends apart
                rows[-1].update(peak_mb_lean=max(peaks["lean"]), peak_mb_hf=max(peaks["hf"]))
    print("| model | sampling | lean tokens/s | generate tokens/s | lean vs generate | greedy equal |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['sampling']} | {r['tokens_per_sec_lean']:.0f} | {r['tokens_per_sec_hf']:.0f} | "
              f"{r['speedup']:.2f}x | {r['greedy_equal'] if r['greedy_equal'] is not None else '-'} |")
    out = results_path("generation", a.device, out=a.out)
    machine = {**machine_record(a.device, dtype), "threads": torch.get_num_threads()}
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
