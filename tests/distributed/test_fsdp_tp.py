"""FSDP2, DDP and tensor parallelism applied to an optimized model, on CPU with gloo (DESIGN.md, "Composition is
part of correctness").

Each scenario optimizes a zoo model, parallelizes the result over 2 ranks and takes one training step
(forward, loss, backward, one ``AdamW`` step). The parent process takes the same step on the
single-process optimized model (same seed, same weights, same batch) and the test compares the loss,
every parameter's gradient (DTensor gradients gathered with ``full_tensor()``) and every parameter
after the step. It also checks that the parallelism really happened (each rank holds half of every
sharded weight) and that the MX modules really ran the fused path under it.

* FSDP2: ``fully_shard`` on each decoder layer, then on the root, after ``optimize``. Data parallel:
  each rank gets one sequence of the two-sequence batch (the reference sees both), so the loss is the
  mean of the ranks' losses and FSDP's averaged gradients are the full batch's. One scenario shards over
  a 2-D (replicate 1 x shard 2) mesh, HSDP's layout.
* DDP: ``DistributedDataParallel`` around the optimized model, each rank one sequence as under FSDP2: its
  gradients equal the full batch's only if DDP all-reduced them.
* TP: ``parallelize_module`` of the torchtitan-style layers, ``ColwiseParallel`` on wq/wk/wv/w1/w3
  (the MX linears) and ``RowwiseParallel`` on wo/w2, over a 2-rank ``DeviceMesh``; both ranks see
  the whole batch.
* FSDP2 + TP: TP over the 2 ranks, then FSDP2 over a one-rank dp mesh (torchtitan's order; the 2-D mesh
  a 4-rank run would shard over both dims of), with the FP8 all-gather.

All scenarios run in one 2-process group (spawned once per test session: importing torch and
transformers dominates the cost), each writes its results to a file, and each test checks one
scenario.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import mxrewrite
from tests import zoo
from tests.distributed.spawn import free_port, join_ranks
from tests.helpers import MXCallCounter

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with the gloo backend is not available"),
    pytest.mark.slow,  # one 2-rank run for all the tests: about 20 s of 2 CPU cores (mostly imports and optimize)
]

WORLD = 2
LR = 1e-3
ADAM_EPS = 1e-8                   # AdamW's default
STEADY_GRAD = 1e3 * ADAM_EPS      # |g| above which Adam's step lr * g / (|g| + eps) hardly depends on g's rounding
# float rounding only: the sharded step sums the same products in another order (FSDP's reduce-scatter
# averages two half-batch gradients, TP all-reduces two partial input gradients)
RTOL = 1e-5
TIMEOUT_S = 300          # the whole spawned run; each collective times out after COLLECTIVE_TIMEOUT
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str           # zoo name
    parallel: str        # "fsdp" | "ddp" | "tp"
    grad_cast: str       # "hp" | "mx"
    split_batch: bool    # data parallel: rank r gets sequence r (FSDP); otherwise the whole batch
    linears: str = "norm-fed"   # "all": wo and w2 cast their own inputs too (RowwiseParallel under TP)
    format: str = "mxfp8"
    atol_rel: float = 1e-6      # absolute tolerance, relative to the largest magnitude in the tensor
    meta_init: bool = False     # built and optimized on the meta device, sharded, then to_empty + checkpoint
    fp8_all_gather: bool = False  # fsdp_fp8_all_gather: FSDP2 gathers the FP8 casts of the weights
    precompute_scales: bool = False  # and mxrewrite.precompute_fp8_scales before the step
    hsdp: bool = False    # FSDP2 over a 2-D (replicate 1, shard 2) mesh: HSDP's layout, gathered over its shard dim

    @property
    def two_d(self) -> bool:
        """Parameters on a 2-D mesh, of which FSDP2 gathers over one dim."""
        return self.hsdp or self.parallel == "fsdp_tp"


SCENARIOS = {s.name: s for s in (
    Scenario("fsdp_torchtitan_llama", "torchtitan_llama", "fsdp", "hp", True),
    Scenario("fsdp_llama", "llama", "fsdp", "hp", True),
    Scenario("fsdp_qwen3", "qwen3", "fsdp", "hp", True),
    Scenario("tp_torchtitan_llama", "torchtitan_llama", "tp", "hp", False),
    # the default config (MXFP8 backward GEMMs). A rank holds part of the dims the backward casts' blocks run
    # along (the tokens for grad_W under FSDP, the output features for grad_h under TP: wk's 16 local rows are
    # zero-padded to one 32-block), so its block scales can be smaller; they are powers of two and e5m2/e4m3
    # rounding of a normal element does not depend on them, so only elements in those formats' subnormal range
    # could round differently. None does in these models: the results agree to float rounding
    Scenario("fsdp_torchtitan_llama_mx_grads", "torchtitan_llama", "fsdp", "mx", True),
    Scenario("tp_torchtitan_llama_mx_grads", "torchtitan_llama", "tp", "mx", False),
    # linears="all" in MXFP8: each rank casts its slice of wo's and w2's input dim, whole 32-blocks, so the
    # casts are the single process's
    Scenario("fsdp_torchtitan_llama_all_linears", "torchtitan_llama", "fsdp", "hp", True, "all"),
    Scenario("tp_torchtitan_llama_all_linears", "torchtitan_llama", "tp", "hp", False, "all"),
    # the Hopper FP8 recipe on every linear: a rank scales its own activations and gradients (FSDP) or its own
    # weight shard (TP) per tensor; the scales are powers of two, so a normal value casts as in the single
    # process whatever the scale; only values in e4m3's subnormal range can differ. Under FSDP none does here;
    # under TP a rank's half of w2's input has a larger scale than the whole, so a few of its tiny elements
    # keep a bit more precision: 0.1% of w2's weight gradient differ, by about 2e-6 of its largest element
    Scenario("fsdp_torchtitan_llama_fp8", "torchtitan_llama", "fsdp", "mx", True, "all", "fp8"),
    # torchtitan's order for a model too large for one device: build on the meta device, optimize there,
    # fully_shard, to_empty, load the checkpoint. The rewritten norms' constants (eps, rescale; the FP8 static
    # scale follows from them) are not in the checkpoint: the step equals the in-memory model's only if they
    # came back after to_empty
    Scenario("fsdp_torchtitan_llama_fp8_meta_init", "torchtitan_llama", "fsdp", "mx", True, "all", "fp8",
             meta_init=True),
    # FP8 all-gather: each rank casts its shard with the whole weight's scale (amax all-reduced), so the gathered
    # FP8 weight is the single process's cast bit for bit; the reference is the same recipe (gains in the norms'
    # casts) in one process. With these gains a rank's half-batch activations of w2 have a larger scale than
    # the whole batch's (see above): 0.4% of w2's weight gradient differ, by about 3e-6 of its largest element
    Scenario("fsdp_torchtitan_llama_fp8_all_gather", "torchtitan_llama", "fsdp", "mx", True, "all", "fp8",
             atol_rel=1e-5, fp8_all_gather=True),
    Scenario("fsdp_torchtitan_llama_fp8_all_gather_precomputed", "torchtitan_llama", "fsdp", "mx", True, "all",
             "fp8", atol_rel=1e-5, fp8_all_gather=True, precompute_scales=True),
    # on a 2-D mesh the scales are precomputed over the mesh FSDP2 gathers over, known once a forward has gathered
    Scenario("hsdp_torchtitan_llama_fp8_all_gather_precomputed", "torchtitan_llama", "fsdp", "mx", True, "all",
             "fp8", atol_rel=1e-5, fp8_all_gather=True, precompute_scales=True, hsdp=True),
    # FSDP2 over a one-rank dp mesh x TP over 2 ranks (torchtitan's order: TP, then FSDP2): each rank casts and
    # gathers its TP shard of each weight in FP8 with that shard's own scale (the gather all-reduces over dp
    # only), as TP casts its shard without FSDP2. The first rank's halves have the smaller amaxes (see _build),
    # so a few of their tiny elements keep more precision: one element of wq's gradient differs, by 1.2e-5 of
    # its largest
    Scenario("fsdp_tp_torchtitan_llama_fp8_all_gather_precomputed", "torchtitan_llama", "fsdp_tp", "mx", False,
             "all", "fp8", atol_rel=2e-5, fp8_all_gather=True, precompute_scales=True),
    Scenario("ddp_llama", "llama", "ddp", "hp", True),
    Scenario("ddp_torchtitan_llama_fp8", "torchtitan_llama", "ddp", "mx", True, "all", "fp8"),
    Scenario("tp_torchtitan_llama_fp8", "torchtitan_llama", "tp", "mx", False, "all", "fp8", atol_rel=1e-5),
)}

TP_PLAN = {"attention.wq": "colwise", "attention.wk": "colwise", "attention.wv": "colwise",
           "attention.wo": "rowwise", "feed_forward.w1": "colwise", "feed_forward.w3": "colwise",
           "feed_forward.w2": "rowwise"}


# ---------------------------------------------------------------------------
# one training step, the same code in the parent (reference) and on every rank

def _build(scenario: Scenario, device: str = "cpu") -> tuple[nn.Module, torch.Tensor]:
    with torch.device(device):
        z = zoo.build(scenario.model, dtype=torch.float32, seed=0)
    if scenario.fp8_all_gather:
        with torch.no_grad():
            for name, p in z.model.named_parameters():
                if name.endswith("norm.weight"):  # gains away from 1: where the norm applies its gain matters
                    p.copy_(torch.linspace(0.5, 1.5, p.numel()))
                elif p.dim() == 2:  # the largest element in the second rank's rows: its shard alone sets the scale
                    p[-1, 0] = 8 * p.abs().max()
    opt = mxrewrite.optimize(z.model, (*z.args, z.kwargs), grad_cast=scenario.grad_cast, linears=scenario.linears,
                             format=scenario.format, fsdp_fp8_all_gather=scenario.fp8_all_gather, progress=False)
    opt.train()
    return opt, z.args[0]


def _materialize(model: nn.Module, scenario: Scenario) -> None:
    """Give a sharded meta-device model storage and the zoo model's weights (a full checkpoint, each rank
    keeping its shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device="cpu")
    checkpoint = zoo.build(scenario.model, dtype=torch.float32, seed=0).model.state_dict()
    set_model_state_dict(model, checkpoint, options=StateDictOptions(full_state_dict=True))


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "model")


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = model.model.layers if _is_hf(model) else model.layers
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def _loss(model: nn.Module, tokens: torch.Tensor, runner: nn.Module | None = None) -> torch.Tensor:
    """The LM loss of ``model`` on ``tokens``, called through ``runner`` (a wrapper such as DDP) when given."""
    runner = runner or model
    if _is_hf(model):
        return runner(tokens, labels=tokens).loss          # the transformers loss path
    logits = runner(tokens)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


