"""Decoding speed: cpmctl greedy and beam search against transformers' CpmAntForCausalLM.generate.

Both run the same random weights (a cpmctl model converted with `checkpoint.convert(..., to="hf")`), the same prompt
and the same number of new tokens. HF is forced to produce exactly N tokens (min_new_tokens = max_new_tokens = N,
eos suppressed). cpmctl's beam search, like the original, spends one extra step to score its last candidates: it
is asked for N - 1 tokens so that it returns N (see docs/generate.md), and the step count it pays for is the same as
HF's plus one. The script first checks that both produce the same token ids, then prints tokens/s and the ratio.

    python bench/generate.py                       # ~100M parameters, CPU fp32, 64 new tokens
    python bench/generate.py --device cuda --dtype bf16 --new-tokens 128
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

from cpmctl.generate.decode import GenerationConfig, beam_search, build_inputs, greedy  # noqa: E402
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
    p.add_argument("--prompt-tokens", type=int, default=32, help="Text tokens in the prompt (after <s>).")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="Timed runs per contender; the best is reported.")
    p.add_argument("--modes", default="greedy,beam")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice).")
    p.add_argument("--json", action="store_true", help="Also print one JSON object per mode.")
    return p.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int):
    """Best wall time of `repeats` runs after one warm-up run, the last result, and the peak memory (CUDA)."""
    result = fn()
    best = float("inf")
    peak = None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
    return best, result, peak


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

    gen = torch.Generator().manual_seed(args.seed + 1)
    text = [BOS] + torch.randint(10, min(args.vocab_size, 30000), (args.prompt_tokens,), generator=gen).tolist()
    hf_input = torch.tensor([text], device=device)
    n = args.new_tokens
    print(f"model: {counts['total'] / 1e6:.1f}M parameters ({config.num_layers} layers, dim {config.dim_model}), "
          f"{args.device} {args.dtype}, threads {torch.get_num_threads()}; prompt {len(text)} tokens, {n} new tokens")

    rows = []
    for mode in args.modes.split(","):
        if mode == "greedy":
            cfg = GenerationConfig(decode="greedy", max_new_tokens=n)
            run_ours = lambda: greedy(ours, build_inputs(ours, [text]), cfg)[0]  # noqa: E731
            hf_kwargs = dict(num_beams=1)
        elif mode == "beam":
            # The original's beam returns up to max_new_tokens + 1 tokens; no first-step ban so HF can match it.
            cfg = GenerationConfig(decode="beam", beam_size=args.beam_size, max_new_tokens=n - 1, ban_first_step=False)
            run_ours = lambda: beam_search(ours, build_inputs(ours, [text]), cfg)[0]  # noqa: E731
            hf_kwargs = dict(num_beams=args.beam_size, length_penalty=1.0, early_stopping=False)
        else:
            raise SystemExit(f"unknown mode {mode}")

        def run_hf():
            with torch.no_grad():
                out = hf.generate(hf_input, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=EOS,
                                  pad_token_id=0, **hf_kwargs)
            return out[0, len(text):].tolist()

        # Interleave so that load from other processes hits both sides alike.
        t_ours, t_hf, ids_ours, ids_hf, peak_ours, peak_hf = float("inf"), float("inf"), None, None, None, None
        for _ in range(max(1, args.repeats)):
            t, ids_hf, peak_hf = timed(run_hf, device, 1)
            t_hf = min(t_hf, t)
            t, ids_ours, peak_ours = timed(run_ours, device, 1)
            t_ours = min(t_ours, t)
        same = ids_ours == ids_hf
        tps_ours, tps_hf = len(ids_ours) / t_ours, len(ids_hf) / t_hf
        row = {
            "mode": mode, "device": args.device, "dtype": args.dtype, "params": counts["total"],
            "new_tokens_cpmctl": len(ids_ours), "new_tokens_hf": len(ids_hf), "same_ids": same,
            "cpmctl_tokens_per_s": round(tps_ours, 2), "hf_tokens_per_s": round(tps_hf, 2),
            "ratio": round(tps_ours / tps_hf, 3),
        }
        if peak_ours is not None:
            row["cpmctl_peak_mib"] = round(peak_ours / 2**20, 1)
            row["hf_peak_mib"] = round(peak_hf / 2**20, 1)
        rows.append(row)
        mem = f", peak memory {row['cpmctl_peak_mib']} MiB vs {row['hf_peak_mib']} MiB" if peak_ours else ""
        print(f"{mode:7s} cpmctl {tps_ours:8.2f} tok/s  hf {tps_hf:8.2f} tok/s  ratio {row['ratio']:.2f}x  "
              f"(tokens {len(ids_ours)} vs {len(ids_hf)}, same ids: {'yes' if same else 'NO'}{mem})")
        if not same and dtype != torch.float32:
            print("        (half precision: the two implementations round differently, so long greedy/beam paths may "
                  "part; in fp32 the ids must be equal)")
        if args.json:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
