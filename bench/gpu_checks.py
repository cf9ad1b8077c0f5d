"""The GPU checks of issues 14 and 17 in one prepared run: each check isolated, every number in one JSON file.

Device time is scarce, so this is one script run once. Each check runs its commands as subprocesses with a timeout
(cut to what is left of --budget); a failing, timed-out or skipped check is recorded and the next one runs.
Results go to OUT/gpu_checks.json (rewritten after every check, so a run killed from outside keeps what it had),
raw stdout / stderr per command to OUT/logs/, the small outputs of the runs (metrics.jsonl, reports) to
OUT/artifacts/; big files (checkpoints, data) stay in --work, a temporary folder removed at the end.

    PYTHONPATH=. python bench/gpu_checks.py --out $OUT                      # on the GPU machine (~8 minutes)
    python bench/gpu_checks.py --device cpu --small --out /tmp/gpucheck     # smoke test, tiny configs, CPU
    python bench/gpu_checks.py --out $OUT --only train_flex,bench_memory_3b # a rerun of some checks

The checks, in order (a check whose inputs failed is skipped; the last ones run only if the budget allows):
- env: versions, the GPU, which of cpmctl's dependencies import.
- vocab, data, model_init: a vocabulary of the lcsts task's characters plus filler tokens (30,720 in all, the
  real vocab size), synthetic packed rows of 1024 tokens (tests/synthetic.py), `cpmctl model init --config 1b`.
- prune_fsdp (issue 14): `cpmctl prune --from 1b --to 300m` method learned, mask.engine / recovery.engine fsdp,
  bf16, on one rank under torchrun; each phase's metrics.jsonl memory_mb (torch.cuda.max_memory_allocated, MiB)
  next to the planner's peak_bytes for the same overrides (`--dry-run --nproc 1 --json`).
- lora_fsdp (issue 14): `cpmctl tune lora --task lcsts` train.engine fsdp, tune.base_dtype bf16, one rank; the
  same comparison.
- flex_pytest (issue 17): `pytest tests/test_flex_attention.py -k cuda` (FlexAttention vs SDPA on CUDA).
- train_sdpa, train_flex (issue 17): bench/train.py --preset 1b (1.03B dense), bf16, batch 8 x 1024: tokens/s
  and MFU; train_*_compile the same with --compile (last, when time is left).
- generate_limit_4, generate_limit_half (issue 17): `cpmctl generate`'s code path (prepare_generation and its
  results, in-process to read the peak) on the 1b checkpoint in fp16 with --memory-limit 4 (everything resident:
  the decode rate against the HBM bound) and with half the weights' bytes (blocks stream: the copy rate against
  the pinned host-to-device bandwidth measured in the same process).
- bench_generate (issue 17): bench/generate.py batch-1 greedy in bf16 against the bandwidth bound and HF.
- bench_memory_3b (issue 17): bench/memory.py --config 3b --dtype fp16 --limit 4: cpmctl's streaming against
  accelerate's dispatch_model at the same limit, peak below the limit.
- int4_decode (issue 17, GPU item 3): `--quantize int4` on CUDA, on a small random model (dims multiples of 128):
  greedy ids of the CUDA int4 model against the CPU int4 path's (the same weights; the two kernels sum in another
  order, so a few ids may part), teacher-forced max |logit diff|, batch-1 tokens/s (int4 in fp32 and bf16, bf16
  without int4), streamed int4 ids against resident int4 (must be equal) with the peak under the limit, and the
  planner's 10b plan at 4 GB in fp16 (int8 and int4).

- prune_bench_wide (issue 19): bench/prune.py --ladder wide (the mini ladder at 4x the width, 98M parameters at
  the top, pretrained 800 steps on the GPU), five stages, five arms, seeds 0-2 one at a time; needs a session of
  its own: `--only prune_bench_wide --budget 540`.

--small swaps every config for a tiny one (the mini ladder, short rows, a few steps) so the whole script runs on a
CPU in minutes; its numbers only show that the plumbing works.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # cpmctl and tests/ from the source tree, as the other benches
TASK_DATA = ROOT / "cpmctl" / "assets" / "tasks" / "lcsts-mini"
MIB = 2**20
RESULT_MARK = "GPU_CHECKS_RESULT "  # a worker's last stdout line: this mark and one JSON object


# ----- settings: the full run and the --small smoke test ------------------------------------------------------
def settings(small: bool, device: str) -> dict:
    """Every size the checks use; --small swaps them for tiny ones."""
    if small:
        return dict(
            vocab_size=0,  # the task's characters only
            rows=24, seq_len=128, model="mini-1b", prune_from="mini-1b", prune_to="mini-300m",
            mask_steps=2, recovery_steps=2, prune_batch=2,
            lora_max_length=160, lora_batch=2, lora_steps=2, lora_dev=2, lora_new_tokens=4,
            train_preset="mini-1b", train_batch=2, train_seq=128, train_rounds=1, train_steps=1,
            gen_dtype="fp32", gen_new_tokens=6,
            bench_gen_dims=["--dim-model", "64", "--num-layers", "2", "--num-heads", "2", "--dim-head", "32",
                            "--dim-ff", "128", "--vocab-size", "2000"], bench_gen_workload="8:6",
            memory_config="mini-3b", memory_dtype="fp32", memory_limit=0.014, memory_new_tokens=4,
            int4_dims=dict(vocab_size=2000, dim_model=128, dim_ff=256, num_layers=3, num_heads=2, dim_head=64),
            int4_new_tokens=6,
            prune_bench=["--ladder", "micro", "--stages", "1", "--pretrain-steps", "4", "--mask-steps", "2",
                         "--recovery-steps", "2", "--eval-batches", "2", "--train-rows", "200"],
            prune_bench_arms="activation:joint-width,magnitude", prune_bench_seeds=2,
        )
    return dict(
        vocab_size=30720,
        rows=48, seq_len=1024, model="1b", prune_from="1b", prune_to="300m",
        mask_steps=6, recovery_steps=4, prune_batch=2,
        lora_max_length=256, lora_batch=8, lora_steps=4, lora_dev=4, lora_new_tokens=8,
        train_preset="1b", train_batch=8, train_seq=1024, train_rounds=2, train_steps=3,
        gen_dtype="fp16" if device.startswith("cuda") else "fp32", gen_new_tokens=64,
        # the dense 1.03B shape of bench/train.py's 1b preset
        bench_gen_dims=["--dim-model", "2048", "--num-layers", "20", "--num-heads", "16", "--dim-head", "128",
                        "--dim-ff", "5120", "--vocab-size", "30720"], bench_gen_workload="32:128",
        memory_config="3b", memory_dtype="fp16" if device.startswith("cuda") else "fp32", memory_limit=4.0,
        memory_new_tokens=16,
        int4_dims=dict(vocab_size=30720, dim_model=1024, dim_ff=2560, num_layers=8, num_heads=8, dim_head=128),
        int4_new_tokens=32,
        # issue 19's ~100M run: the mini ladder at 4x the width (98M at the top), pretrained on the GPU
        prune_bench=["--ladder", "wide", "--stages", "5", "--pretrain-steps", "800"],
        prune_bench_arms="activation:joint-width,activation,learned,magnitude,random", prune_bench_seeds=3,
    )


# ----- running commands ---------------------------------------------------------------------------------------
class Runner:
    """Subprocesses with a deadline: logs per command, the whole process group killed on a timeout."""

    def __init__(self, out: Path, budget_s: float):
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.history: list[dict] = []  # the commands of the running check

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, label: str, argv: list[str], timeout: float) -> dict:
        """Run argv; returns rc, wall_s, timed_out, the log paths and the stdout / stderr text."""
        out_path, err_path = self.logs / f"{label}.stdout", self.logs / f"{label}.stderr"
        timeout = max(1.0, min(timeout, self.left()))
        started = time.monotonic()
        with open(out_path, "w") as fo, open(err_path, "w") as fe:
            fo.write("")
            proc = subprocess.Popen([str(a) for a in argv], stdout=fo, stderr=fe, cwd=ROOT, env=self.env,
                                    start_new_session=True)
            timed_out = False
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                rc = _kill_group(proc)
        wall = time.monotonic() - started
        result = {"label": label, "command": " ".join(str(a) for a in argv), "rc": rc, "wall_s": round(wall, 2),
                "timeout_s": round(timeout, 1), "timed_out": timed_out,
                "stdout_log": str(out_path.relative_to(self.logs.parent)),
                "stderr_log": str(err_path.relative_to(self.logs.parent)),
                "stdout": out_path.read_text(errors="replace"), "stderr": err_path.read_text(errors="replace")}
        self.history.append(result)
        return result


def _kill_group(proc: subprocess.Popen) -> int:
    """SIGTERM to the group (torchrun passes it on; the workers checkpoint), SIGKILL 15 s later."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