@contextlib.contextmanager
def _cast_gemm_calls():
    """Record ``(kind, weight shape)`` of every MX GEMM that runs inside the block (``"fused"`` for a linear fed
    by a norm's cast: ``_CastLinear``, ``Fp8CastLinear``; ``"own"`` for one casting its own input:
    ``OwnCastLinear``), the type of each weight they were given, and the dtypes of the FP8 all-gathers' inputs
    (``Fp8AllGatherWeight.fsdp_pre_all_gather``)."""
    from mxrewrite.modules import fp8_weight, functions, linear

    calls: list[tuple[str, tuple[int, ...]]] = []
    weight_types: list[str] = []
    gathered: list[str] = []
    scale_all_reduces: list[int] = []
    fused, fp8_fused, own = linear._CastLinear.forward, functions.Fp8CastLinear.forward, functions.OwnCastLinear.forward
    pre_all_gather = fp8_weight.Fp8AllGatherWeight.fsdp_pre_all_gather
    all_reduce_max = fp8_weight._all_reduce_max

    def counting_fused(ctx, h, weight, bias):
        calls.append(("fused", tuple(weight.shape)))
        weight_types.append(type(weight).__name__)
        return fused(ctx, h, weight, bias)

    def counting_fp8_fused(ctx, h, weight, bias):
        calls.append(("fused", tuple(weight.shape)))
        weight_types.append(type(weight).__name__)
        return fp8_fused(ctx, h, weight, bias)

    def counting_own(ctx, x, weight, bias, settings):
        calls.append(("own", tuple(weight.shape)))
        weight_types.append(type(weight).__name__)
        return own(ctx, x, weight, bias, settings)

    def counting_all_reduce_max(t, mesh):
        scale_all_reduces.append(t.numel())
        return all_reduce_max(t, mesh)

    def counting_pre_all_gather(self, mesh):
        inputs, metadata = pre_all_gather(self, mesh)
        gathered.extend(str(t.dtype) for t in inputs)
        return inputs, metadata

    linear._CastLinear.forward = staticmethod(counting_fused)
    functions.Fp8CastLinear.forward = staticmethod(counting_fp8_fused)
    functions.OwnCastLinear.forward = staticmethod(counting_own)
    fp8_weight.Fp8AllGatherWeight.fsdp_pre_all_gather = counting_pre_all_gather
    fp8_weight._all_reduce_max = counting_all_reduce_max
    try:
        yield calls, weight_types, gathered, scale_all_reduces
    finally:
        linear._CastLinear.forward = staticmethod(fused)
        functions.Fp8CastLinear.forward = staticmethod(fp8_fused)
        functions.OwnCastLinear.forward = staticmethod(own)
        fp8_weight.Fp8AllGatherWeight.fsdp_pre_all_gather = pre_all_gather
        fp8_weight._all_reduce_max = all_reduce_max


