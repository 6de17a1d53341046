"""Parity with Hugging Face PEFT (the reference implementation; imported only here).

For each case: build PEFT's adapter on a Linear, randomise its tensors (so dW != 0), copy them into
ours, and compare dW, the forward output and the trainable-parameter count.
"""
from __future__ import annotations

import copy

import pytest
import torch
from rbtest import NATIVE_METHODS
from torch import nn

import methods
from methods.lokr import factorization

peft = pytest.importorskip("peft")
peft_factorization = pytest.importorskip("peft.tuners.lokr.layer").factorization

# Native methods: a PEFT-backed method runs PEFT's own layer (methods/peft_backed.py), so its parity is with
# the native method it duplicates (peft_lora == lora, tests/methods/test_peft_backed.py), not with itself.
METHODS = NATIVE_METHODS


def peft_config(method: str, targets: list[str], **hp):
    """Our hyper-parameters spelled as PEFT's config of the same method (the class's `peft` spec)."""
    cls = methods.get_method(method)
    return cls.peft.config(cls.resolve_hp(hp), targets)


@torch.no_grad()
def copy_peft_into_ours(peft_model: nn.Module, ours: nn.Module, seed: int) -> None:
    """Randomise PEFT's trainable tensors, then copy each into our tensor of the same role (the method's
    `peft.tensors` names them); frozen random bases are copied too (bit-identical anyway, tested below)."""
    gen = torch.Generator().manual_seed(seed)
    targets = dict(ours.named_parameters())
    layers = methods.adapter_layers(ours)
    spec = type(next(iter(layers.values()))).peft
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            module, _, leaf = name.removeprefix("base_model.model.").partition(".")
            targets[f"{module}.{spec.our_tensor(leaf.replace('.default', ''))}"].copy_(p)
    for name, layer in layers.items():
        ref = getattr(peft_model.base_model.model, name)
        for basis in spec.random:
            getattr(layer.bases, basis).copy_(getattr(ref, basis)["default"])


class Net(nn.Module):
    def __init__(self, shapes: list[tuple[int, int]]) -> None:
        super().__init__()
        torch.manual_seed(0)
        for k, (i, o) in enumerate(shapes):
            self.add_module(f"lin{k}", nn.Linear(i, o))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [m(x) for m, x in zip(self.children(), xs, strict=True)]


def assert_parity(method: str, shapes: list[tuple[int, int]], **hp) -> None:
    net = Net(shapes)
    names = [f"lin{k}" for k in range(len(shapes))]
    ours = copy.deepcopy(net)
    methods.inject(ours, method, names, **hp)
    theirs = peft.get_peft_model(copy.deepcopy(net), peft_config(method, names, **hp))
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert methods.count_trainable(ours) == n_theirs
    assert sum(methods.num_params(method, i, o, **hp) for i, o in shapes) == n_theirs
    copy_peft_into_ours(theirs, ours, seed=sum(sum(s) for s in shapes) + hp["r"])
    xs = [torch.randn(3, i) for i, _ in shapes]
    ref = theirs.base_model.model
    for name in names:
        dw_theirs = getattr(ref, name).get_delta_weight("default")
        dw_ours = methods.adapter_layers(ours)[name].delta_weight()
        assert dw_theirs.abs().max() > 0
        torch.testing.assert_close(dw_ours, dw_theirs, rtol=1e-5, atol=1e-5 * dw_theirs.abs().max().item())
    for y_ours, y_theirs in zip(ours(xs), theirs(xs), strict=True):
        torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5 * y_theirs.abs().max().item())


# (in, out) shapes: in > out, out > in, square, awkward widths (100 = 4 * 25, 36, prime 37). Every
# registered method runs the generic cases (its default alpha, ranks 1..32); settings beyond r that a
# method has (its own knobs, a non-default alpha) are added per method, as in test_method_contract.py.
GENERIC = [((64, 32), {"r": 1}), ((32, 64), {"r": 8}), ((48, 48), {"r": 32}), ((100, 37), {"r": 4}),
           ((36, 100), {"r": 16})]
EXTRA_CASES = {
    "lora": [((37, 37), {"r": 8, "alpha": 4.0})],
    "loha": [((37, 37), {"r": 8, "alpha": 4.0}), ((100, 36), {"r": 32, "alpha": 4.0})],
    "lokr": [((32, 64), {"r": 8, "factor": 2}), ((48, 48), {"r": 4, "factor": 4, "alpha": 4.0}),
             ((100, 36), {"r": 2, "decompose_both": True}), ((37, 100), {"r": 8, "factor": 4}),
             ((64, 64), {"r": 1, "factor": 2, "decompose_both": True}),
             ((36, 100), {"r": 32, "decompose_both": True}),
             ((96, 48), {"r": 2, "factor": 4, "decompose_both": True}),
             ((128, 96), {"r": 3, "factor": 16, "decompose_both": True, "alpha": 4.0})],
    "randlora": [((32, 64), {"r": 8, "sparse": True}), ((100, 37), {"r": 4, "sparse": True, "alpha": 4.0}),
                 ((37, 100), {"r": 16, "seed": 7})],
}
CASES = [(m, s, hp) for m in METHODS for s, hp in GENERIC + EXTRA_CASES.get(m, [])]


