"""The Triton deformable-attention kernel against the pure-PyTorch reference, on the CPU through
Triton's interpreter (``TRITON_INTERPRET=1``): values and gradients w.r.t. value, sampling locations
and attention weights, float32 and bfloat16, odd level shapes, points outside the map and far away.

Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function, so the module fixture sets
it and loads a private copy of :mod:`mutdet.models.ms_deform_attn_triton` (the package's own copy, if
any, is left as it is). What this does not check: the GPU compiler (layouts, real atomics, bf16 codegen);
``benchmarks/gpu.py`` re-checks parity on a GPU.
"""
import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from mutdet.models import deformable_attention
from mutdet.models.deformable_attention import MultiScaleDeformableAttention, ms_deform_attn, set_attention_kernel
from numerics import assert_close_to_scale, rounding_tolerance

pytest.importorskip("triton", reason="triton is not importable here: the fused kernel cannot be tested")

SHAPES = torch.tensor([[5, 7], [3, 1], [2, 2], [1, 1]])  # (H_l, W_l): odd, a column, a single pixel
KERNEL_FILE = Path(deformable_attention.__file__).with_name("ms_deform_attn_triton.py")


@pytest.fixture(scope="module")
def fused():
    """The kernel module built for the interpreter (runs on CPU tensors)."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read when the module loads and again when kernels run
    try:
        spec = importlib.util.spec_from_file_location("_ms_deform_attn_triton_interpreted", KERNEL_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.interpreted(), "TRITON_INTERPRET=1 did not give interpreted kernels"
        yield module
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


def _start(shapes):
    return torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])


def _inputs(seed, batch=2, queries=5, heads=2, channels=3, points=2, far=True):
    g = torch.Generator().manual_seed(seed)
    s = int(SHAPES.prod(1).sum())
    value = torch.randn(batch, s, heads, channels, generator=g)
    # [-0.3, 1.3]: about a third of the points have one or more corners outside their level
    locations = torch.rand(batch, queries, heads, len(SHAPES), points, 2, generator=g) * 1.6 - 0.3
    if far:  # far outside: read zero, gradient zero (the kernel clamps before converting to int)
        locations[0, 0, 0, 0, 0] = torch.tensor([1e9, 0.5])
        locations[0, 1, 1, 1, 0] = torch.tensor([0.5, -1e9])
        locations[1, 2, 0, 0, 1] = torch.tensor([-3.0, 4.0])
    weights = torch.rand(batch, queries, heads, len(SHAPES), points, generator=g)
    return value, locations, weights


def _value_and_grads(fn, value, locations, weights, grad_out=None):
    inputs = [t.detach().clone().requires_grad_(True) for t in (value, locations, weights)]
    out = fn(inputs[0], SHAPES, _start(SHAPES), inputs[1], inputs[2])
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(99))
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    return out.detach(), grads, grad_out


def _tolerances(dtype, queries, channels, points):
    """Per quantity: ``depth x terms x eps`` of float32 (both sides sum in float32 in another order, and
    the reference's ``grid_sample`` rounds its pixel coordinate differently), plus one rounding to
    ``dtype`` for the kernel's cast of a float32 result."""
    levels = len(SHAPES)
    terms = {"out": 4 * levels * points, "grad_value": 4 * queries * points, "grad_locations": 4 * channels,
             "grad_weights": 4 * channels}
    cast = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps
    return {k: rounding_tolerance(torch.float32, n, depth=4) + cast for k, n in terms.items()}


@pytest.mark.parametrize("block_q", [None, 4])  # one program per (b, m), or several with a ragged last one
def test_float32_values_and_gradients_match_reference(fused, block_q):
    value, locations, weights = _inputs(0)
    got, got_grads, grad_out = _value_and_grads(
        lambda *a: fused.ms_deform_attn_triton(*a, block_q=block_q), value, locations, weights)
    want, want_grads, _ = _value_and_grads(ms_deform_attn, value, locations, weights, grad_out)
    assert got.shape == want.shape == (2, 5, 6) and got.dtype == torch.float32
    tol = _tolerances(torch.float32, queries=5, channels=3, points=2)
    assert_close_to_scale(got, want, tol["out"], "out")
    for name, a, b in zip(("grad_value", "grad_locations", "grad_weights"), got_grads, want_grads):
        assert a.dtype == torch.float32
        assert_close_to_scale(a, b, tol[name], name)


def test_far_points_read_zero_and_get_zero_gradient(fused):
    value, locations, weights = _inputs(1, batch=1, queries=2, heads=1, points=1, far=False)
    locations[0, :, 0, :, 0] = torch.tensor([[1e9, 0.5], [-1e9, 0.5], [0.5, 1e9], [-2.0, -2.0]])
    got, (_, grad_loc, grad_w), _ = _value_and_grads(fused.ms_deform_attn_triton, value, locations, weights)
    assert torch.equal(got, torch.zeros_like(got))
    assert torch.equal(grad_loc, torch.zeros_like(grad_loc))
    assert torch.equal(grad_w, torch.zeros_like(grad_w))


def test_edge_pixels_half_outside_match_reference(fused):
    """Points within half a pixel of the border: two of their corners are outside (zero padding)."""
    value, locations, weights = _inputs(2, batch=1, queries=4, heads=1, points=1, far=False)
    size = SHAPES.flip(1).to(torch.float32)  # (L, 2) as (W, H)
    mid = size / 2 + 0.1
    # in pixels from the top-left corner: 0.3 px past the right, bottom, left and top borders
    past = [(size[:, 0] + 0.3, mid[:, 1]), (mid[:, 0], size[:, 1] + 0.3), (torch.full((4,), -0.3), mid[:, 1]),
            (mid[:, 0], torch.full((4,), -0.3))]
    for q, (px, py) in enumerate(past):
        locations[0, q, 0, :, 0] = torch.stack([px, py], -1) / size
    got, got_grads, grad_out = _value_and_grads(fused.ms_deform_attn_triton, value, locations, weights)
    want, want_grads, _ = _value_and_grads(ms_deform_attn, value, locations, weights, grad_out)
    tol = _tolerances(torch.float32, queries=4, channels=3, points=1)
    assert_close_to_scale(got, want, tol["out"], "out")
    for name, a, b in zip(("grad_value", "grad_locations", "grad_weights"), got_grads, want_grads):
        assert_close_to_scale(a, b, tol[name], name)


def test_bfloat16_inputs_match_float32_reference_within_one_rounding(fused):
    """bf16 in, float32 accumulation, bf16 out: one bf16 rounding of each result away from the float32
    reference run on the same (bf16-representable) inputs."""
    value, locations, weights = (t.to(torch.bfloat16) for t in _inputs(3))
    got, got_grads, grad_out = _value_and_grads(fused.ms_deform_attn_triton, value, locations, weights)
    want, want_grads, _ = _value_and_grads(ms_deform_attn, value.float(), locations.float(), weights.float(),
                                           grad_out.to(torch.bfloat16).float())
    assert got.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in got_grads)
    tol = _tolerances(torch.bfloat16, queries=5, channels=3, points=2)
    assert_close_to_scale(got.float(), want, tol["out"], "out")
    for name, a, b in zip(("grad_value", "grad_locations", "grad_weights"), got_grads, want_grads):
        assert_close_to_scale(a.float(), b, tol[name], name)