def _step(model: nn.Module, tokens: torch.Tensor, world: int, counter: MXCallCounter,
          runner: nn.Module | None = None) -> dict:
    """Loss, gradients and parameters after one AdamW step (all full tensors), and what ran fused.

    ``counter`` is made before the model is parallelized, so its hooks see the MX modules' own inputs
    (a TP input hook turns them into DTensors afterwards); ``runner`` wraps ``model`` (DDP)."""
    with _cast_gemm_calls() as (gemms, weight_types, gathered, scale_all_reduces):
        loss = _loss(model, tokens, runner)
        loss.backward()
    counter.remove()
    loss = loss.detach()
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    grads = {n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    params0 = {n: _full(p) for n, p in model.named_parameters()}
    torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS).step()
    params = {n: _full(p) for n, p in model.named_parameters()}
    return dict(loss=loss.item(), grads=grads, missing_grads=missing, params0=params0, params=params,
                norms=dict(counter.norms), linears=dict(counter.linears), plain_linears=dict(counter.plain_linears),
                own_cast=dict(counter.own_cast), gemms=list(gemms), gemm_weights=Counter(weight_types),
                fp8_all_gathers=Counter(gathered), scale_all_reduces=len(scale_all_reduces))


# ---------------------------------------------------------------------------
# parallelization, on each rank

