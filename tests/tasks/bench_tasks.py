"""Measure the tiny tasks: before/after accuracy and wall time of a short adaptation run.

    python tests/tasks/bench_tasks.py --task clip --mode lora --steps 150

Independent of `methods/` and `runners/train.py` on purpose (a plain LoRA written here), so the task
suite can be checked on its own. Modes: lora (adapters on target modules + head), head (head only;
zero-shot for clip), full (every weight).
"""
from __future__ import annotations

import argparse
import logging
import math
import re
import time

import torch
from hydra import compose, initialize_config_dir
from torch import nn

import tasks

CONF = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger("bench")


class LoRALinear(nn.Module):
    """W x + (alpha/r) B A x with A kaiming, B = 0 (the reference LoRA)."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scale


def inject_lora(model: nn.Module, targets: list[str], r: int) -> int:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    for n in names:
        parent, child = model.get_submodule(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]
        setattr(parent, child, LoRALinear(getattr(parent, child), r=r, alpha=2 * r))
    return len(names)


def set_trainable(model: nn.Module, mode: str, heads: list[str]) -> int:
    for n, p in model.named_parameters():
        is_head = any(n.startswith(h) for h in heads)
        p.requires_grad = (mode == "full" or is_head
                           or (mode == "lora" and re.search(r"\.(A|B)$", n) is not None))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run(task_name: str, mode: str, steps: int, batch_size: int | None, lr: float | None, r: int,
        seed: int = 0, overrides: list[str] | None = None) -> dict:
    """Build the task from the composed config, adapt for `steps`, return before/after accuracy + times."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[f"task={task_name}", f"seed={seed}", *(overrides or [])])
    t0 = time.time()
    torch.manual_seed(seed)
    task = tasks.build(cfg.task)
    model = task.build_model()
    if mode == "lora":
        inject_lora(model, list(task.target_modules), r)
    n_train = set_trainable(model, mode, task.head_prefixes)
    before = task.evaluate(model)
    bs = batch_size or cfg.trainer.batch_size
    lr = lr or (1e-4 if mode == "full" else cfg.trainer.lr)
    t1 = time.time()
    params = [p for p in model.parameters() if p.requires_grad]
    if params:
        train_loop(task, model, params, steps, bs, lr, seed)
    t2 = time.time()
    after = task.evaluate(model)
    return {"before": before, "after": after, "trainable": n_train, "train_s": t2 - t1,
            "total_s": time.time() - t0}


def train_loop(task: tasks.Task, model: nn.Module, params: list, steps: int, bs: int, lr: float,
               seed: int) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    warm = 10
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    batches = task.train_batches(bs, torch.Generator().manual_seed(seed))
    for step in range(steps):
        loss = task.loss(model, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0:
            log.info("step %d loss %.4f", step, loss.item())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="clip")
    ap.add_argument("--mode", default="lora", choices=["lora", "head", "full"])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    res = run(a.task, a.mode, a.steps, a.batch_size, a.lr, a.r, overrides=a.overrides)
    log.info("trainable %d  train %.1f s  total %.1f s", res["trainable"], res["train_s"], res["total_s"])
    for k in res["before"]:
        log.info("%-10s before %.3f  after %.3f", k, res["before"][k], res["after"][k])
    mb, ma = (sum(res[x].values()) / len(res[x]) for x in ("before", "after"))
    log.info("%-10s before %.3f  after %.3f", "MEAN", mb, ma)


if __name__ == "__main__":
    main()