class CheckFailed(Exception):
    """A check's command failed: the message is the reason recorded."""


def problem(result: dict) -> str | None:
    """Why a command failed (its last stderr line), or None."""
    if result["timed_out"]:
        return f"{result['label']}: timed out after {result['timeout_s']} s"
    if result["rc"] != 0:
        return f"{result['label']}: exit {result['rc']}: {error_line(result['stderr'], result['stdout'])[-300:]}"
    return None


def error_line(stderr: str, stdout: str) -> str:
    """The line that says what went wrong: cpmctl's one-line `Error:`, else the last exception raised in the
    worker (not torchrun's ChildFailedError around it), else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("Error:", "error:")):
            return line
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line)
              and "ChildFailedError" not in line]
    if raised:
        return raised[-1]
    return (lines or [line for line in stdout.splitlines() if line.strip()] or [""])[-1]


def require_ok(result: dict) -> dict:
    why = problem(result)
    if why:
        raise CheckFailed(why)
    return result


def json_lines(text: str) -> list[dict]:
    """Every stdout line that is one JSON object."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def json_document(text: str) -> dict:
    """The JSON object a `--json` command printed (possibly over several lines)."""
    text = text.strip()
    start = text.find("{")
    if start < 0:
        raise CheckFailed("no JSON on stdout")
    return json.loads(text[start:])


