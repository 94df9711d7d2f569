"""Model benchmark: one full training step (forward, backward, AdamW step) of a LoRA LLaMA, contenders interleaved.

Models are the RunLoRA paper's LLaMA configs (60m: hidden 512, ffn 1376, 8 layers, 8 heads; 130m: 768, 2048,
12, 12) built from `LlamaConfig` with random weights and a 4096-token vocabulary (the paper's 32000 would make
the LM head, which no LoRA touches, a large share of a CPU step). LoRA on all seven projections.

Contenders (each its own deep copy of the same initial model and its own AdamW):

* ``frozen_eager``: the floor: the same model with no LoRA at all (peft's base, unloaded), every weight frozen
  except the RMSNorm weights, so that backward still runs every dX through every layer.
* ``frozen_inductor``: the floor under ``torch.compile`` (inductor), compiled like the others.
* ``peft_eager``: the peft model as is.
* ``peft_inductor``: ``torch.compile(model)`` (inductor).
* ``optimize``: ``runlora_fx.optimize(model)`` (planned nodes patched in place, eager otherwise).
* ``optimize_fast``: ``runlora_fx.optimize(model, dropout_rng="fast")`` (dropout rows only: without dropout it
  is ``optimize``).
* ``optimize_tuned``: ``runlora_fx.optimize(model, autotune=True)`` (each site's finalists timed at its first
  call, `kernels/autotune.py`; not in the default set).
* ``runlora``: ``torch.compile(model, backend="runlora")`` (LoRA sites rewritten, then inductor).
* ``runlora_fast``: the same with ``options={"dropout_rng": "fast"}`` (not in the default set: one more compile
  per row).
* ``runlora_joint`` / ``runlora_opaque``: the same with ``options={"lowering": "joint"}`` (sites planned inside
  inductor's joint graph, `passes/joint.py`; what "auto" picks for these dense models) or ``"opaque"`` (one
  custom op per site); not in the default set.

Besides speedups, each row reports the share of LoRA's cost a contender removes, ``(peft - contender) / (peft -
frozen)``, each path against its own stock and floor: eager contenders against ``peft_eager`` and
``frozen_eager``, compiled ones against ``peft_inductor`` and ``frozen_inductor`` (`SHARES`).

The first call of each contender (compilation, planning) is timed separately as ``first_call_s``.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch

from .common import DTYPES, SavedBytes, log, loadavg, markdown_table
from .harness import geomean, interleaved, ratio_stats, share_stats, summarize

MODELS = {
    "60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
    "130m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    # quick mode only: the 60m widths with two layers (a smoke run of the same code, not a paper config)
    "60m-1l": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=1, num_attention_heads=8),
}
VOCAB = 4096
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (batch, sequence) per (model, dtype): chosen so that a peft eager step (r 8, dropout 0.05) takes about 1-2 s on
# this 2-core CPU when it is not shared (measured 0.55 / 0.78 / 0.83 / 0.75 s at half these token counts).
TOKENS = {("60m", "float32"): (1, 512), ("60m", "bfloat16"): (2, 512),
          ("130m", "float32"): (1, 256), ("130m", "bfloat16"): (1, 512),
          ("60m-1l", "float32"): (2, 128), ("60m-1l", "bfloat16"): (2, 128)}
LORA_CONTENDERS = ("peft_eager", "peft_inductor", "optimize", "runlora")  # the memory suite's (one process each)
CONTENDERS = ("frozen_eager", "frozen_inductor", "peft_eager", "peft_inductor", "optimize", "optimize_fast",
              "runlora")
ALL_CONTENDERS = CONTENDERS + ("optimize_tuned", "runlora_fast", "runlora_joint", "runlora_opaque")
LOWERING = {"runlora_joint": "joint", "runlora_opaque": "opaque"}  # contenders that force the backend's lowering
FAST = {"optimize_fast": "optimize", "runlora_fast": "runlora"}  # contenders that differ only when there is dropout
RATIOS = [("peft_eager", "optimize"), ("peft_eager", "optimize_fast"), ("peft_eager", "optimize_tuned"), ("peft_eager", "runlora"),
          ("peft_inductor", "runlora"), ("peft_inductor", "runlora_fast"), ("peft_inductor", "runlora_joint"),
          ("peft_inductor", "runlora_opaque"),
          ("peft_inductor", "optimize"),
          ("peft_eager", "peft_inductor"),
          ("peft_eager", "frozen_eager"), ("peft_inductor", "frozen_inductor")]  # baseline time / contender
# (contender, its stock, its floor): the share of LoRA's cost removed, each path against its own peft and floor
SHARES = [("optimize", "peft_eager", "frozen_eager"), ("optimize_fast", "peft_eager", "frozen_eager"),
          ("optimize_tuned", "peft_eager", "frozen_eager"),
          ("runlora", "peft_inductor", "frozen_inductor"), ("runlora_fast", "peft_inductor", "frozen_inductor"),
          ("runlora_joint", "peft_inductor", "frozen_inductor"), ("runlora_opaque", "peft_inductor", "frozen_inductor")]


@dataclass(frozen=True)
class ModelRow:
    model: str
    rank: int
    dropout: float
    dtype: str

    @property
    def name(self) -> str:
        return f"llama-{self.model} r={self.rank} p={self.dropout:g} {self.dtype}"


@dataclass
class ModelConfig:
    models: tuple = ("60m", "130m")
    ranks: tuple = (8, 128)
    dropouts: tuple = (0.0, 0.05)
    dtypes: tuple = ("float32", "bfloat16")
    contenders: tuple = CONTENDERS
    repeats: int = 5
    warmup: int = 1
    tokens: dict = field(default_factory=lambda: {f"{m}/{d}": v for (m, d), v in TOKENS.items()})
    # "layers": each decoder layer compiled (one graph, reused by every block); "model": the whole model at once
    # (a cold inductor compile of the 8-layer 60m took 354 s here, against tens of seconds for one block)
    compile_scope: str = "layers"

    def rows(self) -> list[ModelRow]:
        """Rows in priority order (a run cut short by its budget keeps the most telling ones): the paper's setting
        (r 8) with dropout first, then r 128 without, then the other two; fp32 before bf16; both models each."""
        pairs = [(8, 0.05), (128, 0.0), (8, 0.0), (128, 0.05)]
        pairs = [(r, p) for r, p in pairs if r in self.ranks and p in self.dropouts]
        pairs += [(r, p) for r in self.ranks for p in self.dropouts if (r, p) not in pairs]
        return [ModelRow(m, r, p, d) for r, p in pairs for d in self.dtypes for m in self.models]


QUICK = ModelConfig(models=("60m-1l",), ranks=(8,), dropouts=(0.05,), dtypes=("float32",), repeats=3)


def build_peft_model(row: ModelRow, seed: int = 0):
    """The peft LLaMA of a row, in train mode, in the row's dtype (adapters included)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    spec = MODELS[row.model]
    # use_cache=False: a training step needs no KV cache, and the cache's per-layer state is a guard that makes
    # dynamo compile every decoder layer separately
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=1024, num_key_value_heads=spec["num_attention_heads"],
                      use_cache=False, **spec)
    model = LlamaForCausalLM(cfg)
    model = get_peft_model(model, LoraConfig(r=row.rank, lora_alpha=2 * row.rank, lora_dropout=row.dropout,
                                             target_modules=TARGETS))
    with torch.no_grad():  # peft starts B at zero; random B is what the layers see once training has moved
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.to(DTYPES[row.dtype]).train()