def test_mixed_dtypes_promote_like_autocast(fused):
    """Under bf16 autocast the values are bf16 and the softmaxed weights float32: the result is float32."""
    value, locations, weights = _inputs(4, far=False)
    got = fused.ms_deform_attn_triton(value.to(torch.bfloat16), SHAPES, _start(SHAPES), locations, weights)
    want = ms_deform_attn(value.to(torch.bfloat16).float(), SHAPES, _start(SHAPES), locations, weights)
    assert got.dtype == torch.float32
    assert_close_to_scale(got, want, _tolerances(torch.float32, 5, 3, 2)["out"], "out")


def test_module_with_triton_kernel_matches_torch_kernel(fused, monkeypatch):
    """``kernel="triton"`` through the module's dispatch (the interpreted copy stands in for the package's)."""
    monkeypatch.setitem(sys.modules, "mutdet.models.ms_deform_attn_triton", fused)
    monkeypatch.setattr(sys.modules["mutdet.models"], "ms_deform_attn_triton", fused, raising=False)
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(embed_dim=8, num_heads=2, num_levels=len(SHAPES), num_points=2,
                                           rotated=True)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    g = torch.Generator().manual_seed(5)
    query = torch.randn(2, 3, 8, generator=g)
    value = torch.randn(2, int(SHAPES.prod(1).sum()), 8, generator=g)
    boxes = torch.cat([torch.rand(2, 3, 2, generator=g) * 0.6 + 0.2, torch.rand(2, 3, 2, generator=g) * 0.3 + 0.1], -1)
    reference = boxes[:, :, None].expand(-1, -1, len(SHAPES), -1)  # (B, Q, 4) -> (B, Q, L, 4)
    angles = torch.rand(2, 3, generator=g) * math.pi - math.pi / 2
    results = {}
    for kernel in ("torch", "triton"):
        assert set_attention_kernel(module, kernel) == 1
        module.zero_grad()
        out = module(query, reference, value, SHAPES, _start(SHAPES), reference_angles=angles)
        out.square().sum().backward()
        results[kernel] = (out.detach(), [p.grad.clone() for p in module.parameters()])
    tol = _tolerances(torch.float32, queries=3, channels=4, points=2)
    assert_close_to_scale(results["triton"][0], results["torch"][0], tol["out"], "out")
    for a, b in zip(results["triton"][1], results["torch"][1]):
        assert_close_to_scale(a, b, 8 * tol["grad_value"], "parameter gradient")  # through linear layers too


