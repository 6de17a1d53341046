"""The fast paths (factored forms, the merged-weight autograd function) equal the reference
`F.linear(x, W + dW)` in outputs and in every gradient, whichever path the cost model picks."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import methods

METHODS = methods.available()
# (in, out) and hp: in > out, out > in, awkward widths; LoKr full / low-rank / decompose_both factors
CASES = [((40, 24), {"r": 3}), ((24, 40), {"r": 5}), ((36, 100), {"r": 2})]
EXTRA = {"lokr": [((48, 64), {"r": 2, "factor": 4}), ((64, 48), {"r": 1, "factor": 2, "decompose_both": True}),
                  ((100, 36), {"r": 8}), ((48, 64), {"r": 1, "factor": 8, "decompose_both": True}),
                  ((8, 16), {"r": 8, "factor": 2})],   # the last contracts c first: generic path
         "randlora": [((40, 24), {"r": 3, "sparse": True})]}


def forced(path: str):
    """Pin the per-call choice of the cost model: 'merged', 'factored' or None (the model decides)."""
    return None if path == "auto" else (lambda tokens, grad, joins_base=True: path == "merged")


def grads_of(layer: nn.Module, x: torch.Tensor, path: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    layer = copy.deepcopy(layer)
    if forced(path) is not None:
        layer.use_merged_path = forced(path)
    x = x.clone().requires_grad_(True)
    params = [p for _, p in layer.adapter_parameters()]
    if path == "reference":
        y = F.linear(x, layer.base_layer.weight + layer.delta_weight(), layer.base_layer.bias)
    else:
        y = layer(x)
    weights = torch.linspace(-1, 1, y.numel()).view_as(y)   # a loss with distinct per-output weights
    grads = torch.autograd.grad((y * weights).sum(), [x, *params])
    return y.detach(), list(grads)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("path", ["factored", "merged", "auto"])
def test_fast_path_outputs_and_gradients_equal_reference(method, path, randomize_params):
    for shape, hp in CASES + EXTRA.get(method, []):
        torch.manual_seed(0)
        layer = methods.wrap_linear(method, nn.Linear(*shape), alpha=2.0, **hp)
        randomize_params(layer, std=0.3)
        x = torch.randn(2, 7, shape[0])
        y_ref, g_ref = grads_of(layer, x, "reference")
        y, g = grads_of(layer, x, path)
        scale = y_ref.abs().max().item()
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * scale, msg=f"{method} {hp} output")
        for name, a, b in zip(["x", *(n for n, _ in layer.adapter_parameters())], g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item() + 1e-7,
                                       msg=f"{method} {hp} grad of {name}")


@pytest.mark.parametrize("method", METHODS)
def test_merged_path_keeps_no_weight_sized_tensor_for_backward(method, randomize_params):
    """The merged path saves x only: no out x in tensor (dW or W + dW) stays in the autograd graph."""
    layer = methods.wrap_linear(method, nn.Linear(64, 96), r=4)
    randomize_params(layer)
    layer.use_merged_path = forced("merged")
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(5, 64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    static = {p.data_ptr() for p in layer.parameters()}
    activations = [t for t in saved if t.data_ptr() not in static]
    assert all(t.shape != (96, 64) for t in activations), [t.shape for t in activations]
    y.sum().backward()
    assert all(p.grad is not None for _, p in layer.adapter_parameters())


@pytest.mark.parametrize("method", ["loha", "randlora"])  # randlora 12 -> 10: its out < in function
def test_merged_path_base_weight_and_bias_gradients_when_unfrozen(method, randomize_params):
    """If someone unfreezes the base layer, the merged path still returns its weight and bias grads."""
    layer = methods.wrap_linear(method, nn.Linear(12, 10), r=2)
    randomize_params(layer)
    layer.base_layer.requires_grad_(True)
    x = torch.randn(4, 12)
    ref = copy.deepcopy(layer)
    F.linear(x, ref.base_layer.weight + ref.delta_weight(), ref.base_layer.bias).square().sum().backward()
    layer.use_merged_path = forced("merged")
    layer(x).square().sum().backward()
    torch.testing.assert_close(layer.base_layer.weight.grad, ref.base_layer.weight.grad)
    torch.testing.assert_close(layer.base_layer.bias.grad, ref.base_layer.bias.grad)


def test_randlora_merged_path_saves_the_basis_projection_not_the_input(randomize_params):
    """out < in: RandLoRA keeps u = x B (tokens x n r) for backward instead of x (tokens x in), as PEFT does."""
    layer = methods.wrap_linear("randlora", nn.Linear(96, 32), r=4, alpha=4)   # n = 8 bases, n r = 32
    randomize_params(layer)
    layer.use_merged_path = forced("merged")
    saved = []
    x = torch.randn(5, 96)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    static = {p.data_ptr() for p in layer.parameters()} | {b.data_ptr() for b in layer.buffers()}
    shapes = [tuple(t.shape) for t in saved if t.data_ptr() not in static]
    assert (5, 32) in shapes and (5, 96) not in shapes, shapes
    ref = copy.deepcopy(layer)
    F.linear(x, ref.base_layer.weight + ref.delta_weight(), ref.base_layer.bias).square().sum().backward()
    y.square().sum().backward()
    for (name, p), (_, q) in zip(layer.adapter_parameters(), ref.adapter_parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * q.grad.abs().max(), name


@pytest.mark.parametrize("method", METHODS)
def test_cost_model_picks_factored_for_many_tokens_when_cheaper(method):
    """Sanity of the FLOP model on a ViT-B-sized layer at a LoRA-8 budget: the rank-limited methods stay
    factored for thousands of tokens; RandLoRA (full-rank, n r >= min(in, out)) merges."""
    hp = {"lora": {"r": 8}, "loha": {"r": 4}, "lokr": {"r": 16, "factor": 2}, "randlora": {"r": 34}}[method]
    with torch.device("meta"):
        layer = methods.wrap_linear(method, nn.Linear(768, 3072), **hp)
    assert layer.use_merged_path(3152, grad=True) == (method == "randlora")
    assert layer.use_merged_path(1, grad=False) is False or method == "randlora"


@pytest.mark.parametrize(("shape", "hp", "fused"), [
    ((384, 384), {"r": 64, "factor": 2}, True),          # the budget solver's lora32 choice
    ((36, 100), {"r": 8}, True),                          # full W2
    ((48, 64), {"r": 1, "factor": 8, "decompose_both": True}, True),
    ((8, 16), {"r": 8, "factor": 2}, False)])             # c contracted first: no fused form
def test_lokr_fused_path_keeps_only_the_thin_intermediate(shape, hp, fused, randomize_params):
    """LoKr's training path saves x and z1 = x R^T (c x T x k) for backward -- never dW, never a
    tokens x out tensor -- and still gives the reference outputs and gradients."""
    layer = methods.wrap_linear("lokr", nn.Linear(*shape), **hp)
    randomize_params(layer, std=0.1)
    x = torch.randn(3, 11, shape[0])
    assert (layer.fused_forward(x) is not None) == fused
    if not fused:
        return
    layer.use_merged_path = forced("factored")
    saved = {}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.setdefault(t.data_ptr(), t), lambda t: t):
        layer(x.requires_grad_(True))
    static = {p.data_ptr() for p in layer.parameters()}
    a, b, c, _ = layer.kron_dims
    k = b if hasattr(layer, "lokr_w2") else hp["r"]
    activations = sorted(tuple(t.shape) for ptr, t in saved.items() if ptr not in static and t.numel() > a * c)
    assert activations == sorted([(c, 33, k), (3, 11, shape[0])]), activations
    y, grads = grads_of(layer, x.detach(), "factored")
    y_ref, ref = grads_of(layer, x.detach(), "reference")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * r.abs().max().item() + 1e-7)


@pytest.mark.parametrize("method", ["lora", "loha"])
def test_thin_right_factor_is_column_major_after_copies_and_moves(method):
    """R^T of the factored form is contiguous (MKL's fast layout for backward's g @ R, see
    `AdapterLayer.adapter_factors`), also after deepcopy and a dtype move,
    while parameter shapes stay PEFT's (out x r)."""
    layer = methods.wrap_linear(method, nn.Linear(24, 40), r=2)
    x = torch.randn(3, 24)
    for copy_of in (layer, copy.deepcopy(layer), copy.deepcopy(layer).double()):
        _, right = copy_of.adapter_factors(x.to(copy_of.weight.dtype))
        assert right.shape[0] == 40 and right.T.is_contiguous()
    for name, p in layer.adapter_parameters():
        assert p.shape[0] in (40, 2), name