def _placements(model: nn.Module) -> dict[str, tuple]:
    """Every parameter's (placements, full shape, this rank's local shape); placements None for a plain tensor."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            kinds = tuple(f"{type(pl).__name__}({getattr(pl, 'dim', '')})" for pl in p.placements)
            out[name] = (kinds, tuple(p.shape), tuple(p.to_local().shape))
        else:
            out[name] = (None, tuple(p.shape), tuple(p.shape))
    return out


def _fsdp(model: nn.Module, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _tp(model: nn.Module, mesh) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for layer in _decoder_layers(model):
        parallelize_module(layer, mesh, {name: styles[style]() for name, style in TP_PLAN.items()})


def _run_scenario(scenario: Scenario, rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    model, tokens = _build(scenario, "meta" if scenario.meta_init else "cpu")
    if scenario.meta_init:
        tokens = zoo.example_tokens()
    counter = MXCallCounter(model)
    runner = None
    if scenario.parallel == "ddp":
        runner = nn.parallel.DistributedDataParallel(model)
    elif scenario.parallel == "fsdp_tp":
        mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "tp"))
        _tp(model, mesh["tp"])
        _fsdp(model, mesh["dp"])
    else:
        mesh = (init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard")) if scenario.hsdp
                else init_device_mesh("cpu", (WORLD,)))
        (_fsdp if scenario.parallel == "fsdp" else _tp)(model, mesh)
    if scenario.meta_init:
        _materialize(model, scenario)
    placements = _placements(model)
    if scenario.two_d and scenario.precompute_scales:
        with torch.no_grad():  # the gathers record their mesh
            _loss(model, tokens.chunk(WORLD)[rank] if scenario.split_batch else tokens)
        for table in (counter.norms, counter.linears, counter.plain_linears, counter.own_cast):
            table.clear()  # the step's calls only
    precomputed = mxrewrite.precompute_fp8_scales(model) if scenario.precompute_scales else 0
    wrong_scales = (_wrong_precomputed_scales(model, across_ranks=scenario.parallel != "fsdp_tp")
                    if scenario.precompute_scales else None)
    if scenario.split_batch:
        tokens = tokens.chunk(WORLD)[rank]
    result = _step(model, tokens, WORLD, counter, runner)
    result["placements"] = placements
    result["precomputed_scales"] = precomputed
    result["wrong_precomputed_scales"] = wrong_scales
    if scenario.precompute_scales:  # the optimizer step changed every weight: no precomputed scale may be used again
        from mxrewrite.modules.fp8_weight import _unchanged

        locals_ = [p._local_tensor for p in model.parameters() if hasattr(p._local_tensor, "_precomputed")]
        result["precomputed_stale_after_step"] = [not _unchanged(*w._precomputed[:2]) for w in locals_]
    if scenario.parallel == "tp":
        result["plain_input_error"] = _plain_input_error(model, tokens)
    return result


def _wrong_precomputed_scales(model: nn.Module, across_ranks: bool) -> list[str]:
    """The FP8-gathered weights whose precomputed (scale, dequant scale) differ from the dynamic cast's of what
    FSDP2 gathers: the whole weight (its amax from each shard's, all-reduced here weight by weight) or, when not
    ``across_ranks`` (a one-rank dp mesh under TP), this rank's TP shard."""
    from mxrewrite.formats.fp8 import fp8_quantize

    wrong = []
    for name, param in model.named_parameters():
        local = getattr(param, "_local_tensor", None)
        if getattr(local, "_precomputed", None) is None:
            continue
        shard = local._tensor
        amax = shard.abs().amax().float() if shard.numel() else torch.zeros(())
        if across_ranks:
            dist.all_reduce(amax, op=dist.ReduceOp.MAX)
        _, dequant = fp8_quantize(torch.zeros(1), amax=amax)
        scale, got_dequant = local._precomputed[2:]
        if not (torch.equal(got_dequant, dequant) and torch.equal(scale, dequant.reciprocal())):
            wrong.append(name)
    return wrong


def _plain_input_error(model: nn.Module, tokens: torch.Tensor) -> str | None:
    """The error of a colwise-sharded MX linear given the norm's cast as a plain tensor (no ColwiseParallel
    input hook to make it a replicated DTensor): its input gradient would be a partial sum nobody all-reduces."""
    from mxrewrite.errors import MXRewriteError

    layer = _decoder_layers(model)[0]
    with torch.no_grad():
        h = layer.attention_norm(model.tok_embeddings(tokens))
        try:
            layer.attention.wq._sharded_forward(h)
        except MXRewriteError as exc:
            return str(exc)
    return None


def _worker(rank: int, port: int, out_dir: str, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
    try:
        for name in names:
            start = time.perf_counter()
            try:
                result = _run_scenario(SCENARIOS[name], rank)
            except Exception:
                # the other rank fails in the same place or times out in its next collective
                with open(os.path.join(out_dir, f"{name}.rank{rank}.error"), "w") as f:
                    f.write(traceback.format_exc())
                raise
            result["seconds"] = time.perf_counter() - start
            if rank == 0:
                torch.save(result, os.path.join(out_dir, f"{name}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------
# the spawned run and the references

def _reference(scenario: Scenario) -> dict:
    """The single-process step of the optimized model on the whole batch."""
    torch.manual_seed(0)
    model, tokens = _build(scenario)
    return _step(model, tokens, 1, MXCallCounter(model))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Callable[[str], dict], Callable[[str], dict]]:
    """Every scenario run once on 2 spawned ranks, and the single-process references, computed by this process
    while the ranks start. Returns ``(result, reference)``, each taking a scenario name; ``result`` fails the
    test with the rank's traceback when the scenario did not complete."""
    import torch.multiprocessing as mp

    out_dir = str(tmp_path_factory.mktemp("fsdp_tp"))
    context = mp.start_processes(_worker, args=(free_port(), out_dir, list(SCENARIOS)), nprocs=WORLD,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    references: dict[tuple[str, str], dict | BaseException] = {}
    try:
        for scenario in SCENARIOS.values():
            key = (scenario.model, scenario.grad_cast, scenario.linears, scenario.format, scenario.fp8_all_gather)
            if key not in references:
                try:
                    references[key] = _reference(scenario)
                except Exception as exc:  # reported by the tests that need it
                    references[key] = exc
    finally:
        failure = join_ranks(context, deadline)

    def result(name: str) -> dict:
        path = os.path.join(out_dir, f"{name}.pt")
        if not os.path.exists(path):
            errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir))
                      if f.startswith(f"{name}.rank")]
            pytest.fail(f"scenario {name} did not complete: " + ("\n".join(errors) or failure or "no result"))
        return torch.load(path, weights_only=False)

    def reference(name: str) -> dict:
        s = SCENARIOS[name]
        ref = references[s.model, s.grad_cast, s.linears, s.format, s.fp8_all_gather]
        if isinstance(ref, BaseException):
            raise ref
        return ref

    return result, reference


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol_rel: float) -> None:
    atol = atol_rel * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def _adamw_replay(params0: dict, grads: dict) -> dict:
    """One single-process AdamW step from ``params0`` with the given gradients."""
    params = {n: p.clone().requires_grad_() for n, p in params0.items()}
    for name, p in params.items():
        p.grad = grads[name].clone()
    torch.optim.AdamW(params.values(), lr=LR, eps=ADAM_EPS).step()
    return {n: p.detach() for n, p in params.items()}


