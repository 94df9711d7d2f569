"""The main job behind `make demo`: a small LLaMA with peft LoRA, trained side by side plain and optimized, and
the floor: the same model with no LoRA at all.

All models start from the same weights and see the same batches and dropout seeds; steps rotate between them so
machine noise hits all alike, and the median step times are compared. The floor (`frozen_copy`) says what LoRA
costs at all: the share of that cost runlora_fx removes is (peft - runlora_fx) / (peft - frozen).
Saved-for-backward bytes are counted exactly with `saved_tensors_hooks` on one step of each.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch

from .api import explain, optimize, optimized_sites
from .planner.device import calibrate, get_profile
from .saved_bytes import SavedBytes

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class DemoConfig:
    hidden: int = 256  # llama_20m's widths (shared/reference/runlora-paper.md), fewer layers and a small vocab
    ffn: int = 688
    layers: int = 2
    heads: int = 4
    vocab: int = 512
    batch: int = 4
    seq: int = 256
    rank: int = 8
    dropout: float = 0.05
    steps: int = 8
    dtype: str = "float32"
    seed: int = 0
    qlora: bool = False  # bases quantized to bitsandbytes nf4 (double quantization, bf16 compute), peft's bnb layer
    calibrate: bool = True  # measure the device first when no calibration is cached (the defaults are conservative)


def build_model(cfg: DemoConfig):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    shape = dict(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.ffn,
                 num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                 max_position_embeddings=max(cfg.seq, 64))
    if cfg.qlora:
        from .demo_models import build_qlora_llama

        return build_qlora_llama(shape, quant_type="nf4", compress_statistics=True, compute_dtype=torch.bfloat16,
                                 dtype=getattr(torch, cfg.dtype), peft_layer="bnb", r=cfg.rank,
                                 lora_dropout=cfg.dropout, seed=cfg.seed)
    base = LlamaForCausalLM(LlamaConfig(**shape)).to(getattr(torch, cfg.dtype))
    model = get_peft_model(base, LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, lora_dropout=cfg.dropout,
                                            target_modules=PROJECTIONS))
    return model


def batches(cfg: DemoConfig, count: int) -> list[torch.Tensor]:
    """Token batches with some structure (a noisy repeating pattern), so the loss can actually fall."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    out = []
    for _ in range(count):
        start = torch.randint(0, cfg.vocab, (cfg.batch, 1), generator=g)
        steps = torch.arange(cfg.seq).unsqueeze(0)
        ids = (start + 7 * steps) % cfg.vocab
        noise = torch.rand(ids.shape, generator=g) < 0.1
        out.append(torch.where(noise, torch.randint(0, cfg.vocab, ids.shape, generator=g), ids))
    return out


def frozen_copy(peft_model):
    """The floor: a copy of `peft_model`'s base with the LoRA layers removed, every weight frozen except the
    RMSNorm weights, so that backward still runs every layer's dX (as the benchmark suite's frozen model)."""
    model = copy.deepcopy(peft_model).unload()
    for mod in model.modules():
        trainable = type(mod).__name__.endswith("RMSNorm")
        for p in mod.parameters(recurse=False):
            p.requires_grad_(trainable)
    return model.train()


def saved_bytes_of_step(model, ids: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps from forward to backward in one step."""
    counter = SavedBytes(exclude=model.parameters())
    with counter.hooks():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.bytes


def _step(model, opt, ids, seed):
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item(), time.perf_counter() - t0


def run(cfg: DemoConfig, out=print) -> dict:
    """Build, explain, train both side by side; print and return the figures."""
    torch.manual_seed(cfg.seed)
    peft_model = build_model(cfg)
    ours = copy.deepcopy(peft_model)
    frozen = frozen_copy(peft_model)
    data = batches(cfg, cfg.steps + 1)
    out(f"runlora_fx demo: {'QLoRA (nf4) ' if cfg.qlora else ''}LLaMA hidden={cfg.hidden} ffn={cfg.ffn} layers={cfg.layers} vocab={cfg.vocab}, "
        f"peft LoRA r={cfg.rank} dropout={cfg.dropout} on {len(PROJECTIONS)} projections, {cfg.dtype}, "
        f"batch {cfg.batch}x{cfg.seq}, {torch.get_num_threads()} threads\n")
    if cfg.calibrate and not get_profile("cpu").measured:
        out("no calibration of this device is cached: measuring it once (about 6 s; `runlora-fx calibrate`)\n")
        calibrate("cpu")
    out(str(explain(ours, example_kwargs={"input_ids": data[0]})))
    optimize(ours, example_kwargs={"input_ids": data[0]})
    out(f"\noptimized {len(optimized_sites(ours))} LoRA sites\n")
    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    models = {"peft": peft_model, "runlora_fx": ours, "frozen": frozen}
    opts = {k: torch.optim.AdamW(params(m), lr=1e-3) for k, m in models.items()}
    losses = {k: [] for k in models}
    times = {k: [] for k in models}
    for step, ids in enumerate(data[1:]):
        names = list(models)
        order = names[step % 3:] + names[:step % 3]  # rotate who goes first
        for name in order:
            loss, dt = _step(models[name], opts[name], ids, seed=1000 + step)
            losses[name].append(loss)
            times[name].append(dt)
    out(f"{'step':>4}  {'peft loss':>10}  {'runlora_fx loss':>15}  {'peft s':>7}  {'runlora_fx s':>12}")
    for k in range(cfg.steps):
        out(f"{k:>4}  {losses['peft'][k]:>10.5f}  {losses['runlora_fx'][k]:>15.5f}  {times['peft'][k]:>7.3f}  "
            f"{times['runlora_fx'][k]:>12.3f}")
    agree = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(losses["peft"], losses["runlora_fx"]))
    tol = 1e-4 if cfg.dtype == "float32" and not cfg.qlora else 2e-2  # a bf16 compute dtype rounds differently
    warm = slice(1, None) if cfg.steps > 2 else slice(None)  # the first step includes planning
    med = {k: statistics.median(v[warm]) for k, v in times.items()}
    saved = {k: saved_bytes_of_step(m, data[0]) for k, m in models.items()}
    out(f"\nlosses agree: {'yes' if agree <= tol else 'NO'} (largest relative difference {agree:.2e}, tolerance {tol:g})")
    out(f"median step time (steps 2..{cfg.steps}, interleaved): peft {med['peft']:.3f} s, runlora_fx "
        f"{med['runlora_fx']:.3f} s, ratio {med['runlora_fx'] / med['peft']:.3f}; frozen model (no LoRA, the floor) "
        f"{med['frozen']:.3f} s")
    extra = med["peft"] - med["frozen"]
    share = (med["peft"] - med["runlora_fx"]) / extra if extra > 0 else float("nan")
    removed = f"{share:.2f}" if extra > 0 else "n/a (peft was not slower than the floor in this short run)"
    out(f"LoRA's cost over the floor: peft {med['peft'] / med['frozen']:.2f}x the frozen model; share of it "
        f"removed by runlora_fx: {removed}")
    out(f"saved for backward per step: peft {saved['peft'] / 2**20:.1f} MiB, runlora_fx "
        f"{saved['runlora_fx'] / 2**20:.1f} MiB ({100 * (1 - saved['runlora_fx'] / saved['peft']):.1f}% less), "
        f"frozen model {saved['frozen'] / 2**20:.1f} MiB")
    out("(one short run on a shared machine: the benchmark suite, `runlora-fx bench`, gives the measured figures)")
    return {"losses": losses, "times": times, "median": med, "saved_bytes": saved, "losses_agree": agree <= tol,
            "share_removed": share}
