"""The fast paths (factored forms, the merged-weight autograd function) equal the reference
`F.linear(x, W + dW)` in outputs and in every gradient, whichever path the cost model picks."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import methods

# methods whose forward is ours (the factored and merged paths under test); PEFT-backed layers run PEFT's
METHODS = [m for m in methods.available() if methods.get_method(m).has_cost_model]
# (in, out) and hp: in > out, out > in, awkward widths; LoKr full / low-rank / decompose_both factors
CASES = [((40, 24), {"r": 3}), ((24, 40), {"r": 5}), ((36, 100), {"r": 2})]
EXTRA = {"lokr": [((48, 64), {"r": 2, "factor": 4}),
                  ((64, 48), {"r": 1, "factor": 2, "decompose_both": True}),
                  ((100, 36), {"r": 8}), ((48, 64), {"r": 1, "factor": 8, "decompose_both": True}),
                  ((8, 16), {"r": 8, "factor": 2})],   # the last contracts c first: generic path
         "randlora": [((40, 24), {"r": 3, "sparse": True})]}


PATHS = ["factored", "merged", "merged-kept", "merged-rebuilt", "auto"]


def forced(path: str):
    """Pin the per-call choice of the cost model: 'merged...', 'factored' or None (the model decides)."""
    return None if path == "auto" else (lambda tokens, grad, **route: path.startswith("merged"))


def force(layer: nn.Module, path: str) -> None:
    """Pin the path, and for 'merged-kept' / 'merged-rebuilt' whether dW is kept from forward to backward
    (plain 'merged': the layer's own choice)."""
    if forced(path) is not None:
        layer.use_merged_path = forced(path)
    if path in ("merged-kept", "merged-rebuilt"):
        layer.keeps_delta = lambda half=None: path == "merged-kept"


def grads_of(layer: nn.Module, x: torch.Tensor, path: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    layer = copy.deepcopy(layer)
    force(layer, path)
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
@pytest.mark.parametrize("path", PATHS)
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
        for name, a, b in zip(["x", *(n for n, _ in layer.adapter_parameters())], g, g_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item() + 1e-7,
                                       msg=f"{method} {hp} grad of {name}")


@pytest.mark.parametrize("method", METHODS)
def test_merged_path_keeps_no_weight_sized_tensor_for_backward(method, randomize_params):
    """Where the layer does not keep dW, the merged path saves x only: no out x in tensor (dW or W + dW)
    stays in the autograd graph."""
    layer = methods.wrap_linear(method, nn.Linear(64, 96), r=4)
    randomize_params(layer)
    assert not layer.keeps_delta()   # 64 x 96 > what the factored form saves (randlora: n r x 64)
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
    for got, want in [(layer.base_layer.weight.grad, ref.base_layer.weight.grad),
                      (layer.base_layer.bias.grad, ref.base_layer.bias.grad)]:  # W + dW: own rounding
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_randlora_merged_path_saves_the_basis_projection_not_the_input(randomize_params):
    """out < in: RandLoRA keeps u = x B (tokens x n r) for backward instead of x (tokens x in), as PEFT
    does."""
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
    for (name, p), (_, q) in zip(layer.adapter_parameters(), ref.adapter_parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * q.grad.abs().max(), name


@pytest.mark.parametrize("method", METHODS)
def test_cost_model_picks_factored_for_many_tokens_when_cheaper(method):
    """Sanity of the FLOP model on a ViT-B-sized layer at a LoRA-8 budget: the rank-limited methods stay
    factored for thousands of tokens; RandLoRA (full-rank, n r >= min(in, out)) merges."""
    hp = {"lora": {"r": 8}, "loha": {"r": 4}, "lokr": {"r": 16, "factor": 2}, "randlora": {"r": 34},
          "vera": {"r": 256}}[method]
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
    activations = sorted(tuple(t.shape) for ptr, t in saved.items()
                         if ptr not in static and t.numel() > a * c)
    assert activations == sorted([(c, 33, k), (3, 11, shape[0])]), activations
    y, grads = grads_of(layer, x.detach(), "factored")
    y_ref, ref = grads_of(layer, x.detach(), "reference")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
    for g, r in zip(grads, ref, strict=True):
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
@pytest.mark.parametrize("path", PATHS)
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
        y_ref = (F.linear(xr, base.weight, base.bias)
                 + F.linear(ref_layer.adapter_dropout(xr), ref_layer.delta_weight()))
        params_ref = [p for _, p in ref_layer.adapter_parameters()]
        weights = torch.linspace(-1, 1, y_ref.numel()).view_as(y_ref)
        g_ref = torch.autograd.grad((y_ref * weights).sum(), [xr, *params_ref])
        y, g = grads_of(layer, x, path)
        torch.testing.assert_close(y, y_ref.detach(), rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
        for a, b in zip(g, g_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item() + 1e-7)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("path", ["factored", "merged-kept", "merged-rebuilt"])
def test_paths_under_bf16_autocast_match_fp32_within_bf16_precision(method, path, randomize_params):
    """Under autocast (the GPU runs' bf16) dW cannot join the base matmul; both paths must still run
    forward and backward (the merged path's backward re-enters autocast) and agree with the fp32
    reference to bf16 precision, with fp32 parameter gradients."""
    torch.manual_seed(0)
    layer = methods.wrap_linear(method, nn.Linear(48, 64), alpha=2.0, r=4)
    randomize_params(layer, std=0.3)
    x = torch.randn(2, 9, 48)
    y_ref, g_ref = grads_of(layer, x, "reference")
    force(layer, path)
    x = x.requires_grad_(True)
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):   # forward only, as in the training loop
        y = layer(x)
    if method == "lokr" and path == "factored":   # the fused function runs under autocast too
        assert type(y.grad_fn).__name__ == "_KronLinearBackward"
    if path != "factored":   # what is kept for backward is in bf16, as autocast's own matmuls keep it
        static = {p.data_ptr() for p in layer.parameters()}
        kept = [t for t in saved if t.data_ptr() not in static and t.numel() > 1]
        assert kept and all(t.dtype == torch.bfloat16 for t in kept), [(t.shape, t.dtype) for t in kept]
    weights = torch.linspace(-1, 1, y.numel()).view_as(y)
    g = torch.autograd.grad((y.float() * weights).sum(), [x, *(p for _, p in layer.adapter_parameters())])
    assert y.dtype == torch.bfloat16 and all(a.dtype == torch.float32 for a in g)
    torch.testing.assert_close(y.float(), y_ref, rtol=0, atol=3e-2 * y_ref.abs().max().item())
    for name, a, b in zip(["x", *(n for n, _ in layer.adapter_parameters())], g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=3e-2 * b.abs().max().item(), msg=f"grad of {name}")


# ----------------------------------------------------------------------------- RandLoRA at its floor
def count_builds(layer: nn.Module) -> dict[str, int]:
    """Count RandLoRA's dW builds (W + dW in one GEMM, or dW alone) and closed-form projections."""
    counts = {"merged_weight": 0, "delta_weight": 0, "delta_param_grads": 0}
    for name in counts:
        original = getattr(layer, name)

        def counted(*args, _name=name, _original=original):
            counts[_name] += 1
            return _original(*args)

        setattr(layer, name, counted)
    return counts


def reference_step(layer: nn.Module, xs: list[torch.Tensor], mask: torch.Tensor | None = None
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs and accumulated (x, parameter) gradients of F.linear(x, W) + F.linear(x', dW) over
    micro-batches, on a copy of the layer (the class's own delta_weight: counting wrappers stay out)."""
    ref = copy.deepcopy(layer)
    ref.__dict__.pop("delta_weight", None)
    params = [p for _, p in ref.adapter_parameters()]
    outs, x_grads = [], []
    for x in xs:
        x = x.clone().requires_grad_(True)
        base = ref.base_layer
        xa = x if mask is None else x * mask
        y = F.linear(x, base.weight, base.bias) + F.linear(xa, ref.delta_weight())
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs.append(y.detach())
        x_grads.append(x.grad)
    return outs, x_grads + [p.grad for p in params]


def layer_step(layer: nn.Module, xs: list[torch.Tensor], half: torch.dtype | None = None
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The same through the layer itself (its grads accumulate in place, as in training)."""
    outs, x_grads = [], []
    for x in xs:
        x = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=half or torch.bfloat16, enabled=half is not None):
            y = layer(x).to(x.dtype)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs.append(y.detach())
        x_grads.append(x.grad)
    return outs, x_grads + [p.grad for _, p in layer.adapter_parameters()]


def assert_all_close(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float, what: str) -> None:
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item(), msg=f"{what} #{k}")


def randlora_layer(shape: tuple[int, int], r: int, dtype: torch.dtype = torch.float32, **hp) -> nn.Module:
    torch.manual_seed(0)
    layer = methods.wrap_linear("randlora", nn.Linear(*shape, dtype=dtype), r=r, alpha=2.0, **hp)
    with torch.no_grad():
        for _, p in layer.adapter_parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    return layer


@pytest.mark.parametrize(("shape", "tokens", "keeps", "builds"), [   # builds: (joined, with dropout)
    ((24, 24), 10, True, (1, 1)),     # kept: the forward's W + dW serves the input gradient
    ((24, 40), 10, False, (1, 1)),    # out > in: backward's input gradient g W + (g B)(s S), no 2nd build
    ((24, 40), 400, False, (2, 2)),   # ... unless G, B^T G and a rebuild cost less (many tokens)
    ((40, 24), 10, False, (1, 2)),    # out < in: the forward applies u (s S) (tokens < in, joined only)
    ((40, 24), 64, False, (2, 2))])   # tokens >= in: built in the forward too
@pytest.mark.parametrize("dropout", [False, True])
def test_randlora_training_call_builds_dw_once_and_projects_once(shape, tokens, keeps, builds, dropout):
    """Per training call: one closed-form projection (no autograd rebuild of dW's graph) and one build of
    W + dW (dW alone next to the base with adapter dropout); a second build only where dW is not kept (out
    x in elements above the n r x min(in, out) that PEFT's form keeps) and the factored pass costs more
    multiply-adds than building again. A kept dW is built once for two micro-batches. float64: exact."""
    layer = randlora_layer(shape, r=3, dtype=torch.float64)
    layer.use_merged_path = forced("merged")
    mask = (torch.rand(shape[0]) > 0.3).double() if dropout else None
    if dropout:
        layer.adapter_dropout = FixedMask(mask)
    assert layer.keeps_delta() == keeps
    counts = count_builds(layer)
    xs = [torch.randn(tokens, shape[0], dtype=torch.float64) for _ in range(2)]
    want_y, want_g = reference_step(layer, xs, mask)
    got_y, got_g = layer_step(layer, xs)
    per_step = {"delta_weight" if dropout else "merged_weight": builds[dropout] * (1 if keeps else 2)}
    assert counts == {"merged_weight": 0, "delta_weight": 0, **per_step, "delta_param_grads": 2}
    assert_all_close(got_y, want_y, 1e-10, "outputs")
    assert_all_close(got_g, want_g, 1e-10, "gradients")


OPTIMIZERS = {"fused AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True),
              "AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.1, foreach=False),
              "SGD": lambda ps: torch.optim.SGD(ps, lr=0.1)}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("mode", ["joined", "dropout", "bf16"])
def test_gradient_accumulation_builds_dw_once_per_optimizer_step(optimizer, mode):
    """Micro-batches of one optimizer step share one dW (it only changes when the optimizer steps) and
    accumulate exactly the reference gradients; after the step -- even one of the fused AdamW kernel,
    which does not bump parameter versions -- dW is rebuilt from the new parameters."""
    layer = randlora_layer((24, 24), r=3)
    layer.use_merged_path = forced("merged")
    mask = (torch.rand(24) > 0.3).float() if mode == "dropout" else None
    if mask is not None:
        layer.adapter_dropout = FixedMask(mask)
    half = torch.bfloat16 if mode == "bf16" else None
    counts = count_builds(layer)
    build = "merged_weight" if mode == "joined" else "delta_weight"
    opt = OPTIMIZERS[optimizer]([p for _, p in layer.adapter_parameters()])
    rtol = 3e-2 if half else 1e-5
    for step in range(2):
        xs = [torch.randn(2, 5, 24) for _ in range(3)]
        want_y, want_g = reference_step(layer, xs, mask)
        got_y, got_g = layer_step(layer, xs, half)
        assert counts[build] == step + 1 and counts["delta_param_grads"] == 3 * (step + 1)
        assert_all_close(got_y, want_y, rtol, f"{mode} step {step} outputs")
        assert_all_close(got_g, want_g, rtol, f"{mode} step {step} gradients")
        opt.step()
        opt.zero_grad()


def _mutate(layer: nn.Module, how: str, tmp_path) -> nn.Module:
    """Change what dW is built from in one of the ways training code does; returns the layer to use."""
    lam = layer.randlora_lambda
    with torch.no_grad():
        if how == "copy_":
            lam.copy_(torch.randn_like(lam))
        elif how == "bases copy_":
            layer.bases.randlora_A.mul_(-1)
        elif how == "replaced .data":
            lam.data = torch.randn_like(lam)
        elif how == "load_adapter":
            other = copy.deepcopy(layer)
            other.randlora_gamma.copy_(torch.randn_like(other.randlora_gamma))
            methods.save_adapter(nn.Sequential(other), tmp_path)
            methods.load_adapter(nn.Sequential(layer), tmp_path)
        elif how == "merge, unmerge":
            layer.merge()
            lam.add_(1.0)
            layer.unmerge()
        elif how == "eval, edit through .data, train":
            layer.eval()
            lam.data.add_(1.0)          # invisible to version counters: the mode switch clears instead
            layer.train()
        elif how == "deepcopy, edit the copy":
            layer = copy.deepcopy(layer)
            layer.randlora_lambda.copy_(torch.randn_like(layer.randlora_lambda))
    return layer


@pytest.mark.parametrize("how", ["copy_", "bases copy_", "replaced .data", "load_adapter", "merge, unmerge",
                                 "eval, edit through .data, train", "deepcopy, edit the copy"])
def test_kept_dw_is_never_stale(how, tmp_path):
    """A dW kept across calls is rebuilt whenever anything it was built from changed."""
    layer = randlora_layer((24, 24), r=3)
    layer.use_merged_path = forced("merged")
    layer_step(layer, [torch.randn(3, 24)])
    assert list(layer.delta_cache), "the square layer keeps W + dW"
    layer = _mutate(layer, how, tmp_path)
    for _, p in layer.adapter_parameters():
        p.grad = None
    x = [torch.randn(3, 24)]
    want_y, want_g = reference_step(layer, x)
    got_y, got_g = layer_step(layer, x)
    assert_all_close(got_y, want_y, 1e-5, f"{how}: outputs")
    assert_all_close(got_g, want_g, 1e-5, f"{how}: gradients")


def test_any_optimizer_step_drops_the_kept_dw_of_every_layer_copies_included():
    """The step hooks reach every cache, also those of deep copies and unpickled layers, whether or not
    it was filled (and from where: compiled code loses registrations made on fill)."""
    layer = randlora_layer((24, 24), r=3)
    layers = [layer, copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))]
    for each in layers:
        each.use_merged_path = forced("merged")
        layer_step(each, [torch.randn(3, 24)])
    assert all(list(each.delta_cache) for each in layers), "the square layer keeps W + dW"
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1).step()   # an unrelated optimizer's step
    assert not any(list(each.delta_cache) for each in layers)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("shape", "hp"), [((20, 20), {"r": 4}), ((12, 30), {"r": 5}), ((30, 12), {"r": 5}),
                                           ((30, 12), {"r": 3, "sparse": True})])
def test_randlora_float64_gradients_exact_over_accumulated_micro_batches(path, shape, hp):
    """In float64 every path, kept or rebuilt, gives the reference outputs and accumulated gradients to
    rounding (1e-10), across two optimizer steps of two micro-batches each."""
    layer = randlora_layer(shape, dtype=torch.float64, **hp)
    force(layer, path)
    opt = torch.optim.AdamW([p for _, p in layer.adapter_parameters()], lr=0.05, fused=True)
    for step in range(2):
        xs = [torch.randn(2, 7, shape[0], dtype=torch.float64) for _ in range(2)]
        want_y, want_g = reference_step(layer, xs)
        got_y, got_g = layer_step(layer, xs)
        assert_all_close(got_y, want_y, 1e-10, f"step {step} outputs")
        assert_all_close(got_g, want_g, 1e-10, f"step {step} gradients")
        opt.step()
        opt.zero_grad()


def test_cost_model_counts_one_build_where_dw_is_not_kept():
    """ViT-S MLP layers at T = 1024 and a LoRA-8 budget (r = 17, n r = 391) keep no dW (384 x 1536 > n r x
    384): fc1 (out > in) builds it in the forward and gets both gradients from g B; fc2 (out < in) applies
    u (s S) in the forward and builds dW in the backward only. With many more tokens than in_features the
    second build is cheaper again, and the cost model counts it."""
    with torch.device("meta"):
        fc1 = methods.wrap_linear("randlora", nn.Linear(384, 1536), r=17)
        fc2 = methods.wrap_linear("randlora", nn.Linear(1536, 384), r=17)
    nr, io, t = 391, 384 * 1536, 1024
    assert not fc1.keeps_delta() and not fc2.keeps_delta()
    assert fc1.path_macs(t, True)[1] == nr * io + t * nr * (1536 + 2 * 384)     # build; g B, H, (g B)(s S)
    # u S; x B, g^T u; build
    assert fc2.path_macs(t, True)[1] == t * nr * 384 + t * nr * (1536 + 384) + nr * io
    t = 4096
    assert fc1.path_macs(t, True)[1] == nr * io + t * io + 2 * nr * io          # build; G, H, rebuild
    assert fc2.path_macs(t, True)[1] == nr * io + t * nr * (1536 + 384) + nr * io


def test_keep_decision_follows_peft_memory_on_vit_b_shapes():
    """ViT-B at a LoRA-8 budget (r=34, n r = 782): W + dW of a square layer (768^2) fits in the n r x 768
    that PEFT's form keeps, an MLP layer's (768 x 3072) does not; under autocast PEFT also keeps a bf16
    copy of B (3072 x n r), so every layer keeps its bf16 dW. Eval never keeps."""
    with torch.device("meta"):
        square = methods.wrap_linear("randlora", nn.Linear(768, 768), r=34)
        mlp = methods.wrap_linear("randlora", nn.Linear(768, 3072), r=34)
    assert square.keeps_delta() and not mlp.keeps_delta()
    assert square.keeps_delta(torch.bfloat16) and mlp.keeps_delta(torch.bfloat16)
    nr, io = 23 * 34, 768 * 3072
    assert mlp.path_macs(3152, True)[1] == 3152 * io + 3 * nr * io   # build, G, projection, rebuild
    assert square.path_macs(3152, True)[1] == 3152 * 768**2 + 2 * nr * 768**2   # build, G, projection
    assert not square.eval().keeps_delta()

