"""rankbench against the official RandLoRA code itself: its conventions (init=official, alpha 1) match its
layers, its CLIP code trains no attention adapter, and `task.attention_adapters=counted_untrained` reproduces
that.

Upstream (github.com/PaulAlbert31/RandLoRA@4ac565e, vision_language/src/rand_lora.py): the MultiheadAttention
subclass's forward adds dW to `in_proj_weight` by assigning `.data` (:582) and assigns it back after the call
(:584). A `.data` assignment carries no autograd graph, so the attention adapters' parameters never get a
gradient; only the nn.Linear (MLP) adapters train. The tests calling `official_module` run the official file:
they need a copy of the repository, named by RANDLORA_REPO (a checkout, or a git directory such as the one
`fetch` writes), and is skipped without one. Nothing of the official code is stored in this project.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

import methods

OFFICIAL_FILE = "vision_language/src/rand_lora.py"


def official_module(tmp_path: Path) -> ModuleType:
    """The official rand_lora.py, from RANDLORA_REPO (a checkout or a git directory); skip without it."""
    named = os.environ.get("RANDLORA_REPO")
    repo = Path(named or "/nonexistent").expanduser()
    if not named or not repo.exists():
        pytest.skip("set RANDLORA_REPO to a copy of github.com/PaulAlbert31/RandLoRA to run the official "
                    "code")
    source = repo / OFFICIAL_FILE
    if not source.exists():
        shown = subprocess.run(["git", f"--git-dir={repo}", "show", f"HEAD:{OFFICIAL_FILE}"],
                               capture_output=True, text=True, check=False)
        if shown.returncode != 0:
            pytest.skip(f"{OFFICIAL_FILE} is neither in {repo} nor in its git history")
        source = tmp_path / "rand_lora.py"
        source.write_text(shown.stdout)
    spec = importlib.util.spec_from_file_location("official_rand_lora", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("param_type, n", [("lora", 1), ("randlora", 1000)])  # finetune.py:221-226 num_basis
def test_official_attention_adapters_get_no_gradient(param_type, n, tmp_path):
    """One attention + MLP step through the official classes, as clip_encoder.py:46-66 builds them: every
    attention adapter tensor has grad None, the MLP adapters have gradients (one factor's is zero at init)."""
    rl = official_module(tmp_path)
    torch.manual_seed(0)
    d, r = 16, 4
    basis = tuple(nn.Parameter(b, requires_grad=False)
                  for b in rl.gen_mats(0, n, 4 * d, 4 * d, r, shared=param_type == "randlora"))
    attn = rl.MultiheadAttention(d, 2, basis=basis, param_type=param_type, seed=0,
                                 enable_lora=["q", "k", "v"])
    mlp = rl.Linear(d, 4 * d, basis=basis, param_type=param_type, seed=0)
    for module in (attn, mlp):
        rl.mark_only_mat_as_trainable(module)
        module.train()
    x = torch.randn(5, 3, d)
    mlp(attn(x, x, x, need_weights=False)[0]).square().sum().backward()
    attn_grads = {n: p.grad for n, p in attn.named_parameters() if "loramat" in n}
    mlp_grads = {n: p.grad for n, p in mlp.named_parameters() if "loramat" in n}
    assert attn_grads and all(p.requires_grad for n, p in attn.named_parameters() if "loramat" in n)
    assert all(g is None for g in attn_grads.values()), attn_grads
    assert all(g is not None for g in mlp_grads.values())
    assert sum(float(g.abs().sum()) for g in mlp_grads.values()) > 0


def test_untrained_adapters_are_counted_but_never_move():
    """methods.leave_untrained: same trainable count, outputs still W + dW, inputs still get gradients, the
    selected adapters' parameters get none and an AdamW step with weight decay leaves them as they were."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    methods.inject(model, "lora", ["0", "2"], r=2)
    count = methods.count_trainable(model)
    with torch.no_grad():
        model[0].lora_B.fill_(0.1)              # a nonzero dW, so "applied" is visible
    expected = model(torch.ones(2, 8))
    assert methods.leave_untrained(model, ["0"]) == ["0"]
    assert methods.count_trainable(model) == count
    x = torch.ones(2, 8, requires_grad=True)
    out = model(x)
    torch.testing.assert_close(out, expected)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    out.square().sum().backward()
    assert x.grad is not None and model[0].lora_A.grad is None and model[2].lora_B.grad is not None
    opt.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in before.items() if n.startswith("0."))
    assert not torch.equal(after["2.lora_B"], before["2.lora_B"])
    with pytest.raises(ValueError, match="match no adapter layer"):
        methods.leave_untrained(model, ["nosuch"])


def test_official_conventions_init_and_scaling():
    """init=official and sqrt_n as the official code has them: LoRA A = 0, B ~ U(+-1/sqrt(r out));
    RandLoRA lambda = 1/max(n, r), gamma = 0; sqrt_n divides alpha/r by sqrt(n). dW = 0 at the start."""
    torch.manual_seed(0)
    lora = methods.wrap_linear("lora", nn.Linear(64, 96), r=4, alpha=1, init="official")
    bound = (4 * 96) ** -0.5
    assert not lora.lora_A.any() and 0.8 * bound < lora.lora_B.abs().max() <= bound and lora.scaling == 0.25
    rand = methods.wrap_linear("randlora", nn.Linear(64, 96), r=6, alpha=1, init="official", sqrt_n=True)
    n = -(-64 // 6)                                   # 11 bases on the 64-wide side
    assert torch.all(rand.randlora_lambda == 1 / max(n, 6)) and not rand.randlora_gamma.any()
    assert rand.scaling == pytest.approx(1 / 6 / n ** 0.5)
    for layer in (lora, rand):
        assert not layer.delta_weight().any()
    with pytest.raises(ValueError, match="init must be one of peft, official"):
        methods.wrap_linear("lora", nn.Linear(8, 8), r=2, init="paper")
    with pytest.raises(ValueError, match=r"no PEFT 0\.21 counterpart"):
        rand.peft.to_peft(rand.hp)


def test_official_attention_restore_keeps_the_adapted_weight(tmp_path):
    """The assignment meant to restore W (rand_lora.py:584, `.data = p` with p the parameter itself) is a
    no-op: with a nonzero dW the attention weight keeps W + dW and gains dW again at every call. Training
    never sees it (the attention dW starts at 0 and gets no gradient), an adapter with a nonzero start
    would."""
    rl = official_module(tmp_path)
    torch.manual_seed(0)
    d = 16
    attn = rl.MultiheadAttention(d, 2, basis=rl.gen_mats(0, 1, 4 * d, 4 * d, 4), param_type="lora", seed=0,
                                 enable_lora=["q", "k", "v"])
    attn.train()
    with torch.no_grad():
        attn.in_proj_w_loramat_B.fill_(0.1)
    delta = (attn.in_proj_w_loramat_B[0] @ attn.in_proj_w_loramat_A[0] * attn.scaling).detach()
    w0 = attn.in_proj_weight.detach().clone()
    x = torch.randn(5, 3, d)
    for calls in (1, 2):
        attn(x, x, x)
        torch.testing.assert_close(attn.in_proj_weight.detach(), w0 + calls * delta)


def test_official_conventions_match_the_official_layers(tmp_path):
    """init=official and alpha=1 against the official nn.Linear adapters built as clip_encoder.py:60 builds
    them (no lora_alpha): same scaling, same zero factor, same kaiming bound, same lambda value (a shape where
    the official d//r + 1 bases equal ceil(d/r))."""
    rl = official_module(tmp_path)
    torch.manual_seed(0)
    d_in, d_out, r = 64, 96, 6
    theirs = rl.Linear(d_in, d_out, basis=rl.gen_mats(0, 1000, 4 * d_out, 4 * d_out, r, shared=True),
                       param_type="randlora", seed=0)
    ours = methods.wrap_linear("randlora", nn.Linear(d_in, d_out), r=r, alpha=1, init="official")
    assert theirs.n == ours.n_bases and theirs.scaling == ours.scaling
    assert torch.equal(theirs.w_loramat_B.T, ours.randlora_lambda.detach())      # (n, r) vs our (r, n)
    assert not theirs.w_loramat_A.any() and not ours.randlora_gamma.any()
    theirs = rl.Linear(d_in, d_out, basis=rl.gen_mats(0, 1, 4 * d_out, 4 * d_out, r), param_type="lora",
                       seed=0)
    ours = methods.wrap_linear("lora", nn.Linear(d_in, d_out), r=r, alpha=1, init="official")
    assert theirs.scaling == ours.scaling
    # official forward x @ B_(in x r) @ A_(r x out): B_ = 0 is our A (input side), A_ is our B^T (output side)
    assert not theirs.w_loramat_B.any() and not ours.lora_A.any()
    bound = (r * d_out) ** -0.5
    for kaiming in (theirs.w_loramat_A, ours.lora_B):
        assert 0.8 * bound < float(kaiming.abs().max()) <= bound