class FixedMask(nn.Module):
    """Adapter dropout with a fixed mask: like active dropout it gives the adapter its own input (so dW
    cannot join the base matmul), but the reference can apply the same mask."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("path", ["factored", "merged", "auto"])
def test_paths_with_a_separate_adapter_input_equal_reference(method, path, randomize_params):
    """With adapter dropout the update is x' dW^T on the dropped-out x': the merged path then runs alone
    (`merged_linear(..., alone=True)`) next to the base matmul, with the same outputs and gradients."""
    for shape, hp in CASES + EXTRA.get(method, []):
        torch.manual_seed(0)
        layer = methods.wrap_linear(method, nn.Linear(*shape), alpha=2.0, **hp)
        randomize_params(layer, std=0.3)
        x = torch.randn(2, 7, shape[0])
        layer.adapter_dropout = FixedMask((torch.rand(shape[0]) > 0.3).float())
        ref_layer = copy.deepcopy(layer)
        xr = x.clone().requires_grad_(True)
        base = ref_layer.base_layer
        y_ref = F.linear(xr, base.weight, base.bias) + F.linear(ref_layer.adapter_dropout(xr), ref_layer.delta_weight())
        params_ref = [p for _, p in ref_layer.adapter_parameters()]
        weights = torch.linspace(-1, 1, y_ref.numel()).view_as(y_ref)
        g_ref = torch.autograd.grad((y_ref * weights).sum(), [xr, *params_ref])
        y, g = grads_of(layer, x, path)
        torch.testing.assert_close(y, y_ref.detach(), rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item() + 1e-7)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("path", ["factored", "merged"])
def test_paths_under_bf16_autocast_match_fp32_within_bf16_precision(method, path, randomize_params):
    """Under autocast (the GPU runs' bf16) dW cannot join the base matmul; both paths must still run
    forward and backward (the merged path's backward re-enters autocast) and agree with the fp32
    reference to bf16 precision, with fp32 parameter gradients."""
    torch.manual_seed(0)
    layer = methods.wrap_linear(method, nn.Linear(48, 64), alpha=2.0, r=4)
    randomize_params(layer, std=0.3)
    x = torch.randn(2, 9, 48)
    y_ref, g_ref = grads_of(layer, x, "reference")
    layer.use_merged_path = forced(path)
    x = x.requires_grad_(True)
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):   # forward only, as in the training loop
        y = layer(x)
    if method == "lokr" and path == "factored":   # the fused function runs under autocast too
        assert type(y.grad_fn).__name__ == "_KronLinearBackward"
    if path == "merged":   # the activation kept for g^T x is in bf16, as autocast's own matmuls keep it
        static = {p.data_ptr() for p in layer.parameters()}
        assert all(t.dtype == torch.bfloat16 for t in saved if t.data_ptr() not in static and t.dim() == 3)
    weights = torch.linspace(-1, 1, y.numel()).view_as(y)
    g = torch.autograd.grad((y.float() * weights).sum(), [x, *(p for _, p in layer.adapter_parameters())])
    assert y.dtype == torch.bfloat16 and all(a.dtype == torch.float32 for a in g)
    torch.testing.assert_close(y.float(), y_ref, rtol=0, atol=3e-2 * y_ref.abs().max().item())
    for name, a, b in zip(["x", *(n for n, _ in layer.adapter_parameters())], g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=3e-2 * b.abs().max().item(), msg=f"grad of {name}")
