"""An optimized model in the HF tooling people train LoRA with: Trainer (with and without gradient
checkpointing, and compiled with the runlora backend), accelerate's `prepare`, and peft's save_pretrained /
from_pretrained. Each trains to plain peft's losses over a few steps (tiny LLaMA, CPU)."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from lora_models import assert_step_matches, loss_and_grads, tiny_llama, tokens

import runlora_fx
from runlora_fx.api import optimized_sites

STEPS = 3


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=STEPS * 2, seq=10):
        self.ids = tokens(n, seq, seed=5)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer_losses(model, tmp_path, **args):
    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=STEPS,
                              logging_steps=1, learning_rate=5e-3, use_cpu=True, report_to=[], seed=0,
                              save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, **args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=targs, train_dataset=_Rows())
        trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_trains_to_peft_losses(tmp_path, checkpointing):
    model = tiny_llama(0.05, torch.float32)
    ref = copy.deepcopy(model)
    runlora_fx.optimize(model)  # captured on the Trainer's first step, after it set the model up
    args = {"gradient_checkpointing": checkpointing}
    got = _trainer_losses(model, tmp_path / "a", **args)
    want = _trainer_losses(ref, tmp_path / "b", **args)
    assert len(got) == STEPS and len(optimized_sites(model)) == 7
    assert got == pytest.approx(want, rel=1e-4)


@pytest.mark.slow
def test_trainer_compiled_with_the_runlora_backend(tmp_path):
    """Trainer's own `torch_compile_backend` accepts only accelerate's list of backends, so the model is handed
    to Trainer compiled (aot_eager inside keeps the test small; inductor is the backend tests' business)."""
    model = tiny_llama(0.0, torch.float32)
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="runlora", options={"inner": "aot_eager"})
    got = _trainer_losses(compiled, tmp_path / "a", remove_unused_columns=False)  # its forward is (*args, **kwargs)
    want = _trainer_losses(ref, tmp_path / "b")
    assert got == pytest.approx(want, rel=1e-4)


def test_accelerate_prepare_trains_to_peft_losses():
    accelerate = pytest.importorskip("accelerate")

    def losses(model):
        acc = accelerate.Accelerator(cpu=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        model, opt = acc.prepare(model, opt)
        out = []
        for step in range(STEPS):
            torch.manual_seed(step)
            ids = tokens(2, 10, seed=step)
            loss = model(input_ids=ids, labels=ids).loss
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return out

    model = tiny_llama(0.05, torch.float32)
    ref = copy.deepcopy(model)
    runlora_fx.optimize(model)
    got, want = losses(model), losses(ref)
    assert len(optimized_sites(model)) == 7
    assert got == pytest.approx(want, rel=1e-4)


def _config(folder):
    """adapter_config.json, with peft's target_modules (a set, written in its iteration order) sorted."""
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = sorted(config["target_modules"])
    return config


def test_save_pretrained_writes_peft_files_and_from_pretrained_optimizes(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    model = tiny_llama(0.0, torch.float64)
    base = copy.deepcopy(model.get_base_model())
    ref = copy.deepcopy(model)
    runlora_fx.optimize(model, example_kwargs={"input_ids": tokens()})
    loss_and_grads(model, tokens())
    model.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    ours, theirs = sorted(p.name for p in (tmp_path / "ours").iterdir()), sorted(p.name for p in (tmp_path / "peft").iterdir())
    assert ours == theirs and "adapter_model.safetensors" in ours
    assert _config(tmp_path / "ours") == _config(tmp_path / "peft")
    a, b = load_file(tmp_path / "ours/adapter_model.safetensors"), load_file(tmp_path / "peft/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    plain_base = copy.deepcopy(base)
    for m in (base, plain_base):  # strip peft's layers: a plain transformers model, as a user loads it
        for name, module in list(m.named_modules()):
            if hasattr(module, "base_layer"):
                parent, _, attr = name.rpartition(".")
                setattr(m.get_submodule(parent), attr, module.base_layer)
    loaded = PeftModel.from_pretrained(base, tmp_path / "ours", is_trainable=True)
    plain = PeftModel.from_pretrained(plain_base, tmp_path / "peft", is_trainable=True)
    runlora_fx.optimize(loaded)
    ids = tokens(2, 12)
    assert_step_matches(loss_and_grads(loaded, ids), loss_and_grads(plain, ids))
    assert len(optimized_sites(loaded)) == 7
