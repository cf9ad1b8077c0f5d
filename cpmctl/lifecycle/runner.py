"""`cpmctl run RECIPE`: the whole lifecycle as a list of stages, each resumable.

Each stage runs the same `cpmctl` command a user would run from a shell script, with `--json`, in a child process
(so every stage is exactly the documented command, and memory is returned between stages). A stage's JSON results,
outputs and timing are recorded in `<run_dir>/state.json`; a rerun skips stages whose recorded outputs still exist.

One driver per run directory (its lock, cpmctl/outputs.py). Each stage child leads its own process group and dies
with the driver: a driver stopped by SIGTERM / Ctrl-C sends SIGTERM to the child's group (the training stages save
a checkpoint), then SIGKILL after STOP_GRACE_S; a driver killed outright takes its child with it through the
parent-death signal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from cpmctl import CpmctlError
from cpmctl.io import atomic_file
from cpmctl.lifecycle.recipe import LifecycleRecipe
from cpmctl.outputs import run_dir, stage_preexec
from cpmctl.resources import import_root

STATE_FILE = "state.json"
STOP_GRACE_S = float(os.environ.get("CPMCTL_STOP_GRACE_S", "30"))  # SIGTERM -> SIGKILL for a stage's process group


class Run:
    """Shared context of a lifecycle run: paths, the recipe, recorded state, and the command runner."""

    def __init__(self, recipe: LifecycleRecipe, echo: Callable[[str], None], force: bool = False):
        self.recipe = recipe
        self.run_dir = run_dir(recipe.run_dir, "run", force=force, what="run_dir",
                               accept=lambda p: (p / STATE_FILE).exists())
        self.dir = self.run_dir.work
        self.echo = echo
        self.forced = False  # the stage now running was asked for again (--from-stage / --only)
        try:
            self.state = self._load_state()
        except BaseException:
            self.run_dir.__exit__(*sys.exc_info())
            raise
        self._commands: list[str] = []
        self._results: list[dict] = []

    # ----- state ---------------------------------------------------------------------------------------------
    def _load_state(self) -> dict:
        path = self.dir / STATE_FILE
        if not path.exists():
            return {"stages": {}}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise CpmctlError(f"{path}: damaged run state; delete it to start the run again") from None

    def save_state(self) -> None:
        with atomic_file(self.dir / STATE_FILE) as f:
            json.dump(self.state, f, indent=2, ensure_ascii=False)

    def done(self, stage: str) -> bool:
        rec = self.state["stages"].get(stage)
        return bool(rec) and all(Path(p).exists() for p in rec["outputs"].values())

    def record(self, stage: str) -> dict:
        if stage not in self.state["stages"]:
            raise CpmctlError(f"this stage needs the outputs of stage '{stage}', which has not run in {self.dir}; "
                              f"add '{stage}' to the recipe's stages (before this one)")
        return self.state["stages"][stage]

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    # ----- commands ------------------------------------------------------------------------------------------
    def cpmctl(self, *args: str, json_out: bool = True, env: dict | None = None) -> list[dict]:
        """Run one cpmctl command in a child process; return its JSON objects. Its progress shows on stderr."""
        argv = [sys.executable, "-m", "cpmctl", *[str(a) for a in args]]
        if json_out:
            argv.append("--json")
        shown = "cpmctl " + " ".join(_quote(str(a)) for a in args) + (" --json" if json_out else "")
        self._commands.append(shown)
        self.echo(f"  $ {shown}")
        child_env = dict(os.environ, **(env or {}))
        child_env.setdefault("PYTHONPATH", str(import_root()))
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=None, text=True, env=child_env,
                                preexec_fn=stage_preexec(signal.SIGTERM))
        try:
            stdout, _ = proc.communicate()
        except BaseException:
            stop_group(proc)
            raise
        if proc.returncode != 0:
            raise CpmctlError(f"stage command failed (exit {proc.returncode}): {shown}",
                              exit_code=proc.returncode if proc.returncode > 0 else 1)
        objects = []
        for line in stdout.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    objects.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        self._results.extend(objects)
        return objects

    def begin(self) -> None:
        self._commands, self._results = [], []

    def finish(self, stage: str, seconds: float, outputs: dict[str, Path], **extra) -> None:
        self.state["stages"][stage] = {
            "seconds": round(seconds, 2),
            "outputs": {k: str(v) for k, v in outputs.items()},
            "results": self._results,
            "commands": self._commands,
            **extra,
        }
        self.save_state()


def _quote(s: str) -> str:
    return f"'{s}'" if (" " in s or not s) else s


def stop_group(proc: subprocess.Popen, grace_s: float | None = None) -> None:
    """SIGTERM to the child's process group, SIGKILL after the grace period; returns once the child is reaped."""
    grace_s = STOP_GRACE_S if grace_s is None else grace_s
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group (the child's own workers)
    except ProcessLookupError:
        pass


class _StopOnSignal:
    """SIGTERM / SIGHUP to the driver end the run like Ctrl-C does (the stage child is stopped first)."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def run_lifecycle(recipe: LifecycleRecipe, stages, from_stage: str | None = None, only: str | None = None,
                  echo: Callable[[str], None] = print, force: bool = False) -> Run:
    """Run the recipe's stages in order; `stages` maps a stage name to its function(run) -> outputs dict.
    run_dir follows the output policy (cpmctl/outputs.py): locked for the run; `force` runs anew beside it."""
    names = list(recipe.stages)
    for name in names:
        if name not in stages:
            raise CpmctlError(f"recipe: unknown stage '{name}' (known: {', '.join(stages)})")
    if from_stage is not None and from_stage not in names:
        raise CpmctlError(f"--from-stage {from_stage}: not a stage of this recipe ({', '.join(names)})")
    if only is not None and only not in names:
        raise CpmctlError(f"--only {only}: not a stage of this recipe ({', '.join(names)})")
    run = Run(recipe, echo, force)
    with run.run_dir, _StopOnSignal():
        _run_stages(run, names, stages, from_stage, only, echo)
        if run.run_dir.temp:
            run.state = run.run_dir.rebase(run.state)
            run.save_state()
            run.dir = run.run_dir.commit()
    return run


def _run_stages(run: Run, names: list[str], stages, from_stage: str | None, only: str | None, echo) -> None:
    start_index = names.index(from_stage) if from_stage else 0
    total = time.perf_counter()
    for i, name in enumerate(names):
        if only is not None and name != only:
            continue
        forced = only == name or (from_stage is not None and i >= start_index)
        if i < start_index and only is None:
            if not run.done(name):
                raise CpmctlError(f"--from-stage {from_stage}: earlier stage '{name}' has not finished")
            continue
        if run.done(name) and not forced:
            echo(f"[{i + 1}/{len(names)}] {name}: done earlier ({run.record(name)['seconds']:.0f}s), skipped")
            continue
        echo(f"[{i + 1}/{len(names)}] {name}")
        run.begin()
        run.forced = forced
        t0 = time.perf_counter()
        outputs = stages[name](run)
        run.finish(name, time.perf_counter() - t0, outputs)
        echo(f"[{i + 1}/{len(names)}] {name}: finished in {time.perf_counter() - t0:.0f}s")
    run.state["total_seconds_last_invocation"] = round(time.perf_counter() - total, 2)
    run.save_state()
