"""FLOPs and dispatched operators per optimizer step (runners.engine.measure.StepCounts): closed forms and the
properties a GPU run depends on (no method issues operators per rank, per token or per factor)."""
import pytest
import torch
import torch.nn.functional as F
from rbtest import NATIVE_METHODS
from torch import nn

import methods
from runners.engine.measure import StepCounts


def _counted_steps(model: nn.Module, x: torch.Tensor, steps: int = 2) -> list[StepCounts]:
    """Counts of `steps` optimizer steps (sum-of-squares loss, fused AdamW as the runner trains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, fused=True) if params else None
    out = []
    for _ in range(steps):
        counts = StepCounts()
        with counts.counting():
            if opt:
                opt.zero_grad(set_to_none=True)
            model(x).square().sum().backward()
            if opt:
                opt.step()
        out.append(counts)
    return out


def _linear(kind: str, n_in: int, n_out: int, r: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n_in, n_out)).requires_grad_(kind == "full")
    if kind == "lora":
        methods.inject(model, "lora", ["0"], r=r)
    return model


@pytest.mark.parametrize(("kind", "expected"), [
    # frozen: forward x W^T and the input gradient g W, 2 FLOPs per multiply-add each
    ("frozen", lambda b, i, o, r: 4 * b * i * o),
    # full fine-tuning adds the weight gradient g^T x
    ("full", lambda b, i, o, r: 6 * b * i * o),
    # LoRA (factored: x A^T, then (x A^T) B^T): forward 2 b r (i + o); backward the gradients of both
    # thin factors and of both of their inputs, 4 b r (i + o), beside the frozen 4 b i o
    ("lora", lambda b, i, o, r: 4 * b * i * o + 6 * b * r * (i + o)),
])
def test_flops_per_step_match_the_closed_forms(kind, expected):
    b, n_in, n_out, r = 10, 64, 96, 4
    x = torch.randn(b, n_in, requires_grad=True)
    counts = _counted_steps(_linear(kind, n_in, n_out, r), x)[-1]
    assert counts.flops == expected(b, n_in, n_out, r)


def test_attention_flops_are_counted_on_the_cpu():
    """torch's registry names the CUDA attention kernels only; the CPU kernel counts the same FLOPs
    (forward: Q K^T and P V, 2 b h s s d multiply-adds)."""
    b, h, s, d = 2, 3, 16, 8
    q = torch.randn(b, h, s, d)
    counts = StepCounts()
    with counts.counting(), torch.no_grad():
        F.scaled_dot_product_attention(q, q, q)
    assert counts.flops == 2 * 2 * b * h * s * s * d


def test_counts_repeat_exactly_after_the_first_step():
    """The first step also creates AdamW's state (more operators, the same FLOPs); later steps are equal."""
    x = torch.randn(10, 64, requires_grad=True)
    first, second, third = _counted_steps(_linear("lora", 64, 96, 4), x, steps=3)
    assert first.flops == second.flops == third.flops
    assert (second.ops, second.by_op) == (third.ops, third.by_op)
    assert first.ops > second.ops


def _per_layer_ops(name: str, r: int, tokens: int, layers: int) -> tuple[int, list[bool]]:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(64, 64) for _ in range(layers))).requires_grad_(False)
    methods.inject(model, name, [str(i) for i in range(layers)], r=r)
    paths = [layer.use_merged_path(tokens, True) for layer in methods.adapter_layers(model).values()]
    return _counted_steps(model, torch.randn(tokens, 64, requires_grad=True))[-1].ops, paths


# rbtest.NATIVE_METHODS: a PEFT-backed method runs PEFT's own layers
NATIVE = NATIVE_METHODS


@pytest.mark.parametrize("name", NATIVE)
def test_operators_per_step_do_not_grow_with_rank_or_tokens(name):
    """On a GPU every operator is a launch: a method's operators per step are a fixed number per
    adapted layer, whatever its rank and the number of tokens (no loop over ranks, factors or rows)."""
    counts = {(r, t, n): _per_layer_ops(name, r, t, n) for r, t, n in
              [(2, 8, 1), (2, 8, 2), (2, 8, 3), (3, 8, 2), (2, 16, 2)]}
    assert len({tuple(set(paths)) for _, paths in counts.values()}) == 1   # one path throughout
    ops = {k: v[0] for k, v in counts.items()}
    per_layer = ops[(2, 8, 2)] - ops[(2, 8, 1)]
    assert per_layer > 0 and ops[(2, 8, 3)] - ops[(2, 8, 2)] == per_layer
    assert ops[(3, 8, 2)] == ops[(2, 16, 2)] == ops[(2, 8, 2)]


def test_lora_issues_the_fewest_operators_per_layer():
    """LoRA's two thin matmuls are the least any adapter does; every other method's factored form builds
    on more tensors, so it may issue more operators per layer, never fewer."""
    per_layer = {n: _per_layer_ops(n, 2, 8, 2)[0] - _per_layer_ops(n, 2, 8, 1)[0]
                 for n in NATIVE}
    assert min(per_layer, key=per_layer.get) == "lora", per_layer
