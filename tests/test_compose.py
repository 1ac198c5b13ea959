"""Composition with the user's stack (DESIGN.md, "Composition is part of correctness"), on CPU.

For the transformers Llama and Qwen3 and the torchtitan-style Llama of the zoo, the
model ``optimize`` returns is run under each wrapper and compared with the same
optimized model run eagerly without it (same Parameter objects, same inputs):

* transformers: keyword inputs the analysis never saw (``labels=``, ``attention_mask``,
  ``position_ids``), ``generate()`` with and without the KV cache, and the
  ``save_pretrained`` / ``from_pretrained`` round trip;
* ``torch.compile(fullgraph=True)`` in train and eval mode over changing batch sizes
  and sequence lengths (aot_eager), with the backward;
* activation checkpointing (``checkpoint_wrapper``, non-reentrant, and transformers'
  own ``activation_checkpointing_enable``) and per-layer compile (Inductor, once per family).

Each check also shows the wrapper really does its job: the fused path runs
(``MXCallCounter``), a compiled layer's graph is what executes (a counting backend),
a checkpointed layer is recomputed in backward and saves less.

Tolerances. ``aot_eager`` runs the same ATen ops as eager and checkpointing
recomputes the same ops on the same inputs: both are compared bit for bit. The KV-cache
decoding step attends over the same keys in a different reduction shape: ``atol=rtol=1e-4``
(measured: 1.2e-7). Inductor fuses the float32 pointwise ops and may reassociate
reductions: a changed last bit in a norm's input can move one element of the MXFP8 cast
by one e4m3 step (up to 2**-3 relative), so its logits, loss and gradients are compared
by relative L2 error, below ``INDUCTOR_REL`` = 1e-2 (measured: at most 5e-7).

Cost (2 CPU cores): the dynamic-shape aot_eager compile of each whole model (~20-30 s) and
Inductor's C++ code generation for each family's layer (~35 s cold, ~10 s with Inductor's
on-disk cache warm) dominate.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from mxrewrite.api import get_report, optimize
from mxrewrite.modules import MXLinear, MXRMSNorm
from tests import zoo
from tests.helpers import MXCallCounter

HF_MODELS = ["llama", "qwen3"]
FAMILIES = ["llama", "qwen3", "torchtitan_llama"]
# (batch, sequence) pairs: three sequence lengths, two batch sizes. Every one has more than 32 tokens: the
# weight-gradient cast quantises along the tokens in blocks of 32, and a dynamic-shape graph specialises on
# whether there is exactly one such block (a second graph for steps of at most 32 tokens, never hit in training)
SHAPES = [(3, 12), (4, 16), (3, 20), (4, 12)]
INDUCTOR_REL = 1e-2
NEW_TOKENS = 4


@pytest.fixture(autouse=True)
def quiet_capture_warnings(caplog):
    caplog.set_level(logging.ERROR, logger="mxrewrite")


# ---------------------------------------------------------------------------
# helpers

_OPTIMIZED: dict[str, tuple[zoo.ZooModel, nn.Module]] = {}


def optimized(name: str) -> tuple[zoo.ZooModel, nn.Module]:
    """The zoo model and its optimized copy, built once per family (optimized with the input ids only).
    Tests never change either: wrappers go on a :func:`twin`, gradients come from ``autograd.grad``."""
    if name not in _OPTIMIZED:
        z = zoo.build(name)
        opt = optimize(z.model, z.args, progress=False)
        assert len(get_report(opt).rewritten) == 2 * zoo.LAYERS
        _OPTIMIZED[name] = z, opt
    z, opt = _OPTIMIZED[name]
    opt.train()
    return z, opt


def twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with new module objects and the same Parameter and buffer objects."""
    tensors = [t for _, t in model.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in model.named_buffers(remove_duplicate=False)]
    return copy.deepcopy(model, {id(t): t for t in tensors})


def is_hf(model: nn.Module) -> bool:
    return hasattr(model, "generate")


def decoder_layers(model: nn.Module) -> nn.ModuleList | nn.ModuleDict:
    return model.model.layers if is_hf(model) else model.layers


