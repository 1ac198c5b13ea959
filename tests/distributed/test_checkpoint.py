"""Resuming training from a distributed checkpoint (``torch.distributed.checkpoint``, torchtitan's way) of an
optimized model under FSDP2, on 2 CPU ranks with gloo.

Each case optimizes the torchtitan-style zoo model, shards it with ``fully_shard`` (each decoder layer, then
the root), trains one AdamW step and saves the model and optimizer state with DCP (each rank writes its
shards), then trains a second step. A fresh model, built with other initial weights and optimized and
sharded the same way, loads the checkpoint and trains the same second step: its loss and every parameter
after it must equal the first model's bit for bit. Under ``fsdp_fp8_all_gather`` the sharded weights are
``Fp8AllGatherWeight`` subclasses: the load must fill them in place and keep them, or FSDP2 would silently
go back to gathering high-precision weights (the test counts the FP8 gathers of the resumed step).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import mxrewrite
from tests import zoo
from tests.distributed.spawn import free_port, join_ranks

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with the gloo backend is not available"),
    pytest.mark.slow,  # one 2-rank run for both cases: about 15 s of 2 CPU cores
]

WORLD = 2
TIMEOUT_S = 300
CASES = {
    "mxfp8": dict(),
    "fp8_all_gather": dict(format="fp8", linears="all", fsdp_fp8_all_gather=True),
}


def _sharded(seed: int, options: dict):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    z = zoo.build("torchtitan_llama", dtype=torch.float32, seed=seed)
    model = mxrewrite.optimize(z.model, z.args, progress=False, **options).train()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), z.args[0]


def _train_step(model, optimizer, tokens: torch.Tensor) -> float:
    """One AdamW step on this rank's sequence; the mean loss over the ranks."""
    mine = tokens.chunk(WORLD)[dist.get_rank()]
    logits = model(mine)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), mine[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mxrewrite.precompute_fp8_scales(model)  # (none without fsdp_fp8_all_gather)
    loss = loss.detach()
    dist.all_reduce(loss)
    return loss.item() / WORLD


def _state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def _full_parameters(model) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _fp8_gathers(step) -> tuple[float, int]:
    """``step()`` and the FP8 casts FSDP2 gathered during it (pre-all-gather hooks that ran)."""
    from mxrewrite.modules.fp8_weight import Fp8AllGatherWeight

    calls = 0
    original = Fp8AllGatherWeight.fsdp_pre_all_gather

    def counted(self, mesh):
        nonlocal calls
        calls += 1
        return original(self, mesh)

    Fp8AllGatherWeight.fsdp_pre_all_gather = counted
    try:
        return step(), calls
    finally:
        Fp8AllGatherWeight.fsdp_pre_all_gather = original


def _case(options: dict, checkpoint: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model, optimizer, tokens = _sharded(0, options)
    _train_step(model, optimizer, tokens)
    dcp.save(_state(model, optimizer), checkpoint_id=checkpoint)
    loss, gathers = _fp8_gathers(lambda: _train_step(model, optimizer, tokens))
    params = _full_parameters(model)

    resumed, resumed_optimizer, _ = _sharded(1, options)
    before_load = _full_parameters(resumed)
    state = _state(resumed, resumed_optimizer)
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(resumed, state["model"])
    set_optimizer_state_dict(resumed, resumed_optimizer, state["optimizer"])
    local_types = sorted({type(p.to_local()).__name__ for p in resumed.parameters()})
    resumed_loss, resumed_gathers = _fp8_gathers(lambda: _train_step(resumed, resumed_optimizer, tokens))
    return dict(loss=loss, resumed_loss=resumed_loss, params=params, resumed_params=_full_parameters(resumed),
                before_load=before_load, fp8_gathers=gathers, resumed_fp8_gathers=resumed_gathers,
                local_types=local_types)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for name, options in CASES.items():
            result = _case(options, os.path.join(out_dir, f"{name}-checkpoint"))
            if rank == 0:
                torch.save(result, os.path.join(out_dir, f"{name}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    import torch.multiprocessing as mp

    out_dir = str(tmp_path_factory.mktemp("checkpoint"))
    context = mp.start_processes(_worker, args=(free_port(), out_dir), nprocs=WORLD, join=False,
                                 start_method="spawn")
    failure = join_ranks(context, time.monotonic() + TIMEOUT_S)
    if failure:
        pytest.fail(f"the 2 ranks failed: {failure}")
    return {name: torch.load(os.path.join(out_dir, f"{name}.pt")) for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_a_resumed_model_trains_as_the_saved_one(results, name):
    r = results[name]
    assert r["resumed_loss"] == r["loss"]
    assert r["resumed_params"].keys() == r["params"].keys()
    for param, value in r["params"].items():
        assert not torch.equal(r["before_load"][param], value), f"{param}: the step or the other seed did nothing"
        assert torch.equal(r["resumed_params"][param], value), f"{param} differs after the resumed step"


def test_the_loaded_weights_still_gather_in_fp8(results):
    r = results["fp8_all_gather"]
    assert "Fp8AllGatherWeight" in r["local_types"]
    # 14 converted linears, gathered before each layer's forward and again before its backward
    assert r["fp8_gathers"] == r["resumed_fp8_gathers"] == 2 * 7 * zoo.LAYERS
    assert results["mxfp8"]["fp8_gathers"] == 0