def frozen_model(peft_model):
    """The floor of a row: `peft_model`'s base with the LoRA layers removed (unloaded, not merged), every
    parameter frozen except the RMSNorm weights, so that backward still runs every layer's dX."""
    model = peft_model.unload()
    for mod in model.modules():
        trainable = type(mod).__name__.endswith("RMSNorm")
        for p in mod.parameters(recurse=False):
            p.requires_grad_(trainable)
    return model.train()


def batch_for(row: ModelRow, cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    b, s = cfg.tokens[f"{row.model}/{row.dtype}"]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, s), generator=g)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The transformer blocks of a (peft-wrapped) HF causal LM: the ModuleList named ``layers``."""
    for path, mod in model.named_modules():
        if path.endswith("layers") and isinstance(mod, torch.nn.ModuleList):
            return mod
    raise ValueError("no ModuleList named 'layers' in the model")


def compile_model(model, backend, scope: str):
    """``torch.compile`` the whole model, or each decoder layer in place (PyTorch's regional compilation: the
    blocks share one compiled graph, so a cold compile costs one block instead of all of them)."""
    if scope == "model":
        return torch.compile(model, backend=backend)
    if scope != "layers":
        raise ValueError(f"compile scope must be 'layers' or 'model', got {scope!r}")
    for block in decoder_layers(model):
        block.compile(backend=backend)
    return model


def contender_model(name: str, model, scope: str = "layers"):
    """Wrap or patch a fresh copy of `model` as contender `name`; returns (model, note) or (None, why skipped)."""
    import runlora_fx

    if name == "frozen_eager":
        return frozen_model(model), None
    if name == "frozen_inductor":
        return compile_model(frozen_model(model), "inductor", scope), None
    if name == "peft_eager":
        return model, None
    if name == "peft_inductor":
        return compile_model(model, "inductor", scope), None
    if name in ("optimize", "optimize_fast"):
        return runlora_fx.optimize(model, **_fast_options(name)), None
    if name == "optimize_tuned":
        return runlora_fx.optimize(model, autotune=True), None
    if name in ("runlora", "runlora_fast", *LOWERING):
        backend = _runlora_backend()
        if name != "runlora":
            import functools

            from runlora_fx.backend import runlora_backend

            options = {"lowering": LOWERING[name]} if name in LOWERING else _fast_options(name)
            backend = functools.partial(runlora_backend, options=options)
        return compile_model(model, backend, scope), None
    raise ValueError(f"unknown contender {name!r}; valid: {', '.join(ALL_CONTENDERS)}")


def _fast_options(name: str) -> dict:
    return {"dropout_rng": "fast"} if name in FAST else {}


def _runlora_backend():
    """The string "runlora" when the entry point is registered, else the backend function itself."""
    try:
        torch._dynamo.lookup_backend("runlora")
        return "runlora"
    except Exception:
        from runlora_fx.backend import runlora_backend

        return runlora_backend


def train_step(model, ids: torch.Tensor):
    """A closure running one training step of `model` with its own AdamW."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss

    return step