def tokens(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return zoo.example_tokens(batch, seq, seed=seed)


def forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    if is_hf(model) or is_hf(getattr(model, "_orig_mod", model)):
        return model(input_ids=ids, use_cache=False).logits
    return model(ids)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    targets = torch.roll(ids, -1, dims=1)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def loss_and_grads(model, ids: torch.Tensor, params: list[nn.Parameter]):
    logits = forward_logits(model, ids)
    loss = lm_loss(logits, ids)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return logits.detach(), loss.detach(), grads


def assert_same_grads(names, ours, ref, *, exact: bool = True, rel: float = 0.0) -> None:
    """Every parameter with a gradient in the reference has one here, equal to it (and no other has one)."""
    got = {n for n, g in zip(names, ours) if g is not None}
    want = {n for n, g in zip(names, ref) if g is not None}
    assert got == want, f"parameters with gradients differ: missing {want - got}, extra {got - want}"
    assert want, "no gradients at all"
    for n, g, r in zip(names, ours, ref):
        if r is None:
            continue
        if exact:
            torch.testing.assert_close(g, r, rtol=0, atol=0, msg=lambda m, n=n: f"grad of {n}: {m}")
        else:
            err = ((g.float() - r.float()).norm() / r.float().norm().clamp(min=1e-30)).item()
            assert err < rel, f"grad of {n}: relative L2 error {err:.3g} >= {rel}"


def assert_fused_path(counter: MXCallCounter, model: nn.Module, calls: int) -> None:
    """Every MXRMSNorm and MXLinear of ``model`` ran ``calls`` times on the fused path, none on the plain one."""
    norms = {n for n, m in model.named_modules() if isinstance(m, MXRMSNorm)}
    linears = {n for n, m in model.named_modules() if isinstance(m, MXLinear)}
    assert norms and linears
    assert counter.norms == {n: calls for n in norms}
    assert counter.linears == {n: calls for n in linears}
    assert counter.plain_linears == {}


class CountingBackend:
    """A torch.compile backend running ``inner`` that counts graph compiles and executions of compiled
    forward graphs: the proof that the compiled code is what runs (hooks do not fire inside it)."""

    def __init__(self, inner: str = "aot_eager"):
        self.inner = torch._dynamo.lookup_backend(inner)
        self.compiles = 0
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.compiles += 1
        compiled = self.inner(gm, example_inputs)

        def run(*args):
            self.calls += 1
            return compiled(*args)
        return run


# ---------------------------------------------------------------------------
# 1. transformers: keyword inputs, generate, save_pretrained

@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_keyword_inputs_the_analysis_did_not_see(name):
    z, opt = optimized(name)
    opt.eval()
    ids = z.args[0]
    batch, seq = ids.shape
    labels = tokens(batch, seq, seed=1)
    labels[0, 2] = labels[1, 5] = -100  # ignored positions
    counter = MXCallCounter(opt)
    try:
        with torch.no_grad():
            out = opt(input_ids=ids, labels=labels)
            plain = opt(input_ids=ids).logits
        assert_fused_path(counter, opt, calls=2)
    finally:
        counter.remove()
    # labels: the model's own shifted cross-entropy, a finite scalar, from unchanged logits
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    by_hand = F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, by_hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.logits, plain, rtol=0, atol=0)

    # attention_mask + position_ids: a left-padded row gives, at its real tokens, the logits of the row alone
    pad = 3
    padded = ids.clone()
    padded[1, :pad] = 0
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        masked = opt(input_ids=padded, attention_mask=mask, position_ids=positions).logits
        alone = opt(input_ids=ids[1:, pad:]).logits
        unmasked = opt(input_ids=padded, position_ids=positions).logits
        explicit = opt(input_ids=ids, attention_mask=torch.ones_like(ids),
                       position_ids=torch.arange(seq).expand(batch, seq)).logits
        original = z.model(input_ids=padded, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(masked[1, pad:], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked[0], plain[0], rtol=1e-5, atol=1e-5)
    assert (unmasked[1, pad:] - alone[0]).abs().max() > 1e-2, "the attention mask changed nothing"
    torch.testing.assert_close(explicit, plain, rtol=1e-5, atol=1e-5)
    # the kwargs mean the same in the original model (MXNorm bound of test_models)
    assert ((masked - original).norm() / original.norm()).item() < 0.2


@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_generate_with_and_without_cache(name):
    z, opt = optimized(name)
    opt.eval()
    ids = z.args[0]
    counter = MXCallCounter(opt)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                  do_sample=False, return_dict_in_generate=True, output_logits=True)
    try:
        cached = opt.generate(ids, use_cache=True, **kwargs)
        # one prefill and NEW_TOKENS - 1 cached steps, every one on the fused path
        assert_fused_path(counter, opt, calls=NEW_TOKENS)
    finally:
        counter.remove()
    uncached = opt.generate(ids, use_cache=False, **kwargs)
    assert cached.sequences.shape == (ids.shape[0], ids.shape[1] + NEW_TOKENS)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences[:, : ids.shape[1]], ids, rtol=0, atol=0)
    # each cached decoding step's logits are the uncached forward's over the full sequence at that position
    with torch.no_grad():
        full = opt(input_ids=cached.sequences, use_cache=False).logits
    for step, step_logits in enumerate(cached.logits):
        torch.testing.assert_close(step_logits, full[:, ids.shape[1] - 1 + step], rtol=1e-4, atol=1e-4)
        assert torch.equal(step_logits.argmax(-1), cached.sequences[:, ids.shape[1] + step])