def _check_against_reference(got: dict, ref: dict, scenario: Scenario) -> None:
    assert got["missing_grads"] == ref["missing_grads"] == []
    assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL)
    assert got["grads"].keys() == ref["grads"].keys() == ref["params"].keys() == got["params"].keys()
    for name, expected in ref["grads"].items():
        _assert_close(got["grads"][name], expected, f"gradient of {name}", scenario.atol_rel)
    for name, p0 in ref["params0"].items():
        assert torch.equal(got["params0"][name], p0), f"{name} differs before the step"
    # the sharded optimizer step is the single-process AdamW step on the gathered gradients (exact in practice)
    replayed = _adamw_replay(ref["params0"], got["grads"])
    for name, expected in ref["params"].items():
        actual = got["params"][name]
        torch.testing.assert_close(actual, replayed[name], rtol=1e-6, atol=1e-9,
                                   msg=lambda m: f"{name} after the sharded AdamW step: {m}")
        # and equals the single-process model's step. Adam's first step is lr * g / (|g| + eps): where |g| is
        # near eps it turns the gradient's rounding into a visible fraction of lr, so those elements are only
        # held to a small fraction of lr (a sign flip or a lost update is 1-2 lr); the rest to rounding
        steady = ref["grads"][name].abs() >= STEADY_GRAD
        _assert_close(actual[steady], expected[steady], f"{name} after one AdamW step", scenario.atol_rel)
        worst = float((actual - expected).abs().max())
        assert worst <= 0.05 * LR, f"{name} after one AdamW step: off by {worst:.3g} (lr {LR})"