def worker_result(result: dict) -> dict:
    for line in reversed(result["stdout"].splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise CheckFailed(f"{result['label']}: no result line")


def metrics_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def peak_memory(rows: list[dict]) -> float | None:
    values = [r["memory_mb"] for r in rows if "memory_mb" in r]
    return max(values) if values else None


def median(values):
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def compare(measured_mib: float | None, plan: dict) -> dict:
    """Measured peak (MiB) next to the planner's step peak and its needed bytes (peak + CUDA reserve)."""
    predicted = plan["peak_bytes"] / MIB
    row = {"measured_peak_mib": measured_mib, "predicted_peak_mib": round(predicted, 1),
           "predicted_needed_mib": round(plan["needed_bytes"] / MIB, 1), "predicted_moment": plan.get("peak_moment"),
           "predicted_terms_mib": {k[: -len("_bytes")]: round(plan[k] / MIB, 1) for k in
                                   ("params_bytes", "grads_bytes", "optimizer_bytes", "teacher_bytes",
                                    "autocast_bytes", "gathered_bytes", "activations_bytes")}}
    if measured_mib:
        row["measured_over_predicted"] = round(measured_mib / predicted, 3)
    return row


# ----- the checks ---------------------------------------------------------------------------------------------
class Checks:
    def __init__(self, args, runner: Runner, work: Path, out: Path):
        self.args, self.runner, self.work, self.out = args, runner, work, out
        self.s = settings(args.small, args.device)
        self.cuda = args.device.startswith("cuda")
        self.py = sys.executable
        self.cpmctl = [self.py, "-m", "cpmctl"]
        self.vocab = work / "vocab.txt"
        self.data = work / "packed"
        self.ckpt = work / "model"
        self.gpu_memory_gb = None
        self.artifacts = out / "artifacts"

    def worker(self, label, name, payload, timeout):
        return self.runner.run(label, [self.py, Path(__file__), "--worker", name, "--payload", json.dumps(payload)],
                               timeout)

    # -- env and setup
    def env(self, t):
        res = require_ok(self.worker("env", "env", {"device": self.args.device}, t))
        info = worker_result(res)
        self.gpu_memory_gb = info.get("gpu_memory_gb")
        return info

    def vocab_file(self, t):
        size = write_vocab(self.vocab, self.s["vocab_size"])
        return {"vocab_size": size, "path": str(self.vocab)}

    def data_files(self, t):
        res = require_ok(self.worker("data", "data", {"out": str(self.data), "vocab": str(self.vocab),
                                                      "rows": self.s["rows"], "max_length": self.s["seq_len"]}, t))
        return worker_result(res)

    def model_init(self, t):
        res = require_ok(self.runner.run("model_init", self.cpmctl + [
            "model", "init", "--config", self.s["model"], "--vocab", self.vocab, "--out", self.ckpt, "--json"], t))
        doc = json_document(res["stdout"])
        return {"config": self.s["model"], "params_total": doc.get("params_total")}

    # -- issue 14
    def prune_overrides(self):
        s, dev = self.s, self.args.device
        return ["method=learned", f"mask.steps={s['mask_steps']}", f"recovery.steps={s['recovery_steps']}",
                f"mask.batch_size={s['prune_batch']}", f"recovery.batch_size={s['prune_batch']}",
                "mask.precision=bf16", "recovery.precision=bf16", "mask.engine=fsdp", "recovery.engine=fsdp",
                f"mask.device={dev}", f"recovery.device={dev}", "mask.log_every=1", "recovery.log_every=1",
                "mask.save_every=100000", "recovery.save_every=100000", "mask.valid_batches=0",
                "recovery.valid_batches=0", "recovery.warmup_steps=0", "distill.weight=0.5", "data.valid_rows=8",
                "data.eval_batches=2", "mask.keep_last=1", "recovery.keep_last=1"]

    def device_memory_flag(self):
        return ["--device-memory", f"{self.gpu_memory_gb:.0f}"] if self.gpu_memory_gb else []

    def prune_fsdp(self, t):
        t_end = time.monotonic() + t
        out_dir = self.work / "prune"
        common = ["--model", self.ckpt, "--from", self.s["prune_from"], "--to", self.s["prune_to"],
                  "--data", self.data, "--out", out_dir]
        plan_res = require_ok(self.runner.run("prune_fsdp.plan", self.cpmctl + ["prune", *common, "--dry-run",
                                              "--nproc", "1", "--json", *self.device_memory_flag(),
                                              *self.prune_overrides()], min(90, t)))
        plan = json_document(plan_res["stdout"])["memory"]
        record = {"planner_verdict": plan["verdict"].get("text"), "seq_len": plan["seq_len"]}
        run = self.runner.run("prune_fsdp.run", [self.py, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node=1", "-m", "cpmctl", "prune", *common, "--json",
                                                  *self.prune_overrides()], t_end - time.monotonic())
        stage_dirs = sorted(out_dir.glob("stage-*"))
        stage = stage_dirs[0] if stage_dirs else out_dir / "missing"
        mask_rows, rec_rows = metrics_rows(stage / "mask" / "metrics.jsonl"), metrics_rows(stage / "recovery" /
                                                                                           "metrics.jsonl")
        row = plan["stages"][0]
        record["mask"] = {**compare(peak_memory(mask_rows), row["mask"]), "steps_logged": len(mask_rows),
                          "tokens_per_s_median": median(r.get("tokens_per_s") for r in mask_rows)}
        record["recovery"] = {**compare(peak_memory(rec_rows), row["recovery"]), "steps_logged": len(rec_rows),
                              "tokens_per_s_median": median(r.get("tokens_per_s") for r in rec_rows),
                              "note": "memory_mb is the process peak since start: the mask phase ran first in the "
                                      "same process (the loop does not reset the peak)"}
        report_path = stage / "report.json"
        if report_path.exists():
            report = json.loads(report_path.read_text())
            record["loss"] = report.get("loss")
            record["shape"] = {k: v for k, v in (report.get("shape") or {}).items() if k != "mask_modules"}
            record["extraction_max_abs_diff"] = report.get("extraction_max_abs_diff")
        self.keep(out_dir, "prune", ["prune.json", "stage-*/report.json", "stage-*/mask/metrics.jsonl",
                                     "stage-*/recovery/metrics.jsonl", "stage-*/extracted/extraction.json"])
        record["failed"] = problem(run)  # the numbers gathered so far stay in the record
        self.drop(out_dir)
        return record

    def lora_overrides(self):
        s = self.s
        return [f"task.max_length={s['lora_max_length']}", f"train.batch_size={s['lora_batch']}", "train.grad_accum=1",
                f"train.steps={s['lora_steps']}", "tune.epochs=null", f"tune.dev_limit={s['lora_dev']}",
                "tune.eval_batch_size=4", "train.precision=bf16", "tune.base_dtype=bf16", "train.engine=fsdp",
                f"train.device={self.args.device}", "train.log_every=1", "train.save_every=100000",
                "train.valid_batches=2", "train.warmup_steps=0", "decode.decode=greedy",
                f"decode.max_new_tokens={s['lora_new_tokens']}"]

    def lora_fsdp(self, t):
        t_end = time.monotonic() + t
        out_dir = self.work / "lora"
        common = ["--task", "lcsts", "--model", self.ckpt, "--data", TASK_DATA, "--out", out_dir]
        plan_res = require_ok(self.runner.run("lora_fsdp.plan", self.cpmctl + ["tune", "lora", *common, "--dry-run",
                                              "--nproc", "1", "--json", *self.device_memory_flag(),
                                              *self.lora_overrides()], min(90, t)))
        counts = json_document(plan_res["stdout"])
        record = {"trainable": counts.get("trainable"), "total": counts.get("total"),
                  "seq_len": counts.get("seq_len"), "planner_verdict": counts["memory"]["verdict"].get("text")}
        run = self.runner.run("lora_fsdp.run", [self.py, "-m", "torch.distributed.run", "--standalone",
                                                 "--nproc_per_node=1", "-m", "cpmctl", "tune", "lora", *common,
                                                 "--json", *self.lora_overrides()], t_end - time.monotonic())
        rows = metrics_rows(out_dir / "metrics.jsonl")
        record.update(compare(peak_memory(rows), counts["memory"]["plan"]))
        record["steps_logged"] = len([r for r in rows if "memory_mb" in r])
        record["tokens_per_s_median"] = median(r.get("tokens_per_s") for r in rows if "tokens_per_s" in r)
        if run["rc"] == 0:
            try:
                result = json_document(run["stdout"])
                record.update(steps=result.get("steps"), adapter=result.get("adapter"), best=result.get("best"))
            except (CheckFailed, json.JSONDecodeError):
                pass
        self.keep(out_dir, "lora", ["metrics.jsonl", "*.json", "best/*.json"])
        record["failed"] = problem(run)
        self.drop(out_dir)
        return record

    # -- issue 17
    def flex_pytest(self, t):
        res = self.runner.run("flex_pytest", [self.py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                              "tests/test_flex_attention.py", "-k", "cuda"], t)
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", res["stdout"])}
        record = dict(counts)
        if res["rc"] not in (0, 5) or res["timed_out"]:
            require_ok(res)
        if self.cuda and not counts.get("passed"):
            raise CheckFailed("no CUDA test passed (skipped: is CUDA visible to pytest?)")
        return record

    def train_bench(self, attention: str, compile_: bool):
        def check(t):
            s = self.s
            argv = [self.py, "bench/train.py", "--preset", s["train_preset"], "--device", self.args.device,
                    "--precision", "bf16", "--batch-size", s["train_batch"], "--seq-len", s["train_seq"],
                    "--rounds", s["train_rounds"], "--steps", s["train_steps"], "--warmup", "1", "--no-peer",
                    "--attention", attention, "--json"] + (["--compile"] if compile_ else [])
            label = f"train_{attention}" + ("_compile" if compile_ else "")
            res = require_ok(self.runner.run(label, argv, t))
            rows = json_lines(res["stdout"])
            if not rows:
                raise CheckFailed("bench/train.py printed no JSON")
            keep = ("cpmctl_tokens_per_s", "cpmctl_step_s", "mfu", "model_tflops_per_s", "fraction_of_limit",
                    "matmul_limit_gflops", "params", "batch_size",
                    "seq_len", "attention", "precision")
            return {k: rows[-1].get(k) for k in keep}
        return check

    def generate_limit(self, limit: str):
        def check(t):
            payload = {"model": str(self.ckpt), "device": self.args.device, "dtype": self.s["gen_dtype"],
                       "limit": limit, "new_tokens": self.s["gen_new_tokens"], "prompt": task_prompt()}
            res = require_ok(self.worker(f"generate_limit_{limit}", "generate", payload, t))
            return worker_result(res)
        return check

    def bench_generate(self, t):
        s = self.s
        argv = [self.py, "bench/generate.py", *s["bench_gen_dims"], "--device", self.args.device,
                "--dtype", "bf16" if self.cuda else "fp32", "--workloads", s["bench_gen_workload"],
                "--modes", "greedy", "--quantize", "none", "--repeats", "2", "--quality-tokens", "0", "--json"]
        res = require_ok(self.runner.run("bench_generate", argv, t))
        rows = json_lines(res["stdout"])
        if not rows:
            raise CheckFailed("bench/generate.py printed no JSON")
        keep = ("weights", "weight_bytes_per_token", "gemv_gb_s", "read_gb_s", "copy_gb_s", "bound_steps_per_s",
                "cpmctl_decode_steps_per_s", "fraction_of_bound", "cpmctl_tokens_per_s", "hf_decode_steps_per_s",
                "hf_fraction_of_bound", "decode_ratio", "ratio", "same_ids", "cpmctl_peak_mib")
        return {"rows": [{k: r.get(k) for k in keep if k in r} for r in rows]}

    def bench_memory(self, t):
        s = self.s
        argv = [self.py, "bench/memory.py", "--config", s["memory_config"], "--device", self.args.device,
                "--dtype", s["memory_dtype"], "--new-tokens", s["memory_new_tokens"], "--repeats", "1",
                "--contenders", "resident,cpmctl,accelerate", "--no-quality", "--json"]
        if s["memory_limit"] is not None:
            argv += ["--limit", s["memory_limit"]]
        res = require_ok(self.runner.run("bench_memory_3b", argv, t))
        contenders = {}
        for r in json_lines(res["stdout"]):
            if "contender" not in r:
                continue
            row = {k: r.get(k) for k in ("tokens_per_s", "peak", "load_s", "prefill_s", "note", "planned",
                                         "streamed_gb_per_token", "copy_gb_s", "fraction_of_copy",
                                         "bound_tokens_per_s", "fraction_of_bound", "error") if k in r}
            if r.get("streamed_gb_per_token") and r.get("tokens_per_s"):
                row["streamed_gb_s"] = round(r["streamed_gb_per_token"] * r["tokens_per_s"], 2)
            contenders[r["contender"]] = row
        record = {"contenders": contenders, "limit_gb": s["memory_limit"]}
        same = re.findall(r"^\s+(\S+)\s+greedy ids vs resident: (\S+)", res["stdout"], flags=re.M)
        record["ids_vs_resident"] = dict(same)
        ours, peer = contenders.get("cpmctl", {}), contenders.get("accelerate") or contenders.get("naive") or {}
        if ours.get("tokens_per_s") and peer.get("tokens_per_s"):
            record["cpmctl_over_accelerate"] = round(ours["tokens_per_s"] / peer["tokens_per_s"], 3)
        return record

    def int4_decode(self, t):
        payload = {"device": self.args.device, "dims": self.s["int4_dims"], "new_tokens": self.s["int4_new_tokens"],
                   "work": str(self.work / "int4")}
        record = worker_result(require_ok(self.worker("int4_decode", "int4", payload, t)))
        if record.get("errors"):  # the parts that ran are kept; the check reads failed
            record["failed"] = "; ".join(f"{k}: {v}" for k, v in record["errors"].items())
        return record

    def prune_bench(self, t):
        """Issue 19 on a ~100M model: bench/prune.py on the GPU, once for seed 0, then for seeds 0-1, ... (each run
        reuses the cached (arm, seed) runs of the one before), so a check cut short keeps the table of every seed
        count it finished."""
        s, deadline = self.s, time.monotonic() + t
        work = self.work / "prune-bench"
        argv = [self.py, "bench/prune.py", *s["prune_bench"], "--device", self.args.device, "--arms",
                s["prune_bench_arms"], "--work", work]
        record: dict = {"seeds_done": 0, "arms": s["prune_bench_arms"].split(",")}
        for n in range(1, s["prune_bench_seeds"] + 1):
            res = self.runner.run(f"prune_bench.seeds{n}", argv + ["--seeds", ",".join(map(str, range(n)))],
                                  deadline - time.monotonic())
            why = problem(res)
            if why:
                if n == 1:
                    raise CheckFailed(why)
                record["failed"] = why  # the tables of the seed counts before stay
                break
            found = sorted(work.glob("*/*/bench.json"))
            if not found:
                raise CheckFailed("bench/prune.py wrote no bench.json")
            bench = json.loads(found[-1].read_text())
            self.keep(work, "prune_bench", ["*/*/bench.json"])
            record.update(seeds_done=n, base_loss=bench["base_loss"], floor=bench["floor"], stages=[
                {"stage": row["stage"], "best": row["best"], "best_clear": row["best_clear"],
                 "arms": {a: {"mean": round(v["mean"], 4), "ci95": v["ci95"] if n > 1 else None}
                          for a, v in row["arms"].items()}} for row in bench["stages"]])
        return record

    def keep(self, src: Path, name: str, patterns: list[str]) -> None:
        """Copy a run's small files (reports, metrics) into OUT/artifacts/NAME, keeping their relative paths."""
        for pattern in patterns:
            for f in src.glob(pattern):
                if f.is_file() and f.stat().st_size < 5 * MIB:
                    target = self.artifacts / name / f.relative_to(src)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, target)

    def drop(self, path: Path) -> None:
        """Free the disk of a finished run (a 1b mask phase leaves ~20 GB of checkpoints) unless --keep-work."""
        if not self.args.keep_work:
            shutil.rmtree(path, ignore_errors=True)

    def plan(self):
        """(name, function, nominal timeout s, minimum s to start it, the checks it needs)."""
        return [
            ("env", self.env, 90, 10, []),
            ("vocab", self.vocab_file, 30, 1, []),
            ("data", self.data_files, 120, 20, ["vocab"]),
            ("model_init", self.model_init, 180, 45, ["vocab"]),
            ("prune_fsdp", self.prune_fsdp, 240, 90, ["data", "model_init"]),
            ("lora_fsdp", self.lora_fsdp, 160, 60, ["model_init"]),
            ("flex_pytest", self.flex_pytest, 180, 45, []),
            ("train_sdpa", self.train_bench("sdpa", False), 150, 45, []),
            ("train_flex", self.train_bench("flex", False), 180, 60, []),
            ("generate_limit_4", self.generate_limit("4"), 100, 30, ["model_init"]),
            ("generate_limit_half", self.generate_limit("half"), 120, 30, ["model_init"]),
            ("bench_generate", self.bench_generate, 180, 60, []),
            ("bench_memory_3b", self.bench_memory, 240, 90, []),
            ("int4_decode", self.int4_decode, 90, 30, []),
            ("train_sdpa_compile", self.train_bench("sdpa", True), 240, 120, []),
            ("train_flex_compile", self.train_bench("flex", True), 240, 120, []),
            # issue 19's ~100M run: a device session of its own (`--only prune_bench_wide --budget 540`)
            ("prune_bench_wide", self.prune_bench, 540, 120, []),
        ]