def saved_for_backward(model, ids: torch.Tensor) -> dict:
    """Exact bytes the forward keeps for backward (parameters and buffers excluded), for one step."""
    counter = SavedBytes(list(model.parameters()) + list(model.buffers()))
    with counter.hooks():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return counter.to_dict()


def run_row(row: ModelRow, cfg: ModelConfig) -> dict:
    t_start = time.perf_counter()
    base = build_peft_model(row)
    ids = batch_for(row, cfg)
    steps, first, notes, models = {}, {}, {}, {}
    for name in cfg.contenders:
        if name in FAST and row.dropout == 0:
            notes[name] = f"no dropout: the same program as {FAST[name]}"
            continue
        t0 = time.perf_counter()
        try:
            m, note = contender_model(name, base if name == "peft_eager" else copy.deepcopy(base), cfg.compile_scope)
            if m is None:
                notes[name] = note
                log(f"  {name}: {note}")
                continue
            step = train_step(m, ids)
            step()
        except Exception as exc:  # report, do not hide: a contender that fails is a finding
            notes[name] = f"first step failed: {type(exc).__name__}: {exc}"[:500]
            log(f"  {name}: {notes[name]}")
            continue
        models[name], steps[name] = m, step
        first[name] = time.perf_counter() - t0
        log(f"  {name}: first call {first[name]:.1f} s")
    times = interleaved(steps, repeats=cfg.repeats, warmup=cfg.warmup)
    saved = {name: saved_for_backward(m, ids) for name, m in models.items()}
    ratios = {f"{a}/{b}": ratio_stats(times, a, b) for a, b in RATIOS if a in times and b in times}
    shares = {c: share_stats(times, c, s, f) for c, s, f in SHARES if {c, s, f} <= set(times)}
    reports = _runlora_reports()
    return {"row": asdict(row), "name": row.name, "tokens": list(ids.shape), "times_s": times,
            "summary": summarize(times), "speedups": ratios, "shares_removed": shares, "first_call_s": first,
            "notes": notes,
            "saved_for_backward": saved, "runlora_backend_report": reports, "loadavg": loadavg(),
            "wall_s": time.perf_counter() - t_start}


def _runlora_reports():
    try:
        from runlora_fx import backend

        return [{"rewritten": r.get("rewritten"), "skipped": [str(s) for s in r.get("skipped", [])]}
                for r in backend.last_reports[-4:]]
    except Exception:  # pragma: no cover
        return None


