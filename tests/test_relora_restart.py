"""ReLoRA restarts stay bounded: after a merge, full-learning-rate steps neither blow up the re-drawn A nor raise
the loss, for every reset mode and for Adam, AdamW and Adafactor; and the merge timing against the lr=0 step."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from runlora_fx.train import ReLoRA, jagged_cosine_schedule, reset_optimizer_state

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB, SEQ, LR = 64, 16, 1e-2


def llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                   attn_implementation="eager")
    model = get_peft_model(transformers.LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    return model.train()


def markov_batches(n, seed=0, batch=8):
    """Sequences of a fixed random Markov chain (next token = table[token] 80% of the time): learnable, so the
    loss has somewhere to go and a blow-up shows."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(123))
    out = []
    for _ in range(n):
        ids = torch.empty(batch, SEQ, dtype=torch.long)
        ids[:, 0] = torch.randint(0, VOCAB, (batch,), generator=g)
        for t in range(1, SEQ):
            noise = torch.rand(batch, generator=g) < 0.2
            ids[:, t] = torch.where(noise, torch.randint(0, VOCAB, (batch,), generator=g), table[ids[:, t - 1]])
        out.append(ids)
    return out


def make_optimizer(name, params):
    if name == "adam":
        return torch.optim.Adam(params, lr=LR)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95))
    if name == "hf_adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=LR, beta1=0.9, scale_parameter=False, relative_step=False, warmup_init=False)
    if not hasattr(torch.optim, "Adafactor"):
        pytest.skip("this torch has no torch.optim.Adafactor")
    return torch.optim.Adafactor(params, lr=LR)


def adapters(model):
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]


@torch.no_grad()
def loss_on(model, batches):
    model.eval()
    loss = sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)
    model.train()
    return loss


OPTIMIZERS = ["adam", "adamw", "hf_adafactor", "torch_adafactor"]


def train_through_a_merge(optimizer, reset, every=30, after=5, schedule=None, authors_timing=False):
    """Train the adapters `every` steps, merge, then `after` more steps (`after` + 1 with a jagged `schedule`: its
    lr=0 step comes first). Returns the held-out loss at the merge and at the end, and the largest |step| / lr of
    any adapter entry after the merge. With `authors_timing` the merge comes one step later, after the lr=0 step
    (`% relora == 1` in the authors' loop); both orders run the same steps at the same lrs on the same batches."""
    model = llama()
    train, held_out = markov_batches(every + after + 1), markov_batches(4, seed=1)
    opt = make_optimizer(optimizer, [p for _, p in adapters(model)])
    schedule = schedule(opt) if schedule else None
    relora = ReLoRA(model, opt, merge_every=every, reset=reset, generator=torch.Generator().manual_seed(0))
    at_merge, largest = None, 0.0
    for step, batch in enumerate(train[:every + after + (schedule is not None)], start=1):
        before = [p.detach().clone() for _, p in adapters(model)]
        lr = opt.param_groups[0]["lr"]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if at_merge is not None:
            moved = max((p - b).abs().max().item() for (_, p), b in zip(adapters(model), before))
            largest = max(largest, moved / LR)
            if lr == 0 and optimizer.startswith("adam"):  # transformers' Adafactor keeps its momentum in lr units
                assert moved == 0, "a step at lr 0 moved an adapter"
        if schedule is not None:
            schedule.step()
        if relora.step(step - 1 if authors_timing else step):
            at_merge = loss_on(model, held_out)
    assert relora.merges == 1
    for name, p in adapters(model):
        if "lora_A" in name:
            bound = 1 / math.sqrt(p.shape[1])  # kaiming-uniform, a = sqrt(5)
            assert p.abs().max().item() <= 1.5 * bound, (name, p.abs().max().item(), bound)
    return at_merge, loss_on(model, held_out), largest