# ----- the synthetic vocabulary -------------------------------------------------------------------------------
def task_characters() -> list[str]:
    """Every non-space character of the bundled lcsts task, in order of first appearance (deterministic)."""
    seen, chars = set(), []
    for split in ("train", "dev", "test"):
        for line in (TASK_DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            for ch in "".join(str(v) for v in row.values()):
                if ch not in seen and not ch.isspace() and ch.isprintable():
                    seen.add(ch)
                    chars.append(ch)
    return chars


def write_vocab(path: Path, size: int) -> int:
    """A CPM-Ant vocabulary (tokenizer.py: the special tokens first, one token a line): printable ASCII, the task's
    characters, then filler tokens up to `size` (0: no filler) so the model has the real embedding size."""
    from cpmctl.model.tokenizer import SPECIAL_TOKENS

    tokens, seen = list(SPECIAL_TOKENS), set(SPECIAL_TOKENS)
    for t in [chr(c) for c in range(33, 127)] + task_characters():
        if t not in seen:
            seen.add(t)
            tokens.append(t)
    filler = 0
    while len(tokens) < size:
        t = f"<f{filler}>"
        filler += 1
        if t not in seen:
            seen.add(t)
            tokens.append(t)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return len(tokens)


def task_prompt() -> str:
    first = json.loads((TASK_DATA / "dev.jsonl").read_text(encoding="utf-8").splitlines()[0])
    return first["input"][:60]


# ----- workers: the parts measured in-process, each in its own subprocess --------------------------------------
def worker_env(p: dict) -> dict:
    import importlib

    info = {"python": platform.python_version(), "platform": platform.platform()}
    versions, missing = {}, {}
    for name in ("torch", "numpy", "typer", "rich", "yaml", "jieba", "safetensors", "matplotlib", "xxhash",
                 "zstandard", "opencc", "peft", "pytest", "transformers", "accelerate", "torchao"):
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as e:  # noqa: BLE001 - any import failure is what we report
            missing[name] = f"{type(e).__name__}: {e}"[:160]
    info.update(versions=versions, missing=missing)
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 1e9, 1),
                    gpu_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())
    try:
        importlib.import_module("cpmctl.cli.app")  # the whole CLI imports

        info["cpmctl_imports"] = True
    except Exception as e:  # noqa: BLE001
        info["cpmctl_imports"] = f"{type(e).__name__}: {e}"[:200]
    if p["device"].startswith("cuda") and not info["cuda_available"]:
        raise SystemExit("--device cuda but torch sees no GPU")
    return info