def test_extra_cases_name_registered_methods():
    assert set(EXTRA_CASES) <= set(METHODS)


def case_id(value) -> str:
    return "-".join(f"{k}{x}" for k, x in value.items()) if isinstance(value, dict) else str(value)


@pytest.mark.parametrize("method,shape,hp", CASES, ids=case_id)
def test_single_layer_parity(method, shape, hp):
    assert_parity(method, [shape], **hp)


@pytest.mark.parametrize("method", METHODS)
def test_multi_layer_parity(method):
    """Several layers of different shapes; for methods with shared random bases, one pair sized by the
    element-wise max of (out, in) and sliced per layer, as PEFT does."""
    assert_parity(method, [(48, 20), (20, 64), (30, 30)], r=3)


@pytest.mark.parametrize("method", [m for m in METHODS if methods.get_method(m).peft.random])
def test_random_bases_regenerated_bit_identical_to_peft(method):
    """The same seed generates bit-identical shared bases to PEFT's (export relies on it)."""
    shapes, names = [(48, 20), (20, 64), (30, 30)], ["lin0", "lin1", "lin2"]
    net = Net(shapes)
    ours = copy.deepcopy(net)
    methods.inject(ours, method, names, r=6, seed=3)
    theirs = peft.get_peft_model(net, peft_config(method, names, r=6, seed=3))
    bases = next(iter(methods.adapter_layers(ours).values())).bases
    for name in methods.get_method(method).peft.random:
        assert torch.equal(getattr(bases, name), getattr(theirs.base_model.model.lin0, name)["default"]), name


@pytest.mark.parametrize("sparse", [False, True])
def test_randlora_shared_bases_parity_across_layers(sparse):
    """One pair of bases for all layers, sized by the element-wise max of (out, in), sliced per layer;
    the same seed generates bit-identical bases to PEFT's."""
    shapes = [(48, 20), (20, 64), (30, 30)]
    assert_parity("randlora", shapes, r=6, sparse=sparse, seed=3)
    net = Net(shapes)
    names = ["lin0", "lin1", "lin2"]
    ours = copy.deepcopy(net)
    methods.inject(ours, "randlora", names, r=6, sparse=sparse, seed=3)
    theirs = peft.get_peft_model(net, peft_config("randlora", names, r=6, sparse=sparse, seed=3))
    bases = next(iter(methods.adapter_layers(ours).values())).bases
    assert torch.equal(bases.randlora_A, theirs.base_model.model.lin0.randlora_A["default"])
    assert torch.equal(bases.randlora_B, theirs.base_model.model.lin0.randlora_B["default"])


def test_lokr_factorization_matches_peft():
    for dim in [*range(1, 130), 256, 512, 768, 1000, 2048, 3072, 4096]:
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 64):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


def test_initialisation_matches_peft_semantics():
    """At init PEFT's update is zero too, and RandLoRA's gamma is 1/min(in, out)."""
    for method in methods.available():   # PEFT-backed ones included: PEFT's own init through our harness
        cls = methods.get_method(method)
        layer = methods.wrap_linear(method, nn.Linear(40, 24), **({"r": 4} if "r" in cls.hp_spec else {}))
        exact = getattr(cls, "init_exact", True)   # HRA: paired reflections cancel up to rounding
        assert layer.delta_weight().abs().max() <= (0 if exact else 1e-6), method
    layer = methods.wrap_linear("randlora", nn.Linear(40, 24), r=4)
    assert torch.all(layer.randlora_gamma == 1 / 24) and torch.all(layer.randlora_lambda == 0)


# ----------------------------------------------------------------------------- RandLoRA's training paths
RANDLORA_SHAPES = [(24, 24), (24, 40), (40, 24)]   # square (keeps dW), out > in, out < in (x B saved)


def peft_pair(method: str, shapes: list[tuple[int, int]], dtype: torch.dtype, **hp
              ) -> tuple[nn.Module, nn.Module, list[str]]:
    """Ours and PEFT's `method` on the same Linears with the same (random) trainable tensors."""
    net = Net(shapes).to(dtype)
    names = [f"lin{k}" for k in range(len(shapes))]
    ours = copy.deepcopy(net)
    methods.inject(ours, method, names, **hp)
    theirs = peft.get_peft_model(copy.deepcopy(net), peft_config(method, names, **hp)).to(dtype)
    copy_peft_into_ours(theirs, ours, seed=5)
    return ours, theirs, names


def randlora_pair(dtype: torch.dtype, r: int = 3) -> tuple[nn.Module, nn.Module, list[str]]:
    return peft_pair("randlora", RANDLORA_SHAPES, dtype, r=r, alpha=4.0)


