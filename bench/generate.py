"""Decoding speed: cpmctl greedy and beam search against transformers' CpmAntForCausalLM.generate.

Both run the same random weights (a cpmctl model converted with `checkpoint.convert(..., to="hf")`), the same prompt
and the same number of new tokens. HF is forced to produce exactly N tokens (min_new_tokens = max_new_tokens = N,
eos suppressed). cpmctl's beam search, like the original, spends one extra step scoring its last candidates and
returns up to max_new_tokens + 1 tokens: it is asked for N - 1 so that both return N (docs/generate.md). The
script checks that both produce the same ids, then prints tokens/s and the ratio (best of --repeats, runs
interleaved). On the CPU it also prints the ratio of process CPU time, which other load on a shared machine
disturbs much less than wall time (exact with --threads 1).

Two workloads by default: a short prompt (32 tokens, 64 new) and a summarization-like one (256-token prompt, 64
new, as LCSTS tuning and evaluation decode).

    python bench/generate.py                                  # ~100M parameters, CPU fp32
    python bench/generate.py --threads 1 --workloads 32:128
    python bench/generate.py --device cuda --dtype bf16 --workloads 32:128,256:128
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpmctl.generate.decode import beam_search, greedy  # noqa: E402
from cpmctl.model.generation_config import GenerationConfig  # noqa: E402
from cpmctl.model.inputs import build_inputs  # noqa: E402
from cpmctl.model.ant import build_model, param_counts  # noqa: E402
from cpmctl.model.checkpoint import convert, save_native  # noqa: E402
from cpmctl.model.config import CPMAntConfig  # noqa: E402
from cpmctl.model.tokenizer import BOS, EOS  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim-model", type=int, default=768)
    p.add_argument("--num-layers", type=int, default=12)
    p.add_argument("--num-heads", type=int, default=12)
    p.add_argument("--dim-head", type=int, default=64)
    p.add_argument("--dim-ff", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=30720)
    p.add_argument("--workloads", default="32:64,256:64", help="PROMPT_TOKENS:NEW_TOKENS pairs, comma-separated.")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--modes", default="greedy,beam")
    p.add_argument("--repeats", type=int, default=2, help="Timed runs per contender after one warm-up; best kept.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="Also print one JSON object per measurement.")
    return p.parse_args()


def measure(fn, device):
    """(wall seconds, process CPU seconds, result, peak CUDA bytes or None) of one run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return wall, cpu, result, peak


def contenders(mode, ours, hf, text, n, beam_size, device):
    hf_input = torch.tensor([text], device=device)
    if mode == "greedy":
        cfg = GenerationConfig(decode="greedy", max_new_tokens=n)
        hf_kwargs = dict(num_beams=1)
        decode = greedy
    elif mode == "beam":
        # No first-step ban here, so that HF (which has none) can take the same path.
        cfg = GenerationConfig(decode="beam", beam_size=beam_size, max_new_tokens=n - 1, ban_first_step=False)
        hf_kwargs = dict(num_beams=beam_size, length_penalty=1.0, early_stopping=False)
        decode = beam_search
    else:
        raise SystemExit(f"unknown mode {mode}")

    def run_ours():
        return decode(ours, build_inputs(ours, [text]), cfg)[0]

    def run_hf():
        with torch.no_grad():
            out = hf.generate(hf_input, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=EOS,
                              pad_token_id=0, **hf_kwargs)
        return out[0, len(text):].tolist()

    return run_ours, run_hf


def main():
    args = parse_args()
    warnings.filterwarnings("ignore")
    from transformers import CpmAntForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    config = CPMAntConfig(
        vocab_size=args.vocab_size, dim_model=args.dim_model, dim_ff=args.dim_ff, num_layers=args.num_layers,
        num_heads=args.num_heads, dim_head=args.dim_head, half=False,
    )
    counts = param_counts(config)
    ours = build_model(config, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        save_native(ours, Path(tmp) / "native")
        convert(Path(tmp) / "native", "hf", Path(tmp) / "hf")
        hf = CpmAntForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=dtype)
    ours = ours.to(device=device, dtype=dtype).eval()
    hf = hf.to(device).eval()
    print(f"model: {counts['total'] / 1e6:.1f}M parameters ({config.num_layers} layers, dim {config.dim_model}, "
          f"vocab {config.vocab_size}); {args.device} {args.dtype}, threads {torch.get_num_threads()}")

    gen = torch.Generator().manual_seed(args.seed + 1)
    for workload in args.workloads.split(","):
        prompt_tokens, n = (int(x) for x in workload.split(":"))
        text = [BOS] + torch.randint(10, min(args.vocab_size, 30000), (prompt_tokens,), generator=gen).tolist()
        for mode in args.modes.split(","):
            run_ours, run_hf = contenders(mode, ours, hf, text, n, args.beam_size, device)
            run_hf(), run_ours()  # warm-up
            best = {"ours": [float("inf")] * 2, "hf": [float("inf")] * 2}
            results, peaks = {}, {}
            # Interleaved, so that load from other processes hits both sides alike.
            for _ in range(max(1, args.repeats)):
                for name, fn in (("hf", run_hf), ("ours", run_ours)):
                    wall, cpu, results[name], peaks[name] = measure(fn, device)
                    best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
            ids_ours, ids_hf = results["ours"], results["hf"]
            tps_ours, tps_hf = len(ids_ours) / best["ours"][0], len(ids_hf) / best["hf"][0]
            row = {
                "mode": mode, "prompt_tokens": len(text), "new_tokens": n, "device": args.device, "dtype": args.dtype,
                "threads": torch.get_num_threads(), "params": counts["total"],
                "new_tokens_cpmctl": len(ids_ours), "new_tokens_hf": len(ids_hf), "same_ids": ids_ours == ids_hf,
                "cpmctl_tokens_per_s": round(tps_ours, 2), "hf_tokens_per_s": round(tps_hf, 2),
                "ratio": round(tps_ours / tps_hf, 3),
            }
            extra = ""
            if device.type == "cpu":
                row["cpu_time_ratio"] = round((best["hf"][1] / len(ids_hf)) / (best["ours"][1] / len(ids_ours)), 3)
                extra = f", CPU-time ratio {row['cpu_time_ratio']:.2f}x"
            else:
                row["cpmctl_peak_mib"] = round(peaks["ours"] / 2**20, 1)
                row["hf_peak_mib"] = round(peaks["hf"] / 2**20, 1)
                extra = f", peak memory {row['cpmctl_peak_mib']} MiB vs {row['hf_peak_mib']} MiB"
            print(f"{mode:6s} prompt {len(text):4d} new {n:4d}: cpmctl {tps_ours:8.2f} tok/s  hf {tps_hf:8.2f} tok/s  "
                  f"ratio {row['ratio']:.2f}x{extra}  (tokens {len(ids_ours)}/{len(ids_hf)}, "
                  f"same ids: {'yes' if row['same_ids'] else 'NO'})")
            if not row["same_ids"] and dtype != torch.float32:
                print("       half precision: the two round differently, so long paths may part; in fp32 they must not")
            if args.json:
                print(json.dumps(row))


if __name__ == "__main__":
    main()
