"""The transformers ``Trainer`` on an optimized model (DESIGN.md, "Composition is part of correctness").

A user who calls ``optimize()`` and hands the result to their existing ``Trainer`` must get the training they
had before, on the rewritten modules: the test trains an optimized transformers Llama for a few steps with
``Trainer`` and the same steps with a hand-written loop (same batch, AdamW with the Trainer's settings) on a
copy, and compares every logged loss and every parameter after the steps (with the Trainer's
activation checkpointing too: recomputation gives the same numbers; and with ``bf16=True``, the Trainer's
bfloat16 autocast over float32 weights, against the same autocast by hand). It also checks that the fused
path is what the Trainer ran (every rewritten norm and linear counted on each step) and that the checkpoint
the Trainer saves loads into the original transformers class with the trained weights.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from mxrewrite.api import optimize
from tests import zoo
from tests.helpers import MXCallCounter

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

STEPS = 3
LR = 1e-3
BATCH = 4


@pytest.fixture(autouse=True)
def quiet(caplog):
    caplog.set_level(logging.ERROR, logger="mxrewrite")
    transformers.logging.set_verbosity_error()


class _Batches(torch.utils.data.Dataset):
    """``BATCH`` examples: with ``per_device_train_batch_size=BATCH`` every step sees all of them."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _hand_loop(model: torch.nn.Module, batches: list[torch.Tensor], bf16: bool) -> list[float]:
    """What the Trainer is configured to do below: AdamW (its defaults, no weight decay), constant lr, no
    gradient clipping, the mean loss over the batch's tokens; with ``bf16`` the forward under bfloat16 autocast
    (float32 weights)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    losses = []
    for ids in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("recipe, checkpointing, bf16", [
    (dict(), False, False),
    (dict(format="fp8", linears="all"), True, False),
    (dict(format="fp8", linears="all"), False, True),
], ids=["mxfp8", "fp8-all-linears-checkpointing", "fp8-all-linears-bf16-autocast"])
def test_trainer_trains_the_optimized_model(recipe, checkpointing, bf16, tmp_path):
    z = zoo.build("llama")
    opt = optimize(z.model, z.args, progress=False, **recipe)
    by_hand = copy.deepcopy(opt)
    initial = {name: p.detach().clone() for name, p in opt.named_parameters()}
    ids = zoo.example_tokens(BATCH, 16, seed=3)

    # transformers 5 renamed the Trainer's gradient_checkpointing to activation_checkpointing
    fields = transformers.TrainingArguments.__dataclass_fields__
    checkpointing_arg = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=LR,
        lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, bf16=bf16,
        **{checkpointing_arg: checkpointing})
    trainer = transformers.Trainer(model=opt, args=args, train_dataset=_Batches(ids))
    counter = MXCallCounter(opt)
    batches = []    # in the order the Trainer's sampler shuffled them
    seen = opt.register_forward_pre_hook(lambda m, a, kw: batches.append(kw["input_ids"].clone()), with_kwargs=True)
    head_dtypes = set()  # the head is a plain nn.Linear: autocast runs it in bfloat16
    head = opt.lm_head.register_forward_hook(lambda m, a, out: head_dtypes.add(out.dtype))
    trainer.train()
    for handle in (counter, seen, head):
        handle.remove()
    assert head_dtypes == {torch.bfloat16 if bf16 else torch.float32}
    # the Trainer turned on transformers' own checkpointing of the (rewritten) decoder layers when asked
    assert all(layer.gradient_checkpointing == checkpointing for layer in opt.model.layers)

    # the fused path ran on every step: each rewritten norm once per step, each consumer linear on its cast;
    # checkpointed layers run their forward again in backward
    calls = STEPS * (2 if checkpointing else 1)
    assert counter.norms and set(counter.norms.values()) == {calls}
    assert counter.linears and set(counter.linears.values()) == {calls}
    assert not counter.plain_linears
    if recipe.get("linears") == "all":
        assert len(counter.own_cast) == 2 * zoo.LAYERS and set(counter.own_cast.values()) == {calls}

    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(batches) == STEPS and all(sorted(b.tolist()) == sorted(ids.tolist()) for b in batches)
    expected = _hand_loop(by_hand, batches, bf16)
    assert len(logged) == STEPS
    # the Trainer logs losses rounded to 4 significant digits
    assert logged == pytest.approx(expected, rel=1e-3)
    assert expected[-1] < expected[0]
    trained = dict(opt.named_parameters())
    for name, p in by_hand.named_parameters():
        torch.testing.assert_close(trained[name], p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        assert not torch.equal(p, initial[name]), f"{name} did not change: no gradient reached it"

    # the Trainer's checkpoint loads into the original class with the trained weights
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = type(z.model).from_pretrained(str(tmp_path / "saved"))
    reloaded_params = dict(reloaded.named_parameters())
    for name, p in trained.items():
        assert torch.equal(reloaded_params[name], p.detach()), name