def worker_data(p: dict) -> dict:
    from cpmctl.model.tokenizer import CPMAntTokenizer
    from tests.synthetic import write_synthetic_packed

    vocab_size = CPMAntTokenizer(p["vocab"]).vocab_size
    started = time.perf_counter()
    write_synthetic_packed(p["out"], vocab_size, p["rows"], max_length=p["max_length"], seed=0,
                           words=min(2048, vocab_size - 10))
    return {"rows": p["rows"], "max_length": p["max_length"], "vocab_size": vocab_size,
            "seconds": round(time.perf_counter() - started, 2)}


def _best_seconds(fn, sync, repeats=5) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def bandwidth_probes(device, dtype, nbytes: int, dim: int) -> dict:
    """GB/s of a matrix-vector product over `nbytes` of weights (the decode bound's denominator, as bench/generate.py
    measures it), a device copy, and pinned / pageable host-to-device copies (what streamed blocks move)."""
    import torch
    import torch.nn.functional as F

    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    size = torch.empty((), dtype=dtype).element_size()
    rows = max(1, nbytes // (dim * size))
    matrix = torch.randn(rows, dim, device=device, dtype=dtype)
    vector = torch.randn(1, dim, device=device, dtype=dtype)
    moved = matrix.numel() * size
    gemv = _best_seconds(lambda: F.linear(vector, matrix), sync)
    out = {"probe_bytes": moved, "gemv_gb_s": round(moved / gemv / 1e9, 2)}
    target = torch.empty_like(matrix)
    out["copy_gb_s"] = round(2 * moved / _best_seconds(lambda: target.copy_(matrix), sync) / 1e9, 2)
    matrix = target = vector = None  # freed before the model loads
    if cuda:
        host_bytes = min(moved, 1 << 30)
        for kind, pinned in (("pinned", True), ("pageable", False)):
            host = torch.empty(host_bytes, dtype=torch.uint8, pin_memory=pinned)
            dev = torch.empty(host_bytes, dtype=torch.uint8, device=device)
            seconds = _best_seconds(lambda: dev.copy_(host, non_blocking=pinned), sync, repeats=3)
            out[f"h2d_{kind}_gb_s"] = round(host_bytes / seconds / 1e9, 2)
            host = dev = None
        torch.cuda.empty_cache()
    return out


def worker_generate(p: dict) -> dict:
    """`cpmctl generate` as the CLI runs it (prepare_generation, then its results), one greedy prompt, with a
    time stamp per new token: load time, prefill, decode steps/s against the bandwidth bound, the peak memory, and
    for streamed blocks the copy rate against the measured host-to-device bandwidth."""
    import torch

    from cpmctl.generate.batch import prepare_generation
    from cpmctl.generate.offload import describe_plan
    from cpmctl.model.ant import param_counts
    from cpmctl.model.checkpoint import read_config
    from cpmctl.model.generation_config import GenerationConfig
    from cpmctl.model.tokenizer import EOS

    device = torch.device(p["device"])
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[p["dtype"]]
    config = read_config(p["model"])[0]
    counts = param_counts(config)
    element = torch.empty((), dtype=dtype).element_size()
    # A decode step reads every block weight and the tied head (the prompt/segment embeddings: a few rows only).
    per_token = (counts["non_embedding"] + config.vocab_size * config.dim_model) * element
    cfg = GenerationConfig(decode="greedy", max_new_tokens=p["new_tokens"])
    if p["limit"] == "half":  # halfway between the smallest limit and all resident: about half the blocks stream
        from cpmctl.generate.plan import plan_generation
        from cpmctl.model.checkpoint import vocab_beside
        from cpmctl.model.tokenizer import CPMAntTokenizer

        prompt_tokens = 1 + len(CPMAntTokenizer(vocab_beside(p["model"])).encode_for_model(p["prompt"]))
        resident = plan_generation(config, [prompt_tokens], decoding=cfg, batch_size=1, device=device, dtype=dtype,
                                   memory_limit_gb=None)
        limit = (resident.minimum_bytes + resident.charged_bytes) / 2 / 1e9
    else:
        limit = None if p["limit"] == "none" else float(p["limit"])
    probes = bandwidth_probes(device, dtype, min(per_token, 2 << 30), config.dim_model)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    stamps: list[float] = []
    started = time.perf_counter()
    run = prepare_generation(p["model"], cfg, prompt=p["prompt"], device=p["device"], dtype=p["dtype"],
                             memory_limit_gb=limit, on_text=lambda text: stamps.append(time.perf_counter()))
    loaded = time.perf_counter()
    with torch.no_grad():  # </s> never wins on random weights: exactly new_tokens tokens
        run.loaded.model.input_embedding.weight[EOS].zero_()
    results = list(run.results())
    done = time.perf_counter()
    tokens = len(results[0].token_ids) if results else 0
    out = {"limit_gb": None if limit is None else round(limit, 4), "dtype": p["dtype"],
           "load_s": round(loaded - started, 2), "new_tokens": tokens, "stamps": len(stamps),
           "generate_s": round(done - loaded, 3),
           "weight_bytes_per_token": per_token, **probes}
    if len(stamps) >= 2:
        out["prefill_s"] = round(stamps[0] - loaded, 4)
        rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        out["decode_steps_per_s"] = round(rate, 2)
        bound = probes["gemv_gb_s"] * 1e9 / per_token
        out["bound_steps_per_s"] = round(bound, 2)
        out["fraction_of_bound"] = round(rate / bound, 3)
    if run.plan is not None:
        plan = run.plan
        out["plan_line"] = describe_plan(plan)
        out["plan"] = {k: v for k, v in plan.to_dict().items() if not isinstance(v, (list, dict))}
        out["streamed_blocks"] = len(plan.streamed)
        if plan.streamed and "decode_steps_per_s" in out:
            out["streamed_gb_s"] = round(plan.streamed_bytes * out["decode_steps_per_s"] / 1e9, 2)
            if "h2d_pinned_gb_s" in probes:
                out["streamed_over_h2d_pinned"] = round(out["streamed_gb_s"] / probes["h2d_pinned_gb_s"], 3)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        out["peak_mib"] = round(peak / MIB, 1)
        if limit is not None:
            out["peak_within_limit"] = peak <= limit * 1e9
    else:
        import resource

        out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def worker_int4(p: dict) -> dict:
    """int4 on `device` against the CPU int4 path, from the same random weights (</s> never wins: exactly
    new_tokens tokens). Each part is recorded on its own: a failure is noted and the next part runs."""
    import copy

    import torch

    from cpmctl.generate.decode import greedy
    from cpmctl.generate.offload import load_offloaded
    from cpmctl.generate.plan import GB, plan_memory
    from cpmctl.generate.quant import quantize_model
    from cpmctl.model.ant import build_model
    from cpmctl.model.checkpoint import save_native
    from cpmctl.model.config import CPMAntConfig, resolve_config
    from cpmctl.model.generation_config import GenerationConfig
    from cpmctl.model.inputs import build_inputs
    from cpmctl.model.tokenizer import BOS, EOS

    device = torch.device(p["device"])
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    config = CPMAntConfig(**p["dims"], half=False)
    base = build_model(config, seed=0).eval()
    with torch.no_grad():
        base.input_embedding.weight[EOS].zero_()
    gen = torch.Generator().manual_seed(1)
    prompts = [[BOS] + torch.randint(10, config.vocab_size, (16,), generator=gen).tolist() for _ in range(4)]
    n = p["new_tokens"]
    cfg = GenerationConfig(decode="greedy", max_new_tokens=n)
    out, errors = {"dims": p["dims"], "new_tokens": n}, {}

    def part(name, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - recorded, the other parts still run
            errors[name] = f"{type(e).__name__}: {e}"[:300]

    models = {}

    def cpu_vs_device():
        models["cpu"] = quantize_model(copy.deepcopy(base), "int4")
        models["device"] = quantize_model(copy.deepcopy(base).to(device), "int4")
        ids = {k: greedy(m, build_inputs(m, prompts), cfg) for k, m in models.items()}
        pairs = [(a, b) for r, s in zip(ids["device"], ids["cpu"]) for a, b in zip(r, s)]
        out["ids_equal_cpu_fraction"] = round(sum(a == b for a, b in pairs) / max(len(pairs), 1), 4)
        out["first_step_ids_equal_cpu"] = all(r[0] == s[0] for r, s in zip(ids["device"], ids["cpu"]))
        models["ids"] = ids["device"]
        row = [BOS] + torch.randint(10, config.vocab_size, (128,), generator=gen).tolist()
        logits = {}
        with torch.no_grad():
            for k in ("cpu", "device"):
                m = models[k]
                x = build_inputs(m, [row])
                logits[k] = m(x["input"], x["segment"], x["context"], x["span"])[0].float().cpu()
            exact = base(*(build_inputs(base, [row])[k] for k in ("input", "segment", "context", "span")))[0]
        out["max_logit_diff_device_vs_cpu"] = round((logits["device"] - logits["cpu"]).abs().max().item(), 5)
        out["relative_error_cpu_int4_vs_fp32"] = round(((logits["cpu"] - exact).norm() / exact.norm()).item(), 4)
        out["top1_agree_device_vs_cpu"] = round(
            (logits["device"].argmax(-1) == logits["cpu"].argmax(-1)).float().mean().item(), 4)

    def speed():
        one = build_inputs(base, prompts[:1])
        variants = {"int4_fp32": models.get("device")}
        bf16 = copy.deepcopy(base).to(device=device, dtype=torch.bfloat16)
        variants["bf16"] = bf16
        variants["int4_bf16"] = quantize_model(copy.deepcopy(bf16), "int4")
        for name, m in variants.items():
            if m is None:
                continue
            x = {k: v.to(device) for k, v in one.items()}
            greedy(m, x, cfg)  # warm-up
            best = float("inf")
            for _ in range(2):
                sync()
                start = time.perf_counter()
                greedy(m, x, cfg)
                sync()
                best = min(best, time.perf_counter() - start)
            out[f"tokens_per_s_{name}"] = round(n / best, 2)

    def streamed():
        ckpt = save_native(base, Path(p["work"]) / "ckpt")
        shape = dict(batch_rows=4, prefill_length=config.prompt_length + 17,
                     capacity=config.prompt_length + 17 + n + 3)
        full = plan_memory(config, device_type=device.type, dtype=torch.float32, budget=None, quantize="int4",
                           **shape)
        budget = full.minimum_bytes + full.block_bytes[0]  # two buffers, the other blocks streamed
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        offloaded = load_offloaded(ckpt, device=device, budget=budget, quantize="int4", **shape)
        try:
            ids = greedy(offloaded.model, build_inputs(offloaded.model, prompts), cfg)
            out["streamed_blocks"] = len(offloaded.plan.streamed)
            if "ids" in models:
                out["streamed_ids_equal_resident"] = ids == models["ids"]
            if cuda:
                sync()
                out["streamed_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / MIB, 1)
                out["streamed_peak_within_limit"] = torch.cuda.max_memory_allocated(device) <= budget
            out["streamed_limit_mib"] = round(budget / MIB, 1)
        finally:
            offloaded.close()

    def plan_10b():
        c10 = resolve_config("10b")
        for q in ("int8", "int4"):
            plan = plan_memory(c10, device_type="cuda", dtype=torch.float16, budget=4 * GB, quantize=q,
                               batch_rows=1, prefill_length=c10.prompt_length + 128,
                               capacity=c10.prompt_length + 128 + 100 + 3)
            out[f"plan_10b_4gb_{q}"] = {"resident": len(plan.resident), "streamed": len(plan.streamed),
                                        "block_mb": round(plan.block_bytes[0] / 1e6, 2),
                                        "blocks_gb": round(sum(plan.block_bytes) / 1e9, 3),
                                        "fixed_gb": round(plan.fixed_bytes / 1e9, 3),
                                        "streamed_gb_per_step": round(plan.streamed_bytes / 1e9, 3),
                                        "charged_gb": round(plan.charged_bytes / 1e9, 3)}

    for name, fn in (("cpu_vs_device", cpu_vs_device), ("speed", speed), ("streamed", streamed),
                     ("plan_10b", plan_10b)):
        part(name, fn)
    if errors:
        out["errors"] = errors
    return out


WORKERS = {"env": worker_env, "data": worker_data, "generate": worker_generate, "int4": worker_int4}


# ----- main ---------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu.")
    p.add_argument("--small", action="store_true", help="Tiny configs everywhere: a smoke test of the script.")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-checks")),
                   help="Output folder (default: $OUT): gpu_checks.json, logs/, artifacts/.")
    p.add_argument("--work", type=Path, default=None, help="Folder for checkpoints and data (default: a temporary "
                   "folder, removed at the end).")
    p.add_argument("--keep-work", action="store_true", help="Keep --work at the end.")
    p.add_argument("--budget", type=float, default=480, help="Seconds for all checks; later ones are cut or skipped.")
    p.add_argument("--only", default=None, help="Comma list of checks to run (their inputs run too).")
    p.add_argument("--skip", default="", help="Comma list of checks not to run.")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--payload", default="{}", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def summary_line(name: str, r: dict) -> str:
    keys = {
        "env": ("gpu", "gpu_memory_gb", "missing"),
        "vocab": ("vocab_size",), "data": ("rows", "max_length"), "model_init": ("params_total",),
        "flex_pytest": ("passed", "failed", "skipped"),
        "prune_bench_wide": ("seeds_done", "base_loss"),
        "generate_limit_4": ("decode_steps_per_s", "fraction_of_bound", "peak_mib", "peak_within_limit",
                             "streamed_blocks"),
        "generate_limit_half": ("limit_gb", "decode_steps_per_s", "streamed_gb_s", "h2d_pinned_gb_s",
                                "streamed_over_h2d_pinned", "peak_mib", "peak_within_limit"),
        "bench_memory_3b": ("cpmctl_over_accelerate", "ids_vs_resident"),
        "int4_decode": ("ids_equal_cpu_fraction", "max_logit_diff_device_vs_cpu", "tokens_per_s_int4_bf16",
                        "tokens_per_s_bf16", "streamed_ids_equal_resident", "streamed_peak_within_limit", "errors"),
    }
    if name.startswith("train_"):
        keys[name] = ("cpmctl_tokens_per_s", "mfu")
    parts = []
    for k in keys.get(name, ()):
        v = r.get(k)
        if v not in (None, {}, ""):
            parts.append(f"{k}={round(v, 3) if isinstance(v, float) else v}")
    for phase in ("mask", "recovery"):
        if phase in r:
            m = r[phase]
            parts.append(f"{phase} measured {m.get('measured_peak_mib')} MiB / predicted {m.get('predicted_peak_mib')}"
                         f" ({m.get('measured_over_predicted')})")
    if name == "lora_fsdp" and "predicted_peak_mib" in r:
        parts.append(f"measured {r.get('measured_peak_mib')} MiB / predicted {r['predicted_peak_mib']} "
                     f"({r.get('measured_over_predicted')})")
    if name == "bench_generate":
        for row in r.get("rows", []):
            parts.append(f"{row.get('weights')}: {row.get('cpmctl_decode_steps_per_s')} steps/s = "
                         f"{row.get('fraction_of_bound')} of bound, hf {row.get('hf_fraction_of_bound')}, "
                         f"same_ids {row.get('same_ids')}")
    if name == "bench_memory_3b":
        for c, row in r.get("contenders", {}).items():
            peak = row.get("peak")
            parts.append(f"{c} {row.get('tokens_per_s') and round(row['tokens_per_s'], 2)} tok/s peak "
                         f"{peak and round(peak / 1e9, 3)} GB" + (f" {row['error']}" if row.get("error") else ""))
    if r.get("error"):
        parts.append(f"error: {r['error'][:160]}")
    return f"{name:20s} {r['status']:8s} {r.get('wall_s', 0):7.1f}s  " + "; ".join(parts)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        result = WORKERS[args.worker](json.loads(args.payload))
        print(RESULT_MARK + json.dumps(result), flush=True)
        return 0
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="cpmctl-gpu-checks-"))
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(out, args.budget)
    checks = Checks(args, runner, work, out)
    plan = checks.plan()
    names = [n for n, *_ in plan]
    wanted = set(names)
    if args.only:
        wanted = set(x.strip() for x in args.only.split(",") if x.strip())
        unknown = wanted - set(names)
        if unknown:
            raise SystemExit(f"unknown checks: {', '.join(sorted(unknown))} (known: {', '.join(names)})")
        wanted.add("env")  # cheap, and the GPU's memory goes into the dry runs' verdicts
        needs = {n: deps for n, _, _, _, deps in plan}
        stack = list(wanted)
        while stack:  # a check's inputs run too
            for dep in needs[stack.pop()]:
                if dep not in wanted:
                    wanted.add(dep)
                    stack.append(dep)
    wanted -= set(x.strip() for x in args.skip.split(",") if x.strip())
    report = {"meta": {"argv": sys.argv, "device": args.device, "small": args.small, "budget_s": args.budget,
                       "out": str(out), "work": str(work), "host": platform.node(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": checks.s},
              "checks": {}}
    json_path = out / "gpu_checks.json"

    def save():
        report["meta"]["elapsed_s"] = round(time.monotonic() - runner.start, 1)
        json_path.write_text(json.dumps(report, indent=1, default=str))

    print(f"gpu checks: device {args.device}{' (small)' if args.small else ''}, budget {args.budget:.0f} s, "
          f"out {out}, work {work}", flush=True)
    try:
        for name, fn, nominal, minimum, deps in plan:
            if name not in wanted:
                continue
            failed_deps = [d for d in deps if report["checks"].get(d, {}).get("status") != "ok"]
            left = runner.left()
            if failed_deps:
                record = {"status": "skipped", "error": f"needs {', '.join(failed_deps)}"}
            elif left < minimum:
                record = {"status": "skipped", "error": f"budget: {left:.0f} s left, needs {minimum} s"}
            else:
                started = time.monotonic()
                runner.history = []
                try:
                    record = {"status": "ok", **fn(min(nominal, left))}
                    failed = record.pop("failed", None)
                    if failed:
                        record.update(status="timeout" if "timed out" in failed else "failed", error=failed)
                except CheckFailed as e:
                    record = {"status": "timeout" if "timed out" in str(e) else "failed", "error": str(e)}
                except Exception as e:  # noqa: BLE001 - one check's bug must not stop the others
                    record = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                              "traceback": traceback.format_exc()[-3000:]}
                record["wall_s"] = round(time.monotonic() - started, 2)
                record["commands"] = [{k: v for k, v in c.items() if k not in ("stdout", "stderr")}
                                      for c in runner.history]
            report["checks"][name] = record
            save()
            print(summary_line(name, record), flush=True)
    finally:
        save()
        if not args.keep_work and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    statuses = [r["status"] for r in report["checks"].values()]
    print(f"done in {report['meta']['elapsed_s']:.0f} s: " + ", ".join(f"{statuses.count(s)} {s}" for s in
          ("ok", "failed", "timeout", "skipped") if statuses.count(s)) + f"; {json_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
