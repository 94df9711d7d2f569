"""Memory benchmark: bytes saved for backward per training step (exact) and peak RSS, per contender.

Saved bytes are counted with `saved_tensors_hooks` (every tensor autograd keeps, once per storage, parameters and
buffers excluded): no sampling, no noise. Peak RSS needs a process of its own per contender, or the contenders
would share one high-water mark: each contender runs in a fresh subprocess (`python -m benchmarks.memory
--worker ...`) that builds the model, compiles it with a first step, then runs `steps` steps while a thread
samples /proc/self/statm every millisecond. Reported: RSS before the measured steps, the peak during them, and
their difference (the step's transient footprint), plus the process's ru_maxrss (which includes compilation).
Workers run with a fixed glibc mmap threshold (`MALLOC_ENV`) so that RSS follows live memory.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import asdict

from .common import log, markdown_table

# A fixed mmap threshold turns off glibc's adaptive one, so every large tensor is mmap'd and handed back to the OS
# when freed: RSS then follows live memory, and a step's peak minus the RSS between steps is its transient footprint
# (with the adaptive threshold, freed activations stay resident and the next step reuses them invisibly).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler:
    """Highest RSS seen by a background thread while the `with` block runs."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def worker(args: dict) -> dict:
    """One contender of one row, in this (fresh) process."""
    import gc

    import torch

    from . import model as mb

    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    mb.configure_dynamo()
    row = mb.ModelRow(**args["row"])
    cfg = mb.ModelConfig(tokens=args["tokens"], compile_scope=args.get("compile_scope", "layers"))
    ids = mb.batch_for(row, cfg)
    model, note = mb.contender_model(args["contender"], mb.build_peft_model(row), cfg.compile_scope)
    if model is None:
        return {"skipped": note}
    step = mb.train_step(model, ids)
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    step()
    saved = mb.saved_for_backward(model, ids)
    gc.collect()
    before = rss_bytes()
    with PeakSampler() as sampler:
        for _ in range(args.get("steps", 2)):
            step()
    return {"saved_for_backward": saved, "rss_before": before, "rss_peak": sampler.peak,
            "rss_step_increase": sampler.peak - before,
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "first_call_s": first}


def run_contender(row, contender: str, cfg, threads: int, steps: int = 2, timeout: float = 1800) -> dict:
    payload = json.dumps({"row": asdict(row), "contender": contender, "tokens": cfg.tokens, "threads": threads,
                          "steps": steps, "compile_scope": cfg.compile_scope})
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--worker", payload], capture_output=True,
                          text=True, timeout=timeout, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env={**os.environ, **MALLOC_ENV})
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": f"worker exited {proc.returncode}: {proc.stderr.strip().splitlines()[-3:]}"}


def run(cfg, threads: int, on_row=None) -> dict:
    """Every row of the model config `cfg`, each contender in its own process."""
    done = []
    rows = cfg.rows()
    log(f"memory: {len(rows)} rows x {len(cfg.contenders)} contenders, one process each")
    for idx, row in enumerate(rows):
        res = {"row": asdict(row), "name": row.name, "contenders": {}}
        for c in cfg.contenders:
            t0 = time.perf_counter()
            res["contenders"][c] = run_contender(row, c, cfg, threads)
            r = res["contenders"][c]
            log(f"memory {idx + 1}/{len(rows)} {row.name} {c}: "
                + (f"saved {r['saved_for_backward']['bytes'] / 2**20:.1f} MiB, step RSS +"
                   f"{r['rss_step_increase'] / 2**20:.0f} MiB" if "saved_for_backward" in r else str(r))
                + f" ({time.perf_counter() - t0:.0f} s)")
        done.append(res)
        if on_row:
            on_row({"rows": done, "aggregate": aggregate(done)})
    return {"rows": done, "aggregate": aggregate(done)}


def aggregate(rows: list[dict]) -> dict:
    out = {}
    for c in ("peft_inductor", "optimize", "runlora"):
        fr = []
        for r in rows:
            a, b = r["contenders"].get(c, {}), r["contenders"].get("peft_eager", {})
            if "saved_for_backward" in a and "saved_for_backward" in b:
                fr.append((r["row"]["dropout"], a["saved_for_backward"]["bytes"] / b["saved_for_backward"]["bytes"]))
        if fr:
            out[f"saved {c}/peft_eager"] = {"max": max(x for _, x in fr), "min": min(x for _, x in fr),
                                            "max_dropout_0.05": max((x for p, x in fr if p > 0), default=None)}
    return out


def markdown(rows: list[dict]) -> str:
    from .model import LORA_CONTENDERS as CONTENDERS

    header = ["model", "r", "p", "dtype"] + [f"{c} saved MiB" for c in CONTENDERS] + \
             [f"{c} step RSS +MiB" for c in CONTENDERS]
    body = []
    for r in rows:
        row, cs = r["row"], r["contenders"]
        saved = [cs[c]["saved_for_backward"]["bytes"] / 2**20 if "saved_for_backward" in cs.get(c, {}) else None
                 for c in CONTENDERS]
        rss = [cs[c]["rss_step_increase"] / 2**20 if "rss_step_increase" in cs.get(c, {}) else None for c in CONTENDERS]
        body.append([row["model"], row["rank"], row["dropout"], row["dtype"]] + saved + rss)
    return markdown_table(header, body)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print("RESULT " + json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
    else:
        raise SystemExit("usage: python -m benchmarks.memory --worker JSON (run `python -m benchmarks memory`)")
