"""Serving throughput: tokens/s of `cpmctl serve` with 1, 4 and 16 concurrent clients, as a ratio to 1 client, and
request latency p50 / p95.

The server is the real command in a subprocess (its own process, so the clients' threads do not share its GIL),
on a loopback port, with a random model of the given shape saved with a generated vocabulary. The model's </s>
embedding is zeroed, so </s> is never the greedy choice and every request generates exactly --max-tokens
tokens: each level does the same work per request. Clients are threads of this process, each sending greedy
/v1/completions requests one after the other through the official openai client; a level sends
max(--requests, 2 x clients) requests. tokens/s = completion tokens / wall time of the level.

The goal (issue 18): at 16 clients at least 3x the tokens/s of 1 client on CPU for a small model, because one
decode step reads the weights once for every sequence in the batch.

    python bench/serve.py                        # ~20M parameters, CPU
    python bench/serve.py --dim-model 768 --num-layers 12 --dim-ff 2048 --levels 1,4,16 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpmctl.model.ant import build_model, param_counts  # noqa: E402
from cpmctl.model.checkpoint import save_native  # noqa: E402
from cpmctl.model.config import CPMAntConfig  # noqa: E402
from cpmctl.model.tokenizer import EOS, SPECIAL_TOKENS  # noqa: E402

CJK_START = 0x4E00


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim-model", type=int, default=384)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=6)
    p.add_argument("--dim-head", type=int, default=64)
    p.add_argument("--dim-ff", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=16000, help="specials, ASCII, then CJK characters in order")
    p.add_argument("--levels", default="1,4,16", help="concurrent clients, comma-separated (the first is the base)")
    p.add_argument("--requests", type=int, default=16, help="requests per level at least (2 x clients if more)")
    p.add_argument("--prompt-chars", type=int, default=24, help="random CJK characters per prompt")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads (OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="Also print one JSON object per level.")
    return p.parse_args()


def write_vocab(path: Path, size: int) -> list[str]:
    tokens = list(SPECIAL_TOKENS) + [chr(c) for c in range(33, 127)]
    tokens += [chr(CJK_START + i) for i in range(size - len(tokens))]
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return tokens[len(SPECIAL_TOKENS) + 94:]


def start_server(ckpt: Path, args) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cpmctl", "serve", "--model", str(ckpt), "--device", "cpu", "--port", "0", "--json",
         "--max-batch", str(args.max_batch), "--max-queue", "256", "--max-tokens", str(args.max_tokens)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    banner = json.loads(proc.stdout.readline())
    return proc, banner["url"]


def run_level(client, prompts: list[str], clients: int, max_tokens: int) -> dict:
    def one(prompt: str) -> tuple[float, int]:
        start = time.perf_counter()
        reply = client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0)
        return time.perf_counter() - start, reply.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"clients": clients, "requests": len(prompts), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]}


def main():
    args = parse_args()
    import openai

    config = CPMAntConfig(vocab_size=args.vocab_size, dim_model=args.dim_model, dim_ff=args.dim_ff,
                          num_layers=args.num_layers, num_heads=args.num_heads, dim_head=args.dim_head, half=False)
    levels = [int(x) for x in args.levels.split(",")]
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        chars = write_vocab(Path(tmp) / "vocab.txt", args.vocab_size)
        model = build_model(config, seed=args.seed)
        with torch.no_grad():
            model.input_embedding.weight[EOS] = 0  # never the best token: every request runs to max_tokens
        ckpt = save_native(model, Path(tmp) / "bench", vocab=Path(tmp) / "vocab.txt")
        proc, url = start_server(ckpt, args)
        try:
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
            client.completions.create(model="bench", prompt="一", max_tokens=2, temperature=0)  # warm-up
            print(f"model: {param_counts(config)['total'] / 1e6:.1f}M parameters ({config.num_layers} layers, dim "
                  f"{config.dim_model}, vocab {config.vocab_size}); server --max-batch {args.max_batch}, "
                  f"threads {args.threads or 'default'}; {args.max_tokens} tokens per request, greedy; "
                  f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
            base = None
            for clients in levels:
                n = max(args.requests, 2 * clients)
                prompts = ["".join(rng.choice(chars[:2000]) for _ in range(args.prompt_chars)) for _ in range(n)]
                row = run_level(client, prompts, clients, args.max_tokens)
                base = base or row["tokens_per_s"]
                row["ratio_to_first"] = row["tokens_per_s"] / base
                print(f"{clients:3d} clients: {row['tokens_per_s']:8.1f} tokens/s  x{row['ratio_to_first']:.2f}  "
                      f"p50 {row['p50_s']:.3f} s  p95 {row['p95_s']:.3f} s  ({row['requests']} requests, "
                      f"{row['wall_s']:.1f} s)")
                if args.json:
                    print(json.dumps(row))
        finally:
            proc.terminate()
            proc.wait(timeout=120)


if __name__ == "__main__":
    main()