def _check_fused(got: dict, ref: dict, scenario: Scenario) -> None:
    """Every MX module ran once on the fused path, as in the single-process model (10 MX linears, 4 norms;
    with linears="all" also wo and w2 of each layer on their own casts)."""
    assert ref["norms"] and ref["linears"] and not ref["plain_linears"]
    assert got["norms"] == ref["norms"]
    assert got["linears"] == ref["linears"]
    assert got["plain_linears"] == {}
    assert got["own_cast"] == ref["own_cast"]
    assert len(ref["own_cast"]) == (2 * zoo.LAYERS if scenario.linears == "all" else 0)
    assert len(got["gemms"]) == len(ref["gemms"]) == len(ref["linears"]) + len(ref["own_cast"])


def _check_fused_and_reference(got: dict, ref: dict, scenario: Scenario) -> None:
    _check_fused(got, ref, scenario)
    _check_against_reference(got, ref, scenario)


def _check_fp8_all_gather(got: dict, ref: dict, scenario: Scenario) -> None:
    n_gemms = len(ref["gemms"])
    if scenario.fp8_all_gather:
        # every converted weight was cast on its shard and gathered in FP8, before the forward and again before
        # the backward of each layer (the root's weights stay gathered), and the GEMMs got the gathered cast
        assert got["fp8_all_gathers"] == {"torch.float8_e4m3fn": 2 * n_gemms}
        assert got["gemm_weights"] == {"Fp8Weight": n_gemms}
        if scenario.precompute_scales:  # one all-reduce before the step, none in it
            assert got["precomputed_scales"] == n_gemms and got["scale_all_reduces"] == 0
            assert got["wrong_precomputed_scales"] == []  # each the scale of what FSDP2 gathers
            assert got["precomputed_stale_after_step"] == [True] * n_gemms
        else:  # one per gather
            assert got["precomputed_scales"] == 0 and got["scale_all_reduces"] == 2 * n_gemms
        assert ref["gemm_weights"] == {"Fp8AllGatherWeight": n_gemms}  # one process: cast by the linear itself
    else:
        assert got["fp8_all_gathers"] == {} and "Fp8Weight" not in got["gemm_weights"]


