"""Data pipeline throughput: `data dedup` and `data filter` on a generated Chinese corpus with planted duplicates.

Measured, each job in its own process (so peak memory is its own), after `sync` and one read of the corpus (every
job starts with the corpus in the page cache and no earlier job's writeback pending); outputs are compared by
digest and then deleted (--keep keeps them):
  limit     reading and parsing the same files with no rules at all: what a single process cannot beat
  dedup     cpmctl's SQLite-backed dedup, --workers 1 and 2, MB/s and peak RSS
  peer      the same dedup with a plain Python set of hashes in memory (same parsing, hashing and decisions): the
            fastest exact baseline, whose memory grows with everything ever seen; the ratio is cpmctl / peer
  growth    dedup against a store already holding --prefill-millions paragraphs, RSS sampled during the run: memory
            must stay flat as the store grows, where the set baseline would need the whole set in RAM
  filter    the default filter recipe, --workers 1 and 2

MB/s is wall-clock; "cpu MB/s" divides by the job's own CPU seconds (main process only, so for --workers 1 it is
the per-process speed even on a machine that other jobs keep busy). The 2-worker ratio is wall-clock w2 / w1.

    python bench/data.py                 # 40 MB corpus, a few minutes on 2 cores
    python bench/data.py --mb 200 --prefill-millions 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Frequent Chinese characters (the first ones weigh most: a Zipf-like distribution) and punctuation.
COMMON = (
    "的一是不了在人有我他这个们中来上大为和国地到以说时要就出会可也你对生能而子那得于着下自之年过发后作里用道行所然家"
    "种事成方多经么去法学如都同现当没动面起看定天分还进好小部其些主样理心她本前开但因只从想实日军者意无力它与长把机十民"
    "第公此已工使情明性知全三又关点正业外将两高间由问很最重并物手应战向头文体政美相见被利什二等产或新己制身果加西斯月话"
    "合回特代内信表化老给世位次度门任常先海通教儿原东声提立及比员解水名真论处走义各入几口认条平系气题活尔更别打女变四神"
    "总何电数安少报才结反受目太量再感建务做接必场件计管期市直德资命山金指克许统区保至队形社便空决治展马科司五基眼书非则"
)
PUNCT = "，，，，。。、；：“”"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=40, help="Corpus size in MB (the issue's full run: 200).")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--prefill-millions", type=float, default=2.0, help="Paragraphs already in the store for 'growth'.")
    p.add_argument("--workdir", type=Path, default=None, help="Where the corpus and stores go (default: a temp dir).")
    p.add_argument("--keep", action="store_true", help="Keep the work directory.")
    p.add_argument("--skip-filter", action="store_true")
    p.add_argument("--repeat", type=int, default=1,
                   help="Run each --workers 1 / 2 pair this many times, alternating; the table shows the run of median "
                        "time and the scaling is the median of the pairs' ratios, with every pair's ratio beside it "
                        "(on a shared machine one pair can be 5%% off either way).")
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--args", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----- corpus --------------------------------------------------------------------------------------------------
def generate_corpus(out_dir: Path, mb: float, shards: int, seed: int = 0) -> dict:
    """jsonl shards of documents of 2-12 paragraphs; 15% exact copies of an earlier document, 15% near copies
    (>= 75% of their paragraphs from one earlier document), 10% partial overlaps (about a third), the rest new."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 10) for i in range(len(COMMON))]
    buffer = "".join(rng.choices(COMMON + PUNCT, weights=weights + [3.0 / 10] * len(PUNCT), k=4_000_000))
    recent: list[list[str]] = []
    target = int(mb * 1e6)
    written, docs, planted = 0, 0, 0
    files = [open(out_dir / f"part-{i:03d}.jsonl", "w", encoding="utf-8") for i in range(shards)]
    per_shard = target // shards + 1

    def fresh() -> str:
        start = rng.randrange(len(buffer) - 200)
        return buffer[start : start + rng.randint(30, 160)] + "。"

    while written < target:
        kind = rng.random()
        if recent and kind < 0.15:
            paras = list(rng.choice(recent))
            planted += 1
        elif recent and kind < 0.30:
            base = rng.choice(recent)
            keep = max(1, -(-len(base) * 3 // 4))
            paras = base[:keep] + [fresh()]
            planted += len(base[:keep]) / len(paras) >= 0.7
        elif recent and kind < 0.40:
            base = rng.choice(recent)
            paras = base[: max(1, len(base) // 3)] + [fresh() for _ in range(len(base))]
        else:
            paras = [fresh() for _ in range(rng.randint(2, 12))]
        recent.append(paras)
        if len(recent) > 20000:
            recent.pop(rng.randrange(len(recent)))
        line = json.dumps({"id": docs, "text": "\n".join(paras), "source": "bench"}, ensure_ascii=False) + "\n"
        files[min(written // per_shard, shards - 1)].write(line)
        written += len(line.encode("utf-8"))
        docs += 1
    for f in files:
        f.close()
    return {"documents": docs, "bytes": written, "planted_duplicates": planted}


# ----- jobs (each runs in its own process) ---------------------------------------------------------------------
def _status_mb(pid: int | str, key: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _rss_mb() -> float:
    return _status_mb("self", "VmRSS")


class WorkerRSS:
    """Largest summed RSS of the worker processes, sampled on progress (ru_maxrss is inherited across fork and
    exec on Linux, so it cannot tell a worker's own peak)."""

    peak = 0.0

    @classmethod
    def sample(cls) -> None:
        import multiprocessing

        total = sum(_status_mb(p.pid, "VmRSS") for p in multiprocessing.active_children())
        cls.peak = max(cls.peak, total)


def _peaks() -> dict:
    # VmHWM: this process's own peak resident set (reset by exec, unlike ru_maxrss).
    return {"peak_rss_mb": _status_mb("self", "VmHWM"), "worker_peak_rss_mb": WorkerRSS.peak}


def _children_cpu() -> float:
    """CPU seconds of the worker processes waited for so far (the pool is joined when a command returns)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def job_limit(a: dict) -> dict:
    """The floor under every command: read the blocks and parse every line, nothing else. "records": parse_line
    (json, the whole record: what filter and pack need); "texts": document_texts (the text only, orjson when
    installed: what dedup and vocab read)."""
    from cpmctl.data.textio import document_texts, parse_line, read_blocks, resolve_inputs

    start, cpu = time.perf_counter(), time.process_time()
    nbytes = docs = 0
    for index, shard in enumerate(resolve_inputs([a["input"]])):
        for block in read_blocks(shard, index):
            nbytes += len(block.data)
            if a.get("mode") == "texts":
                docs += sum(t.__class__ is str for t in document_texts(block.split(), shard.format))
            else:
                docs += sum(parse_line(line, shard.format) is not None for line in block.split())
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"mb": nbytes / 1e6, "seconds": seconds, "mb_per_s": nbytes / 1e6 / seconds, "cpu_mb_per_s": nbytes / 1e6 / cpu,
            "documents": docs}


def job_dedup(a: dict) -> dict:
    from cpmctl.data.dedup import dedup
    from cpmctl.data.textio import output_spec, resolve_inputs

    shards = resolve_inputs([a["input"]])
    samples, seen = [], [0]

    def progress(n):
        seen[0] += n
        if not samples or seen[0] - samples[-1][0] >= 10e6:
            samples.append((seen[0], round(_rss_mb(), 1)))
            WorkerRSS.sample()

    cpu, workers_cpu = time.process_time(), _children_cpu()
    r = dedup(shards, output_spec(a["output"], "jsonl", None), a["store"], workers=a["workers"], on_progress=progress)
    cpu, workers_cpu = time.process_time() - cpu, _children_cpu() - workers_cpu
    from cpmctl.data.store import membership_path

    sidecar = membership_path(Path(a["store"]))
    return {"mb": r.bytes / 1e6, "seconds": r.seconds, "mb_per_s": r.mb_per_s, "cpu_mb_per_s": r.bytes / 1e6 / cpu,
            "cpu_s": cpu, "workers_cpu_s": workers_cpu, "kept": r.kept, "membership_bytes": sidecar.stat().st_size if sidecar.exists() else 0,
            "duplicates": r.duplicates, "store_paragraphs": r.store_paragraphs, "store_mb": r.store_bytes / 1e6,
            "rss_samples": samples, **_peaks()}


def job_peer(a: dict) -> dict:
    """Exact dedup with an in-memory set: same parsing, xxh3_64 per stripped paragraph, same decision rule."""
    import xxhash

    from cpmctl.data.dedup import required_seen
    from cpmctl.data.textio import resolve_inputs

    seen: set[int] = set()
    if a.get("preload_millions"):  # the same history the prefilled store holds, as a set in memory
        import numpy as np

        seen.update(np.random.default_rng(123).integers(-(2**63), 2**63 - 1, int(a["preload_millions"] * 1e6),
                                                        dtype=np.int64).view(np.uint64).tolist())
    start, cpu = time.perf_counter(), time.process_time()
    kept = dups = nbytes = 0
    with open(a["output"], "wb") as out:
        for shard in resolve_inputs([a["input"]]):
            with open(shard.path, "rb") as f:
                for line in f:
                    nbytes += len(line)
                    text = json.loads(line)["text"]
                    hs = {xxhash.xxh3_64_intdigest(p.encode()) for p in (q.strip() for q in text.split("\n")) if p}
                    if not hs:
                        continue
                    if sum(h in seen for h in hs) >= required_seen(0.7, len(hs)):
                        dups += 1
                        continue
                    kept += 1
                    seen |= hs
                    out.write(line)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"mb": nbytes / 1e6, "seconds": seconds, "mb_per_s": nbytes / 1e6 / seconds, "cpu_mb_per_s": nbytes / 1e6 / cpu,
            "kept": kept,
            "duplicates": dups, "set_size": len(seen), **_peaks()}


def job_prefill(a: dict) -> dict:
    """A store that already holds N random paragraph hashes, as after months of continual data."""
    import numpy as np

    from cpmctl.data.store import DedupStore

    start = time.perf_counter()
    n = int(a["millions"] * 1e6)
    rng = np.random.default_rng(123)
    with DedupStore.open(a["store"]) as store:
        conn = store.conn
        step = 1_000_000
        for i in range(0, n, step):
            hashes = np.sort(rng.integers(-(2**63), 2**63 - 1, size=min(step, n - i), dtype=np.int64))
            conn.execute("BEGIN")
            conn.executemany("INSERT OR IGNORE INTO paragraphs(hash) VALUES (?)", ((h,) for h in hashes.tolist()))
            conn.execute("COMMIT")
        count = conn.execute("SELECT count(*) FROM paragraphs").fetchone()[0]
        conn.execute("UPDATE meta SET value = ? WHERE key = 'paragraphs'", (str(count),))
        store.checkpoint()
    filled = time.perf_counter()
    # Direct inserts bypass the membership filter: the next open finds it stale and rebuilds it from the table.
    with DedupStore.open(a["store"]) as store:
        store.membership  # noqa: B018 - builds it; close() saves the sidecar
    from cpmctl.data.store import membership_path

    rebuilt = time.perf_counter()
    os.sync()  # the store just written is flushed here, not by the next run's first fsync (a store is rarely that new)
    return {"paragraphs": count, "seconds": filled - start, "rebuild_seconds": rebuilt - filled,
            "mb": Path(a["store"]).stat().st_size / 1e6,
            "membership_bytes": membership_path(Path(a["store"])).stat().st_size}


def job_merge(a: dict) -> dict:
    """The amortised cost dedup pays every merge_rows() new paragraphs (4M, or 1/4 of the store when more): a
    sorted bulk merge of `recent` into the main table."""
    import numpy as np

    from cpmctl.data.store import DedupStore

    rng = np.random.default_rng(321)
    with DedupStore.open(a["store"]) as store:
        rows = store.merge_rows()
        hashes = np.sort(rng.integers(-(2**63), 2**63 - 1, size=rows, dtype=np.int64)).tolist()
        store.conn.execute("BEGIN")
        store.conn.executemany("INSERT OR IGNORE INTO recent(hash) VALUES (?)", ((h,) for h in hashes))
        store.conn.execute("COMMIT")
        start = time.perf_counter()
        store.merge_recent()
        store.checkpoint()
        return {"rows": rows, "seconds": time.perf_counter() - start}


def job_filter(a: dict) -> dict:
    from cpmctl.data.filter import run_filter
    from cpmctl.data.recipe import FilterRecipe
    from cpmctl.data.textio import output_spec, resolve_inputs

    shards = resolve_inputs([a["input"]])
    cpu, workers_cpu = time.process_time(), _children_cpu()
    r = run_filter(shards, output_spec(a["output"], "jsonl", None), FilterRecipe(), workers=a["workers"],
                   on_progress=lambda n: WorkerRSS.sample())
    cpu, workers_cpu = time.process_time() - cpu, _children_cpu() - workers_cpu
    return {"mb": r.bytes / 1e6, "seconds": r.seconds, "mb_per_s": r.mb_per_s, "cpu_mb_per_s": r.bytes / 1e6 / cpu,
            "cpu_s": cpu, "workers_cpu_s": workers_cpu, "kept": r.kept, "rejected": sum(r.rejected.values()), **_peaks()}


JOBS = {"limit": job_limit, "dedup": job_dedup, "peer": job_peer, "prefill": job_prefill, "merge": job_merge, "filter": job_filter}


def _warm(corpus: Path) -> None:
    """Read the corpus once before a job, so every job finds it in the page cache (this machine's cache holds about
    2 GB: without it, a gigabyte corpus is partly read from disk by whichever job comes after the others' outputs)."""
    for path in sorted(corpus.rglob("*")) if corpus.is_dir() else [corpus]:
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


def _digest_and_drop(path: Path, keep: bool) -> str:
    """An output's xxh3_64, and the output deleted unless --keep (its pages would push the corpus out of the cache)."""
    import xxhash

    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    if not keep:
        path.unlink()
    return h.hexdigest()


def run_job(name: str, **kwargs) -> dict:
    # The corpus and earlier jobs' outputs written back to disk first: the kernel's writeback of a gigabyte of dirty
    # pages otherwise lands on whichever job runs when it starts (measured: on --workers 2, after --workers 1).
    os.sync()
    if "input" in kwargs:
        _warm(Path(kwargs["input"]))
    proc = subprocess.run([sys.executable, __file__, "--job", name, "--args", json.dumps(kwargs, default=str)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"job {name} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _repeated_pairs(run, repeat: int) -> tuple[tuple[dict, dict], list[float]]:
    """run(workers, i) for workers 1 then 2, `repeat` times: the run of median time for each, and each pair's
    wall-clock ratio w2 / w1."""
    ones, twos = [], []
    for i in range(max(1, repeat)):
        ones.append(run(1, i))
        twos.append(run(2, i))
    ratios = [a["seconds"] / b["seconds"] for a, b in zip(ones, twos)]
    median = lambda rows: sorted(rows, key=lambda r: r["seconds"])[len(rows) // 2]  # noqa: E731
    return (median(ones), median(twos)), ratios


def _ratios_text(ratios: list[float]) -> str:
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}x"
    return f"{statistics.median(ratios):.2f}x median of {len(ratios)} pairs ({', '.join(f'{r:.2f}' for r in ratios)})"


def _two_core_estimate(one: dict, two: dict) -> str:
    """What --workers 2 would take on 2 otherwise idle cores, from the CPU seconds each process used (robust to
    other load, unlike the wall-clock ratio): the main process and the workers share the 2 cores, and the main
    process alone is a floor."""
    main, workers = two["cpu_s"], two["workers_cpu_s"]
    est = max(main, (main + workers) / 2)
    return (f"cpu seconds --workers 2: main {main:.2f} + workers {workers:.2f} (--workers 1: {one['cpu_s']:.2f}); "
            f"on 2 idle cores about {est:.2f} s = {one['cpu_s'] / est:.2f}x --workers 1 (estimate, not a measurement)")


# ----- the benchmark -------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.job:
        print(json.dumps(JOBS[args.job](json.loads(args.args))))
        return
    work = args.workdir or Path(os.environ.get("TMPDIR", "/tmp")) / f"cpmctl-bench-data-{os.getpid()}"
    corpus = work / "corpus"
    marker = work / ".cpmctl-bench-data"  # the only kind of directory this bench deletes: one it made itself
    if work.exists() and any(work.iterdir()) and not marker.exists():
        sys.exit(f"--workdir {work}: exists and was not made by this bench; give an empty or new directory")
    shutil.rmtree(work, ignore_errors=True)
    corpus.mkdir(parents=True)
    marker.touch()
    cores = len(os.sched_getaffinity(0))
    try:
        t = time.perf_counter()
        info = generate_corpus(corpus, args.mb, args.shards)
        print(f"corpus: {info['bytes'] / 1e6:.1f} MB, {info['documents']:,} documents, "
              f"{info['planted_duplicates']:,} planted duplicates ({time.perf_counter() - t:.1f} s); {cores} cores")

        print(f"load average at the start: {os.getloadavg()[0]:.1f} on {cores} cores")
        limit = run_job("limit", input=corpus)
        texts = run_job("limit", input=corpus, mode="texts")
        print(f"\nlimit (read + parse, no rules, 1 process): {limit['mb_per_s']:.1f} MB/s, "
              f"{limit['cpu_mb_per_s']:.1f} cpu MB/s for whole records (filter); {texts['mb_per_s']:.1f} MB/s, "
              f"{texts['cpu_mb_per_s']:.1f} cpu MB/s for the text only (dedup); load average now "
              f"{os.getloadavg()[0]:.1f}")

        print("\n## dedup (fresh store) vs an in-memory set")
        rows = {}
        digests = []
        def dedup_run(w: int, i: int) -> dict:
            store = work / f"store-w{w}.sqlite"
            if i:  # a repeat starts from an empty store too
                for p in store.parent.glob(store.name + "*"):
                    p.unlink()
            r = run_job("dedup", input=corpus, output=work / f"dedup-w{w}.jsonl", store=store, workers=w)
            digests.append(_digest_and_drop(work / f"dedup-w{w}.jsonl", args.keep and i == args.repeat - 1))
            return r

        (rows["cpmctl --workers 1"], rows["cpmctl --workers 2"]), dedup_ratios = _repeated_pairs(dedup_run, args.repeat)
        rows["peer: python set"] = run_job("peer", input=corpus, output=work / "peer.jsonl")
        digests.append(_digest_and_drop(work / "peer.jsonl", args.keep))
        print(f"{'run':<22} {'MB/s':>8} {'cpu MB/s':>9} {'seconds':>8} {'kept':>9} {'dups':>9} {'peak RSS MB':>12} "
              f"{'workers RSS':>12}")
        for name, r in rows.items():
            print(f"{name:<22} {r['mb_per_s']:>8.1f} {r['cpu_mb_per_s']:>9.1f} {r['seconds']:>8.1f} {r['kept']:>9,} "
                  f"{r['duplicates']:>9,} {r['peak_rss_mb']:>12.0f} {r['worker_peak_rss_mb']:>12.0f}")
        one, two, peer = rows["cpmctl --workers 1"], rows["cpmctl --workers 2"], rows["peer: python set"]
        same = len(set(digests)) == 1
        print(f"identical outputs (w1, w2, peer): {same}")
        print(f"ratio cpmctl w1 / peer: {one['mb_per_s'] / peer['mb_per_s']:.2f}x;  "
              f"scaling w2 / w1: {_ratios_text(dedup_ratios)};  "
              f"store: {one['store_paragraphs']:,} paragraphs, {one['store_mb']:.1f} MB")
        print(_two_core_estimate(one, two))
        print(f"dedup w1 / limit (text only): {one['mb_per_s'] / texts['mb_per_s']:.2f} (wall), "
              f"{one['cpu_mb_per_s'] / texts['cpu_mb_per_s']:.2f} (cpu)")

        print(f"\n## memory as the store grows (store prefilled with {args.prefill_millions:g}M paragraphs)")
        big = work / "store-big.sqlite"
        pre = run_job("prefill", store=big, millions=args.prefill_millions)
        print(f"prefill: {pre['paragraphs']:,} paragraphs, {pre['mb']:.0f} MB file, {pre['seconds']:.1f} s; membership "
              f"filter rebuilt from the table in {pre['rebuild_seconds']:.1f} s, {pre['membership_bytes'] / 1e6:.1f} MB = "
              f"{pre['membership_bytes'] / pre['paragraphs']:.2f} bytes per paragraph")
        grown = run_job("dedup", input=corpus, output=work / "dedup-big.jsonl", store=big, workers=1)
        _digest_and_drop(work / "dedup-big.jsonl", args.keep)
        grown_peer = run_job("peer", input=corpus, output=work / "peer-big.jsonl", preload_millions=args.prefill_millions)
        _digest_and_drop(work / "peer-big.jsonl", args.keep)
        print(f"{'history before the run':<30} {'MB/s':>8} {'peak RSS MB':>12}   RSS MB during the run (every 10 MB)")
        for name, r in (("cpmctl, empty store", one), (f"cpmctl, {pre['paragraphs'] / 1e6:.1f}M in store", grown),
                        ("peer, empty set", peer), (f"peer, {grown_peer['set_size'] / 1e6:.1f}M in set", grown_peer)):
            trace = " ".join(f"{s[1]:.0f}" for s in r.get("rss_samples", []))
            print(f"{name:<30} {r['mb_per_s']:>8.1f} {r['peak_rss_mb']:>12.0f}   {trace}")
        merge = run_job("merge", store=big)
        new_per_mb = one["store_paragraphs"] / one["mb"]
        every_mb = merge["rows"] / new_per_mb
        amortised = every_mb / (every_mb / grown["mb_per_s"] + merge["seconds"])
        print(f"memory per stored paragraph: membership filter {pre['membership_bytes'] / pre['paragraphs']:.2f} bytes, "
              f"unmerged paragraphs in memory <= 2.00 beyond 16M stored (8 bytes each, at most 4M or 1/4 of the store), SQLite page "
              f"cache fixed ({grown['peak_rss_mb']:.0f} MB peak RSS with {pre['paragraphs'] / 1e6:.1f}M stored)")
        print(f"bulk merge of {merge['rows']:,} new paragraphs into the {pre['paragraphs'] / 1e6:.1f}M store: "
              f"{merge['seconds']:.1f} s, once per ~{every_mb:.0f} MB of this corpus's new text")
        print(f"dedup MB/s per core (--workers 1): {one['mb_per_s']:.1f} with an empty store, {grown['mb_per_s']:.1f} "
              f"with {pre['paragraphs'] / 1e6:.1f}M paragraphs stored, {amortised:.1f} with merges amortised (goal 40); "
              f"cpu MB/s {one['cpu_mb_per_s']:.1f} / {grown['cpu_mb_per_s']:.1f}")

        if not args.skip_filter:
            print("\n## filter (default recipe)")
            print(f"{'run':<22} {'MB/s':>8} {'cpu MB/s':>9} {'seconds':>8} {'kept':>9} {'rejected':>9} {'peak RSS MB':>12}")
            frows, fdigests = {}, []
            def filter_run(w: int, i: int) -> dict:
                r = run_job("filter", input=corpus, output=work / f"filter-w{w}.jsonl", workers=w)
                fdigests.append(_digest_and_drop(work / f"filter-w{w}.jsonl", args.keep and i == args.repeat - 1))
                return r

            (frows[1], frows[2]), filter_ratios = _repeated_pairs(filter_run, args.repeat)
            for w, r in frows.items():
                print(f"{f'cpmctl --workers {w}':<22} {r['mb_per_s']:>8.1f} {r['cpu_mb_per_s']:>9.1f} {r['seconds']:>8.1f} "
                      f"{r['kept']:>9,} {r['rejected']:>9,} {r['peak_rss_mb']:>12.0f}")
            print(_two_core_estimate(frows[1], frows[2]))
            same = len(set(fdigests)) == 1
            print(f"identical outputs (w1, w2): {same}; scaling w2 / w1: "
                  f"{_ratios_text(filter_ratios)} (goal 1.6); w1 / limit "
                  f"{frows[1]['mb_per_s'] / limit['mb_per_s']:.2f} (goal: w1 >= 15 MB/s)")
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {cores} cores")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