def aggregate(rows: list[dict]) -> dict:
    out: dict = {"rows": len(rows)}
    for key in ("peft_eager/runlora", "peft_inductor/runlora", "peft_eager/optimize", "peft_inductor/optimize",
                "peft_eager/optimize_fast", "peft_inductor/runlora_fast", "peft_eager/frozen_eager",
                "peft_inductor/frozen_inductor"):
        vals = [r["speedups"][key]["median"] for r in rows if key in r["speedups"]]
        if vals:
            out[key] = {"geomean": geomean(vals), "min": min(vals), "max": max(vals), "rows": len(vals)}
    for name, _, _ in SHARES:
        vals = [r["shares_removed"][name]["median"] for r in rows
                if r.get("shares_removed", {}).get(name, {}).get("median") is not None]
        if vals:
            out[f"share removed {name}"] = {"min": min(vals), "max": max(vals), "rows": len(vals)}
    for name in ("optimize", "optimize_fast", "runlora", "runlora_fast", "peft_inductor"):
        fr = [r["saved_for_backward"][name]["bytes"] / r["saved_for_backward"]["peft_eager"]["bytes"]
              for r in rows if name in r["saved_for_backward"] and "peft_eager" in r["saved_for_backward"]]
        if fr:
            out[f"saved {name}/peft_eager"] = {"max": max(fr), "min": min(fr)}
    return out


def markdown(rows: list[dict]) -> str:
    """Two tables: times and speedups per row, then each path's peft / frozen and the shares removed."""
    header = ["model", "r", "p", "dtype", "tokens", "eager s", "inductor s", "optimize s", "runlora s",
              "vs eager (runlora)", "vs inductor (runlora)", "vs eager (optimize)", "vs eager (optimize fast)",
              "saved MiB eager/ind/opt/opt-fast/rl"]
    body, shares = [], []
    for r in rows:
        row, med = r["row"], {k: v["median"] for k, v in r["summary"].items()}
        sp = r["speedups"]
        sv = r["saved_for_backward"]
        mib = "/".join(f"{sv[c]['bytes'] / 2**20:.1f}" if c in sv else "-"
                       for c in ("peft_eager", "peft_inductor", "optimize", "optimize_fast", "runlora"))
        lead = [row["model"], row["rank"], row["dropout"], row["dtype"]]
        body.append(lead + ["x".join(map(str, r["tokens"])),
                     med.get("peft_eager"), med.get("peft_inductor"), med.get("optimize"), med.get("runlora"),
                     sp.get("peft_eager/runlora", {}).get("median"), sp.get("peft_inductor/runlora", {}).get("median"),
                     sp.get("peft_eager/optimize", {}).get("median"),
                     sp.get("peft_eager/optimize_fast", {}).get("median"), mib])
        sh = r.get("shares_removed", {})
        shares.append(lead + [sp.get("peft_eager/frozen_eager", {}).get("median"),
                              sp.get("peft_inductor/frozen_inductor", {}).get("median")]
                      + [sh.get(c, {}).get("median") for c, _, _ in SHARES])
    share_header = ["model", "r", "p", "dtype", "peft / frozen (eager)", "peft / frozen (inductor)"] + \
        [f"share removed: {c}" for c, _, _ in SHARES]
    return (markdown_table(header, body) + "\n\nShare of LoRA's cost removed, (peft - contender) / (peft - frozen), "
            "eager contenders against peft eager and the frozen model eager, compiled ones against both under "
            "inductor:\n\n" + markdown_table(share_header, shares))


RECOMPILE_LIMIT = 64  # regional compilation: blocks x requires_grad variants x backends share one code object


def configure_dynamo() -> None:
    """Room for every contender's graphs of the one decoder-layer code object, and an error instead of a silent
    eager fallback when that room runs out (a compiled contender that runs eager would measure the wrong thing)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           16 * RECOMPILE_LIMIT)
    torch._dynamo.config.fail_on_recompile_limit_hit = True


def run(cfg: ModelConfig, on_row=None, budget_s: float | None = None) -> dict:
    rows = cfg.rows()
    log(f"model: {len(rows)} rows")
    configure_dynamo()
    done, skipped, t_start = [], [], time.perf_counter()
    for idx, row in enumerate(rows):
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            skipped = [{"row": asdict(r), "reason": f"not run: the suite's time budget ({budget_s:.0f} s) was spent"}
                       for r in rows[idx:]]
            log(f"model: budget spent, {len(skipped)} rows not run")
            break
        log(f"model {idx + 1}/{len(rows)} {row.name}")
        res = run_row(row, cfg)
        done.append(res)
        sp = res["speedups"]
        log(f"model {row.name}: " + ", ".join(f"{k} {v['median']:.3f}x" for k, v in sp.items()))
        torch._dynamo.reset()  # each row is a new model: drop the compiled code of the last one
        if on_row:
            on_row({"config": asdict(cfg), "rows": done, "aggregate": aggregate(done)})
    return {"config": asdict(cfg), "rows": done, "not_run": skipped, "aggregate": aggregate(done)}
