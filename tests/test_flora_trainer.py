"""FloraAccumulator and Flora under transformers.Trainer (tiny LLaMA from a config, in-memory data, CPU)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from runlora_fx.train import Flora, FloraAccumulator  # noqa: E402

# Compress every 2-D matrix with min(shape) >= rank (these shapes are below the authors' default thresholds).
EVERY_MATRIX = dict(min_size=0, max_aspect_ratio=float("inf"))

pytestmark = pytest.mark.slow

SAMPLE = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])


class _Samples(torch.utils.data.Dataset):
    """Ten copies of one sequence: every micro-batch has the same gradient, so a window's sum is known."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"input_ids": SAMPLE.clone(), "labels": SAMPLE.clone()}


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    return LlamaForCausalLM(config).to(torch.float64)


def _trainer(model, tmp_path, callbacks=()):
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=1,
        max_grad_norm=0.0, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    opt = Flora(model.parameters(), lr=1e-2, rank=4, **EVERY_MATRIX, scale_parameter=False)
    return Trainer(model=model, args=args, train_dataset=_Samples(), optimizers=(opt, None), callbacks=list(callbacks))


class _CaptureGrads(TrainerCallback):
    """Before each optimizer step: the decompressed .grad, and the exact gradient of the window's loss."""

    def __init__(self):
        self.seen = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        w = model.model.layers[0].mlp.up_proj.weight  # 24 x 16, compressed along 16
        loss = model(input_ids=SAMPLE[None], labels=SAMPLE[None]).loss
        (exact,) = torch.autograd.grad(loss, [w])  # no accumulation, so no accumulator hook fires
        self.seen.append((w.grad.clone(), exact))


def test_trainer_syncs_on_its_own_schedule_and_grads_are_decompressed_sums(tmp_path):
    model = _model()
    trainer = _trainer(model, tmp_path)
    acc = FloraAccumulator(model, rank=4, **EVERY_MATRIX).attach(trainer)  # accumulation_steps=1 here: Trainer's flag must win
    capture = _CaptureGrads()
    trainer.add_callback(capture)
    trainer.train()
    assert acc.updates == 3  # 5 micro-batches in windows of 2, 2 and a short last 1
    assert len(capture.seen) == 3
    w = model.model.layers[0].mlp.up_proj.weight
    for u, (grad, exact) in enumerate(capture.seen):
        proj = acc.projection(w, update=u)
        torch.testing.assert_close(grad, exact @ proj.T @ proj, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(grad, exact, rtol=1e-3)  # really compressed (rank 4 < 16)


def test_trainer_without_compression_matches_trainer_without_accumulator(tmp_path):
    plain, wrapped = _model(), _model()
    _trainer(plain, tmp_path / "a").train()
    trainer = _trainer(wrapped, tmp_path / "b")
    acc = FloraAccumulator(wrapped, rank=1000).attach(trainer)
    trainer.train()
    assert acc.updates == 3
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        assert torch.equal(p, q)