def test_float64_and_cpu_fall_back_to_torch(monkeypatch):
    """Without the interpreter, a CPU module asked for Triton computes with the reference."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    module = MultiScaleDeformableAttention(embed_dim=4, num_heads=1, num_levels=1, num_points=1, kernel="triton")
    value = torch.randn(1, 6, 1, 4)
    loc, w = torch.rand(1, 2, 1, 1, 1, 2), torch.rand(1, 2, 1, 1, 1)
    shapes = torch.tensor([[2, 3]])
    got = deformable_attention._sample(module.kernel, value, shapes, _start(shapes), loc, w)
    torch.testing.assert_close(got, ms_deform_attn(value, shapes, _start(shapes), loc, w), rtol=0, atol=0)
    with pytest.raises(ValueError, match="kernel"):
        MultiScaleDeformableAttention(embed_dim=4, num_heads=1, num_levels=1, num_points=1, kernel="cuda")
    with pytest.raises(ValueError, match="attention kernel"):
        set_attention_kernel(module, "mmcv")


def test_rejects_mismatched_shapes(fused):
    value, locations, weights = _inputs(6, far=False)
    with pytest.raises(ValueError, match="attention_weights"):
        fused.ms_deform_attn_triton(value, SHAPES, _start(SHAPES), locations, weights[..., :1])
    with pytest.raises(TypeError, match="float64"):
        fused.ms_deform_attn_triton(value.double(), SHAPES, _start(SHAPES), locations, weights)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_to_gpu_code_without_a_gpu(monkeypatch, dtype):
    """Triton's compiler (front end, LLVM, the bundled ptxas) takes both kernels to an H100/H200 (sm_90)
    binary at the paper's head shape (8 heads of 32, 4 levels x 4 points) and default block sizes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = importlib.util.spec_from_file_location("_ms_deform_attn_triton_compiled", KERNEL_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.interpreted()
    value, loc = torch.empty(2, 100, 8, 32), torch.empty(2, 100, 8, 4, 4, 2)
    pointers = {"value_ptr": f"*{dtype}", "shapes_ptr": "*i64", "start_ptr": "*i64", "loc_ptr": "*fp32",
                "attn_ptr": "*fp32"}
    outputs = {False: {"out_ptr": "*fp32"},
               True: {"grad_out_ptr": "*fp32", "grad_value_ptr": "*fp32", "grad_loc_ptr": "*fp32",
                      "grad_attn_ptr": "*fp32"}}
    for backward, kernel in ((False, module._ms_deform_attn_fwd), (True, module._ms_deform_attn_bwd)):
        _, block_q, block_d = module._launch_shape(value, loc, None, backward)
        constants = dict(M=8, D=32, L=4, P=4, BLOCK_Q=block_q, BLOCK_D=block_d)
        signature = {**pointers, **outputs[backward], "S": "i32", "Q": "i32", **{k: "constexpr" for k in constants}}
        compiled = triton_compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": module.NUM_WARPS})
        assert compiled.asm["cubin"], "no sm_90 binary"
        assert ("atom.global" in compiled.asm["ptx"]) == backward  # the value gradient's scatter