def _check_tp_sharding(got: dict, ref: dict, dp_placements: tuple[str, ...]) -> None:
    """Each TP-planned weight is its ``dp_placements`` (FSDP2's, if any) then sharded along its TP dim, this rank
    holding half of it; every other parameter has ``dp_placements`` only (a plain tensor without FSDP2); the
    fused GEMMs multiplied this rank's rows of the colwise-sharded MX weights, the own-cast ones this rank's
    columns of the rowwise-sharded weights."""
    sharded = 0
    for pname, (placements, full, local) in got["placements"].items():
        linear = next((k for k in TP_PLAN if pname.endswith(f"{k}.weight")), None)
        if linear is None:
            assert placements == (dp_placements or None), f"{pname}: {placements}"
            continue
        dim = 0 if TP_PLAN[linear] == "colwise" else 1
        # (FSDP2 shards a weight TP shards on dim 0 as well in a _StridedShard(0): dim 0 then splits dp-major)
        unstrided = tuple(p.removeprefix("_Strided") for p in placements)
        assert unstrided == (*dp_placements, f"Shard({dim})"), f"{pname}: {placements}"
        expected = list(full)
        expected[dim] //= WORLD
        assert list(local) == expected, f"{pname}: local {local} of {full}"
        sharded += 1
    assert sharded == len(TP_PLAN) * zoo.LAYERS
    local = {"fused": lambda r, c: (r // WORLD, c), "own": lambda r, c: (r, c // WORLD)}
    assert sorted(got["gemms"]) == sorted((kind, local[kind](*shape)) for kind, shape in ref["gemms"])


# ---------------------------------------------------------------------------
# the tests

@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if s.parallel == "fsdp"])
def test_fsdp2_after_optimize(name, runs):
    result, reference = runs
    got, ref = result(name), reference(name)
    # really sharded: every parameter (decoder layers and root) is a DTensor sharded on dim 0 over the
    # 2 ranks, and this rank holds half of its rows
    expected = ("Replicate()", "Shard(0)") if SCENARIOS[name].hsdp else ("Shard(0)",)
    for pname, (placements, full, local) in got["placements"].items():
        assert placements == expected, f"{pname} is not sharded by FSDP2: {placements}"
        assert local[0] == full[0] // WORLD and local[1:] == full[1:], f"{pname}: local {local} of {full}"
    mx_weights = [f"{lin}.weight" for lin in ref["linears"]]
    assert all(got["placements"][w][0] == expected for w in mx_weights)
    # the fused GEMMs multiplied the unsharded (all-gathered) weights
    assert sorted(got["gemms"]) == sorted(ref["gemms"])
    _check_fp8_all_gather(got, ref, SCENARIOS[name])
    _check_fused_and_reference(got, ref, SCENARIOS[name])


@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if s.parallel == "tp"])
def test_tensor_parallel_after_optimize(name, runs):
    result, reference = runs
    got, ref = result(name), reference(name)
    _check_tp_sharding(got, ref, dp_placements=())
    assert "replicated DTensor input" in (got["plain_input_error"] or "")
    _check_fused_and_reference(got, ref, SCENARIOS[name])


@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if s.parallel == "fsdp_tp"])
def test_fsdp2_with_tensor_parallel_after_optimize(name, runs):
    result, reference = runs
    got, ref = result(name), reference(name)
    _check_tp_sharding(got, ref, dp_placements=("Shard(0)",))  # and FSDP2 over the one-rank dp mesh
    _check_fp8_all_gather(got, ref, SCENARIOS[name])
    _check_fused_and_reference(got, ref, SCENARIOS[name])


@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if s.parallel == "ddp"])
def test_ddp_after_optimize(name, runs):
    result, reference = runs
    got, ref = result(name), reference(name)
    # DDP keeps every parameter whole on every rank
    assert all(placements is None and full == local for placements, full, local in got["placements"].values())
    assert sorted(got["gemms"]) == sorted(ref["gemms"])
    _check_fused_and_reference(got, ref, SCENARIOS[name])