def peft_twins(ours: nn.Module, theirs: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(our trainable tensor, PEFT's of the same role), through the method's `peft.tensors` names."""
    layers = methods.adapter_layers(ours)
    spec = type(next(iter(layers.values()))).peft
    peft_params = dict(theirs.named_parameters())
    pairs = []
    for name, p in ours.named_parameters():
        if p.requires_grad:
            module, _, leaf = name.rpartition(".")
            head, _, rest = spec.tensors[leaf].partition(".")   # lora_A.weight -> lora_A.default.weight
            theirs_leaf = ".".join([head, "default", *([rest] if rest else [])])
            pairs.append((p, peft_params[f"base_model.model.{module}.{theirs_leaf}"]))
    return pairs


@pytest.mark.parametrize("method", METHODS)
def test_gradients_match_peft_in_float64(method):
    """Input and parameter gradients of every method equal PEFT's to float64 rounding (out > in, out < in).
    r = 4 keeps alpha / r exact: PEFT's LoHa rounds its scale to a float32 tensor
    (peft/tuners/loha/layer.py:193)."""
    ours, theirs, _ = peft_pair(method, [(24, 40), (40, 24)], torch.float64, r=4)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 9, i, generator=gen, dtype=torch.float64).requires_grad_() for i in (24, 40)]
    xt = [x.detach().clone().requires_grad_() for x in xs]
    weighted_sum(ours(xs)).backward()
    weighted_sum(theirs(xt)).backward()
    for a, b in zip(xs, xt, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10 * b.grad.abs().max().item())
    for p, q in peft_twins(ours, theirs):
        assert q.grad.abs().max() > 0
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10 * q.grad.abs().max().item())


def force_path(model: nn.Module, path: str) -> None:
    for layer in methods.adapter_layers(model).values():
        if path != "auto":
            layer.use_merged_path = lambda tokens, grad, _p=path, **route: _p.startswith("merged")
        if path in ("merged-kept", "merged-rebuilt"):
            layer.keeps_delta = lambda half=None, _p=path: _p == "merged-kept"


def weighted_sum(ys: list[torch.Tensor]) -> torch.Tensor:
    return sum((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() for y in ys)


@pytest.mark.parametrize("path", ["factored", "merged-kept", "merged-rebuilt", "auto"])
def test_randlora_gradients_match_peft_in_float64_over_accumulation_and_steps(path):
    """Input and parameter gradients equal PEFT's to float64 rounding on every path, accumulated over two
    micro-batches, across fused-AdamW steps (which do not bump parameter versions: a kept dW must still
    be rebuilt after each step)."""
    ours, theirs, _ = randlora_pair(torch.float64)
    force_path(ours, path)
    pairs = peft_twins(ours, theirs)
    opts = [torch.optim.AdamW([p for p, _ in pairs], lr=0.05, fused=True),
            torch.optim.AdamW([q for _, q in pairs], lr=0.05, fused=True)]
    gen = torch.Generator().manual_seed(0)
    for step in range(2):
        for _ in range(2):
            xs = [torch.randn(2, 9, i, generator=gen, dtype=torch.float64).requires_grad_()
                  for i, _ in RANDLORA_SHAPES]
            xt = [x.detach().clone().requires_grad_() for x in xs]
            weighted_sum(ours(xs)).backward()
            weighted_sum(theirs(xt)).backward()
            for a, b in zip(xs, xt, strict=True):
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10 * b.grad.abs().max().item())
        for p, q in pairs:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10 * q.grad.abs().max().item(),
                                       msg=f"step {step} {path}")
        for opt in opts:
            opt.step()
            opt.zero_grad()


def saved_bytes(model: nn.Module, xs: list[torch.Tensor], bf16: bool) -> int:
    """What autograd keeps for backward (unique storages, parameters and buffers excluded) plus what our
    layers keep across micro-batches -- as the bench counts it."""
    static = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in static:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ys = model(xs)
    for layer in methods.adapter_layers(model).values():
        for t in layer.delta_cache:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    weighted_sum([y.float() for y in ys]).backward()
    return sum(seen.values())


@pytest.mark.parametrize("bf16", [False, True])
def test_randlora_saved_memory_at_or_below_peft_while_keeping_dw(bf16):
    """The merged path with dW kept where the cost model allows (the square layer in fp32, every layer
    under autocast) saves no more for backward than PEFT's RandLoRA."""
    ours, theirs, _ = randlora_pair(torch.float32)
    layers = methods.adapter_layers(ours).values()
    keeps = [layer.keeps_delta(torch.bfloat16 if bf16 else None) for layer in layers]
    assert keeps == ([True] * 3 if bf16 else [True, False, False])
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 64, i, generator=gen).requires_grad_() for i, _ in RANDLORA_SHAPES]
    assert all(layer.use_merged_path(256, True) for layer in methods.adapter_layers(ours).values())
    ours_bytes, theirs_bytes = saved_bytes(ours, xs, bf16), saved_bytes(theirs, xs, bf16)
    assert any(list(layer.delta_cache) for layer in methods.adapter_layers(ours).values())
    assert ours_bytes <= theirs_bytes, (ours_bytes, theirs_bytes)