@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_save_pretrained_round_trip(name, tmp_path):
    z, _ = optimized(name)
    # a model of its own here: it takes an optimizer step, and optimize shares the Parameters
    model = zoo.build(name).model
    opt = optimize(model, z.args, progress=False)
    assert list(opt.state_dict()) == list(model.state_dict())
    sgd = torch.optim.SGD(opt.parameters(), lr=0.1)
    opt.train()
    lm_loss(forward_logits(opt, z.args[0]), z.args[0]).backward()
    sgd.step()
    opt.eval()

    opt.save_pretrained(tmp_path)
    fresh = type(model).from_pretrained(tmp_path)
    assert type(fresh) is type(model)
    assert not any(isinstance(m, (MXRMSNorm, MXLinear)) for m in fresh.modules())
    theirs, ours, original = fresh.state_dict(), opt.state_dict(), model.state_dict()
    assert list(theirs) == list(original)
    for key, value in ours.items():
        torch.testing.assert_close(theirs[key], value, rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")
    assert not torch.equal(theirs["model.layers.0.self_attn.q_proj.weight"], zoo.build(name).model.state_dict()[
        "model.layers.0.self_attn.q_proj.weight"]), "the trained weights were not saved"
    with torch.no_grad():
        torch.testing.assert_close(fresh(z.args[0]).logits, model(z.args[0]).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# 2. torch.compile(fullgraph=True) of the whole model

@pytest.mark.parametrize("name", FAMILIES)
def test_compile_fullgraph_train_and_eval_over_shapes(name):
    z, opt = optimized(name)
    names, params = zip(*trainable(opt))

    counter = MXCallCounter(opt)
    try:
        forward_logits(opt, tokens(*SHAPES[0]))
        assert_fused_path(counter, opt, calls=1)
    finally:
        counter.remove()

    backend = CountingBackend("aot_eager")
    compiled = torch.compile(opt, fullgraph=True, backend=backend)  # fullgraph: a graph break raises
    for step, (batch, seq) in enumerate(SHAPES):
        ids = tokens(batch, seq, seed=seq)
        if step == 0:  # one dynamic-shape graph from the start (the static first graph costs a compile)
            torch._dynamo.mark_dynamic(ids, 0)
            torch._dynamo.mark_dynamic(ids, 1)
        logits, loss, grads = loss_and_grads(compiled, ids, params)
        ref_logits, ref_loss, ref_grads = loss_and_grads(opt, ids, params)
        assert logits.shape == (batch, seq, zoo.VOCAB)
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
        assert_same_grads(names, grads, ref_grads)
    # one graph for every shape (no recompilation per shape), and it is what ran
    assert backend.compiles == 1 and backend.calls == len(SHAPES)

    opt.eval()
    calls = backend.calls
    with torch.no_grad():
        for batch, seq in SHAPES:
            ids = tokens(batch, seq, seed=seq)
            torch.testing.assert_close(forward_logits(compiled, ids), forward_logits(opt, ids), rtol=0, atol=0)
    assert backend.calls == calls + len(SHAPES)
    assert backend.compiles == 2  # one inference graph, dynamic too


# ---------------------------------------------------------------------------
# 3. activation checkpointing and per-layer compile

def saved_numel(fn):
    """``fn()`` and the number of elements autograd saved for backward outside checkpointed regions."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


@pytest.mark.parametrize("name", FAMILIES)
def test_checkpoint_wrapper_per_layer(name):
    z, opt = optimized(name)
    names, params = zip(*trainable(opt))
    ids = tokens(*SHAPES[1])
    (ref_logits, ref_loss, ref_grads), ref_saved = saved_numel(lambda: loss_and_grads(opt, ids, params))

    model = twin(opt)
    layers = decoder_layers(model)
    wrapper_calls = {}
    layer_calls = {}
    for key, layer in list(layers.named_children()):
        wrapped = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        layers[int(key) if isinstance(layers, nn.ModuleList) else key] = wrapped
        wrapped.register_forward_pre_hook(lambda *_, k=key: wrapper_calls.__setitem__(k, wrapper_calls.get(k, 0) + 1))
        layer.register_forward_pre_hook(lambda *_, k=key: layer_calls.__setitem__(k, layer_calls.get(k, 0) + 1))
    assert [type(m).__name__ for m in layers.children()] == ["CheckpointWrapper"] * zoo.LAYERS
    assert [p for _, p in trainable(model)] == list(params)

    counter = MXCallCounter(model)
    (logits, loss, grads), saved = saved_numel(lambda: loss_and_grads(model, ids, params))
    # each wrapper called once; each layer (and its fused norms and linears) run again in backward
    assert wrapper_calls == {k: 1 for k in layer_calls} and layer_calls == {str(i): 2 for i in range(zoo.LAYERS)}
    assert_fused_path(counter, model, calls=2)
    counter.remove()
    assert saved < ref_saved / 3, f"checkpointing saved {saved} elements, without it {ref_saved}"
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    assert_same_grads(names, grads, ref_grads)


@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_activation_checkpointing_enable(name):
    """transformers' own checkpointing (``activation_checkpointing_enable``, non-reentrant)."""
    z, opt = optimized(name)
    names, params = zip(*trainable(opt))
    ids = tokens(*SHAPES[1])
    ref_logits, ref_loss, ref_grads = loss_and_grads(opt, ids, params)

    model = twin(opt)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    _, ref_saved = saved_numel(lambda: loss_and_grads(opt, ids, params))
    counter = MXCallCounter(model)
    (logits, loss, grads), saved = saved_numel(lambda: loss_and_grads(model, ids, params))
    assert_fused_path(counter, model, calls=2)  # recomputed in backward
    counter.remove()
    assert saved < ref_saved / 3, f"checkpointing saved {saved} elements, without it {ref_saved}"
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert_same_grads(names, grads, ref_grads)


@pytest.mark.parametrize("name", FAMILIES)
def test_per_layer_compile_inductor(name):
    """Each decoder layer compiled on its own (Inductor, fullgraph): ``layer.compile()`` for the transformers
    models, torchtitan's ``torch.compile(block)`` re-registered in its ModuleDict for the torchtitan one."""
    z, opt = optimized(name)
    names, params = zip(*trainable(opt))
    ids = tokens(*SHAPES[0])
    ref_logits, ref_loss, ref_grads = loss_and_grads(opt, ids, params)

    model = twin(opt)
    layers = decoder_layers(model)
    backend = CountingBackend("inductor")
    for key, layer in list(layers.named_children()):
        if is_hf(model):
            layer.compile(fullgraph=True, backend=backend)
        else:
            layers.register_module(key, torch.compile(layer, fullgraph=True, backend=backend))
    logits, loss, grads = loss_and_grads(model, ids, params)
    # the compiled graph is what ran, once per layer; the layers share it
    assert backend.calls == zoo.LAYERS
    assert backend.compiles == 1  # no recompilation per layer (a 32-layer model would exceed the recompile limit)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(logits, ref_logits) < INDUCTOR_REL
    assert abs(loss - ref_loss) < INDUCTOR_REL * ref_loss
    assert_same_grads(names, grads, ref_grads, exact=False, rel=INDUCTOR_REL)
    loss_and_grads(model, ids, params)
    assert backend.calls == 2 * zoo.LAYERS  # no recompilation on the second step


# ---------------------------------------------------------------------------
# per-site floats under torch.compile
#
# A rewritten norm's floats (eps, rescale constant, gain offset) reach the ops as a buffer, never as Python
# floats: dynamo would guard on each (calibrated constants differ per layer: per-layer compile compiled every
# layer again and failed past recompile_limit) and under dynamic=True make them symbolic floats that a
# NormCastTensor's metadata cannot carry.

DYNAMIC_CASES = [("torchtitan_llama", dict()), ("torchtitan_llama", dict(format="fp8", linears="all")),
                 ("torchtitan_llama", dict(format="nvfp4", norm="rmsnorm")),
                 ("torchtitan_llama", dict(rescale="calibrated")),
                 ("gemma", dict())]  # Gemma: the gain offset (1 + weight)


@pytest.mark.parametrize("name,recipe", DYNAMIC_CASES,
                         ids=[f"{n}-" + ("-".join(map(str, r.values())) or "default") for n, r in DYNAMIC_CASES])
def test_compile_dynamic_true(name, recipe):
    """The graph compiled for the first shape serves the next (no recompile), computing what eager does
    (aot_eager: the same ops, so the same bits). (Dynamo may compile the first frame twice: it restarts its
    analysis once when it specialises a float it had made symbolic.)"""
    z = zoo.build(name)
    opt = optimize(z.model, z.args, progress=False, **recipe).train()
    names, params = zip(*trainable(opt))
    backend = CountingBackend("aot_eager")
    compiled = torch.compile(opt, fullgraph=True, dynamic=True, backend=backend)
    compiles = []
    for shape in SHAPES[:2]:
        ids = tokens(*shape)
        logits, loss, grads = loss_and_grads(compiled, ids, params)
        compiles.append(backend.compiles)
        ref_logits, ref_loss, ref_grads = loss_and_grads(opt, ids, params)
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
        assert_same_grads(names, grads, ref_grads)
    assert backend.calls == 2 and compiles[0] == compiles[1] <= 2


def test_per_layer_compile_with_calibrated_rescale():
    """Calibrated rescale constants differ per site, yet one compiled frame serves every layer (the constants
    are a buffer, a graph input), even past dynamo's recompile limit, and computes what eager does."""
    z = zoo.build("torchtitan_llama")
    opt = optimize(z.model, z.args, rescale="calibrated", progress=False).train()
    corrections = [m.constants.correction for m in opt.modules() if isinstance(m, MXRMSNorm)]
    assert len(set(corrections)) == len(corrections) == 2 * zoo.LAYERS
    names, params = zip(*trainable(opt))
    ids = tokens(*SHAPES[0])
    ref_logits, ref_loss, ref_grads = loss_and_grads(opt, ids, params)
    model = twin(opt)
    backend = CountingBackend("aot_eager")
    for key, layer in list(model.layers.named_children()):
        model.layers.register_module(key, torch.compile(layer, fullgraph=True, backend=backend))
    with torch._dynamo.config.patch(recompile_limit=1):
        logits, loss, grads = loss_and_grads(model, ids, params)
    assert backend.calls == zoo.LAYERS
    assert backend.compiles == 1
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert_same_grads(names, grads, ref_grads)


# ---------------------------------------------------------------------------
# 5. the FP8 recipe on every linear (format="fp8", linears="all")

def assert_every_linear_cast(counter: MXCallCounter, model: nn.Module, calls: int) -> None:
    """Every MXRMSNorm ran ``calls`` times, every MXLinear ``calls`` times on its norm's cast or on its own
    cast, and none as a plain ``nn.Linear``; the own casts are the linears no norm feeds."""
    norms = {n for n, m in model.named_modules() if isinstance(m, MXRMSNorm)}
    linears = {n for n, m in model.named_modules() if isinstance(m, MXLinear)}
    assert counter.norms == {n: calls for n in norms}
    assert counter.own_cast and counter.linears and not counter.linears.keys() & counter.own_cast.keys()
    assert {**counter.linears, **counter.own_cast} == {n: calls for n in linears}
    assert counter.plain_linears == {}
    assert all(n.endswith(("o_proj", "down_proj")) for n in counter.own_cast)


@pytest.mark.parametrize("name", HF_MODELS)
def test_fp8_every_linear_generates_and_checkpoints(name):
    z = zoo.build(name)
    opt = optimize(z.model, z.args, format="fp8", linears="all", progress=False)
    ids = z.args[0]

    opt.eval()
    counter = MXCallCounter(opt)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                  do_sample=False)
    try:
        cached = opt.generate(ids, use_cache=True, **kwargs)
        assert_every_linear_cast(counter, opt, calls=NEW_TOKENS)
    finally:
        counter.remove()
    assert torch.equal(cached, opt.generate(ids, use_cache=False, **kwargs))

    opt.train()
    names, params = zip(*trainable(opt))
    ref_logits, ref_loss, ref_grads = loss_and_grads(opt, ids, params)
    model = twin(opt)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    counter = MXCallCounter(model)
    logits, loss, grads = loss_and_grads(model, ids, params)
    assert_every_linear_cast(counter, model, calls=2)  # recomputed in backward
    counter.remove()
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert_same_grads(names, grads, ref_grads)