@pytest.mark.parametrize("reset", ["magnitude", "random", "zero"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_full_lr_steps_after_a_merge_stay_bounded(optimizer, reset):
    """Right after a merge B = 0, so A's gradient is exactly 0, and an entry whose m was kept but whose v was
    pruned steps by lr * m / eps (A went from its kaiming bound 0.18 to above 400 in 5 steps at the full lr);
    B's such entries step by lr * m / (sqrt(1 - beta2) |g|) (thousands of lr). With the fix A starts from a zero
    state and B keeps no first moment without a second one: every step stays an ordinary optimizer step (below
    3 lr per entry), A stays near its draw and the loss does not rise."""
    at_merge, after, largest = train_through_a_merge(optimizer, reset)
    assert largest <= 3, largest
    assert after <= at_merge + 0.02, (at_merge, after)


@pytest.mark.parametrize("optimizer", ["adam", "hf_adafactor"])
def test_merge_timing_against_the_lr_zero_step_no_longer_matters(optimizer):
    """The driver merges before the schedule's lr=0 step, the authors after it. In Adam that step moves no
    parameter (asserted inside); ours spends it on the new adapters' state, theirs on the state it then prunes.
    With a 1-step restart warmup (full lr right after) both orders stay bounded and end at the same loss."""
    def schedule(opt):
        return jagged_cosine_schedule(opt, total_steps=60, warmup_steps=0, cycle_length=30, restart_warmup_steps=1,
                                      min_lr_ratio=1.0)

    ours = train_through_a_merge(optimizer, "magnitude", schedule=schedule)
    theirs = train_through_a_merge(optimizer, "magnitude", schedule=schedule, authors_timing=True)
    for at_merge, after, largest in (ours, theirs):
        assert largest <= 3 and after <= at_merge + 0.02, (at_merge, after, largest)
    assert abs(ours[1] - theirs[1]) <= 0.01, (ours, theirs)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_pair_moments_leaves_no_first_moment_without_a_denominator(amsgrad):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(20, 30))
    opt = torch.optim.Adam([w], lr=1e-2, amsgrad=amsgrad)
    for _ in range(3):
        (torch.randn(8, 30) @ w.T).square().mean().backward()
        opt.step()
        opt.zero_grad()
    state = opt.state[w]
    m_before = state["exp_avg"].clone()
    reset_optimizer_state(opt, [w], "magnitude", 0.9, pair_moments=True)
    denominator = torch.maximum(state["exp_avg_sq"], state["max_exp_avg_sq"]) if amsgrad else state["exp_avg_sq"]
    assert int((state["exp_avg_sq"] == 0).sum()) == 540  # v pruned exactly as without pairing
    assert torch.count_nonzero(state["exp_avg"][denominator == 0]) == 0
    kept = (denominator != 0) & (m_before.abs() > m_before.abs().flatten().kthvalue(540).values)
    assert kept.any() and torch.equal(state["exp_avg"][kept], m_before[kept])  # m kept where v is


# ----------------------------------------------------------------------------------------------- restart warmup


def test_default_restart_warmup_is_a_tenth_of_the_cycle_and_at_least_20_steps():
    from runlora_fx.train.relora import default_restart_warmup

    assert [default_restart_warmup(c) for c in (5, 20, 100, 200, 201, 5000)] == [5, 20, 20, 20, 21, 500]
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    f = jagged_cosine_schedule(opt, total_steps=600, warmup_steps=20, cycle_length=200).lr_lambdas[0]
    assert f(200) == 0 and f(210) == pytest.approx(f.keywords["multiplier"](210) / 2) and f(220) > f(219)


def test_trainer_callback_rewarms_the_trainers_own_schedule(tmp_path):
    """Without a jagged schedule of ours the Trainer would run every restart at the full lr: the callback adds the
    restarts (lr 0 after the merge, then the default re-warmup) to the Trainer's linear schedule."""
    from runlora_fx.train import ReLoRACallback

    model = llama()
    ids = markov_batches(1, batch=8)[0]
    data = [{"input_ids": row, "labels": row} for row in ids]
    lrs = []

    class Record(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            lrs.append(optimizer.param_groups[0]["lr"])

    relora = ReLoRACallback(merge_every=3)
    assert relora.restart_warmup_steps == 3  # max(20, 10%) but never above the cycle
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=1,
                                          learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=0,
                                          report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                          disable_tqdm=True, dataloader_num_workers=0)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[relora, Record()]).train()
    linear = [1e-3 * (6 - t) / 6 for t in range(6)]
    ramp = [1, 1, 1, 0, 1 / 3, 2 / 3]
    assert lrs == pytest.approx([a * b for a, b in zip(linear, ramp)])
    assert relora.relora.merges == 2
    with pytest.raises(ValueError, match="restart_warmup_steps"):
        ReLoRACallback(merge_every=3, restart_warmup_steps=4)


def test_trainer_callback_warns_when_the_jagged_cycle_is_not_the_merge_cycle():
    from runlora_fx.train import ReLoRACallback

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = jagged_cosine_schedule(opt, total_steps=100, warmup_steps=5, cycle_length=50)
    f = schedule.lr_lambdas[0]
    with pytest.warns(UserWarning, match="cycle_length 50"):
        ReLoRACallback(merge_every=40).on_train_begin(None, None, None, lr_scheduler=schedule)
    assert schedule.lr_lambdas[0] is f  # left as it is
