"""MXRMSNorm's constants buffer: exact through dtype moves, meta-device initialisation and pickling; never saved
in a state_dict."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from mxrewrite.api import optimize
from mxrewrite.modules import MXRMSNorm
from mxrewrite.modules.norm import CONSTANTS_BUFFER
from tests import zoo

# torchtitan's Llama with a calibrated constant per site; Gemma's gain (1 + weight) puts an offset in the buffer
CASES = [("torchtitan_llama", dict(rescale="calibrated")), ("gemma", dict())]


def optimized(name: str, recipe: dict) -> tuple[zoo.ZooModel, torch.nn.Module]:
    z = zoo.build(name)
    return z, optimize(z.model, z.args, progress=False, **recipe).eval()


def norms(model: torch.nn.Module) -> list[MXRMSNorm]:
    found = [m for m in model.modules() if isinstance(m, MXRMSNorm)]
    assert found
    return found


def logits(model: torch.nn.Module, z: zoo.ZooModel) -> torch.Tensor:
    out = model(*z.args, **z.kwargs)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("name,recipe", CASES, ids=[c[0] for c in CASES])
def test_constants_are_exact_float64_after_dtype_moves(name, recipe):
    if name == "gemma":
        pytest.importorskip("transformers")
    _, opt = optimized(name, recipe)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        opt.to(dtype)
        for norm in norms(opt):
            buffer = getattr(norm, CONSTANTS_BUFFER)
            assert buffer.dtype == torch.float64
            assert buffer.tolist() == list(norm.constants)


@pytest.mark.parametrize("name,recipe", CASES, ids=[c[0] for c in CASES])
def test_meta_device_initialisation_restores_the_constants(name, recipe):
    """The FSDP2 way to build a large model: on the meta device, then ``to_empty`` and a checkpoint load. The
    constants (not in the checkpoint: a non-persistent buffer) come back from the module, and the model
    computes exactly what the one built in memory does."""
    if name == "gemma":
        pytest.importorskip("transformers")
    z, opt = optimized(name, recipe)
    assert not any(CONSTANTS_BUFFER in key for key in opt.state_dict())
    skeleton = copy.deepcopy(opt).to("meta")
    assert all(getattr(n, CONSTANTS_BUFFER).is_meta for n in norms(skeleton))
    skeleton.to_empty(device="cpu")
    skeleton.load_state_dict(opt.state_dict())
    # the model's own non-persistent buffers (rotary tables) are its init code's job, not the checkpoint's
    state = opt.state_dict()
    with torch.no_grad():
        for key, buffer in opt.named_buffers():
            if key not in state and CONSTANTS_BUFFER not in key:
                skeleton.get_buffer(key).copy_(buffer)
    with torch.no_grad():
        torch.testing.assert_close(logits(skeleton, z), logits(opt, z), rtol=0, atol=0)
    assert [n.constants for n in norms(skeleton)] == [n.constants for n in norms(opt)]


@pytest.mark.parametrize("name,recipe", CASES, ids=[c[0] for c in CASES])
def test_a_saved_model_loads_and_computes_the_same(name, recipe):
    """``torch.save`` of the whole optimized model (and any pickling: spawned workers, deep copies)."""
    if name == "gemma":
        pytest.importorskip("transformers")
    z, opt = optimized(name, recipe)
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert [n.constants for n in norms(loaded)] == [n.constants for n in norms(opt)]
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, z), logits(opt, z), rtol=0, atol=0)
