"""Temporary GPU check for cpmctl eval (deleted after the run)."""
import json, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, "tests")
import torch
from conftest import tiny_config
from cpmctl.model.ant import build_model
from cpmctl.model.checkpoint import save_native
from cpmctl.model.tokenizer import CPMAntTokenizer

root = Path(sys.argv[1]); root.mkdir(parents=True, exist_ok=True)
V = "tests/fixtures/tasks/vocab.txt"
tok = CPMAntTokenizer(V)
save_native(build_model(tiny_config(tok.vocab_size, dim_model=256, dim_ff=512, num_layers=4, num_heads=4, dim_head=64), seed=0), root / "m", vocab=V)
texts = [json.loads(l)["input"] for t in ("lcsts", "kdconv", "c3") for s in ("train", "dev", "test") for l in open(f"tests/fixtures/tasks/{t}/{s}.jsonl")]
(root / "docs.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts * 20))

def cli(*a):
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "cpmctl", *map(str, a)], capture_output=True, text=True)
    if r.returncode: print(r.stderr); raise SystemExit(r.returncode)
    return r.stdout, time.time() - t

for dev, dt in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16")):
    o, s = cli("eval", "ppl", "--model", root / "m", "--data", root / "docs.jsonl", "--device", dev, "--dtype", dt, "--batch-size", "16", "--json")
    print("ppl", dev, dt, o.strip(), f"{s:.1f}s")
preds = {}
for dev in ("cpu", "cuda"):
    for task in ("lcsts", "ccpm", "sogou-log"):
        o, s = cli("eval", "--task", task, "--data", f"tests/fixtures/tasks/{task}", "--model", root / "m", "--device", dev, "--out", root / f"{task}-{dev}", "--json", "--max-new-tokens", "8")
        preds[task, dev] = [json.loads(l)["prediction"] for l in open(root / f"{task}-{dev}" / "predictions.jsonl")]
        print(task, dev, o.strip(), f"{s:.1f}s")
for task in ("lcsts", "ccpm", "sogou-log"):
    a, b = preds[task, "cpu"], preds[task, "cuda"]
    same = all(abs(x - y) < 1e-3 for x, y in zip(a, b)) if task == "sogou-log" else a == b
    print("cpu == cuda", task, same)
