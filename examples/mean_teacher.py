"""Mean teacher with `sema_hf.SEMA`: the student learns from the outputs of its own average.

The teacher is no second model: it is the student's exponential moving average, which `SEMA` keeps anyway (fp32,
sharded like the optimizer under ZeRO-3 and FSDP). At every step the teacher's outputs come from a forward pass with
the average swapped in::

    with torch.no_grad(), sema.swapped_in():        # every rank, every step (a collective under ZeRO-3 / FSDP)
        teacher_logits = model(input_ids=batch).logits
    out = model(input_ids=batch, labels=batch)
    loss = out.loss + weight * consistency(out.logits, teacher_logits)
    accelerator.backward(loss); optimizer.step(); optimizer.zero_grad()
    sema.step()                                     # the teacher follows: ema <- m ema + (1 - m) theta

Inside the block the model's forward reads the average; afterwards the raw weights are back bit for bit, and the
optimizer's fp32 master weights are never touched, so the backward pass and the step are the student's. With a LoRA
adapter only the adapter is averaged, so the swap copies a few MB (the adapter's shard on this rank), and the
teacher costs no memory beyond the average itself: no second copy of the base model (bench/teacher_cost.py measures
both ways). Mean teacher (Tarvainen & Valpola, 2017) keeps the teacher as an average and never copies it back:
hence ``switch=False`` here; with the default switch the student would also restart from its teacher at every
epoch end (Switch EMA).

To use the teacher elsewhere (a frozen copy for distillation, an exported model), take the gathered average as a
whole-model state dict: ``plain_copy.load_state_dict(sema.ema_state_dict(whole_model=True))`` (strict; tied
weights, buffers and a LoRA model's frozen base included; every rank must call it under sharded engines).

Run (offline; a tiny GPT-2 with a LoRA adapter on a synthetic pattern)::

    python examples/mean_teacher.py                                    # one process
    torchrun --nproc_per_node 2 examples/mean_teacher.py --zero3       # 2 ranks, DeepSpeed ZeRO-3 (CPU or GPU)
    torchrun --nproc_per_node 2 examples/mean_teacher.py               # 2 ranks, DDP
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import PartialState
from transformers import GPT2Config, GPT2LMHeadModel

from sema_hf import SEMA

VOCAB, SEQ = 31, 16


def build_model(seed: int = 0, lora: bool = True) -> torch.nn.Module:
    """A tiny GPT-2 (2 blocks, width 33, no dropout) with, by default, a LoRA adapter (r 4) on the attention."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=33, n_layer=2, n_head=3)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    model = GPT2LMHeadModel(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed + 1)
        model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
        )
    return model


def batches(rank: int, world: int, steps: int, per_rank: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Step k's batch of this rank: sequences ``(a + b*i) mod VOCAB`` (a learnable pattern), split between ranks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        a = torch.randint(0, VOCAB, (per_rank * world, 1), generator=g)
        b = torch.randint(1, 4, (per_rank * world, 1), generator=g)
        seqs = (a + b * torch.arange(SEQ)) % VOCAB
        out.append(seqs[per_rank * rank : per_rank * (rank + 1)])
    return out


def make_accelerator(zero3: bool) -> Accelerator:
    if not zero3:
        return Accelerator(cpu=not torch.cuda.is_available())
    from accelerate.utils import DeepSpeedPlugin

    if not torch.cuda.is_available():
        # On CPU, as the Trainer does with use_cpu=True: a CPU process state first, then DeepSpeed by the
        # environment (Accelerator(cpu=True) would drop the DeepSpeed plugin). Needs DS_ACCELERATOR=cpu.
        PartialState(cpu=True)
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    zero3_config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=zero3_config))


def consistency(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the two predictive distributions (the mean-teacher consistency cost)."""
    return F.mse_loss(student_logits.softmax(-1), teacher_logits.softmax(-1))


def train(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sema: SEMA,
    data: list[torch.Tensor],
    weight: float = 1.0,
    on_teacher: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> list[tuple[float, float]]:
    """The mean-teacher loop; returns the student's LM loss and the consistency cost of every step.
    ``on_teacher(step, batch, teacher_logits)`` is called right after the teacher's forward (a test hook)."""
    costs = []
    for step, batch in enumerate(data):
        batch = batch.to(accelerator.device)
        with torch.no_grad(), sema.swapped_in():
            teacher_logits = model(input_ids=batch).logits
        if on_teacher is not None:
            on_teacher(step, batch, teacher_logits)
        out = model(input_ids=batch, labels=batch)
        cost = consistency(out.logits, teacher_logits)
        accelerator.backward(out.loss + weight * cost)
        optimizer.step()
        optimizer.zero_grad()
        sema.step()
        costs.append((out.loss.item(), cost.item()))
    return costs


def setup(zero3: bool, lora: bool = True, decay: float = 0.9):
    """-> accelerator, model, optimizer, sema: the student and its average, prepared for the run's engine."""
    accelerator = make_accelerator(zero3)
    model = build_model(lora=lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    sema = SEMA(model, optimizer, accelerator, decay=decay, warmup="none", switch=False, name="teacher")
    return accelerator, model, optimizer, sema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zero3", action="store_true", help="DeepSpeed ZeRO-3 (launch with torchrun)")
    parser.add_argument("--full", action="store_true", help="train the whole model instead of a LoRA adapter")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--decay", type=float, default=0.9, help="the teacher's decay m (horizon 1/(1-m) steps)")
    args = parser.parse_args()
    accelerator, model, optimizer, sema = setup(args.zero3, lora=not args.full, decay=args.decay)
    data = batches(accelerator.process_index, accelerator.num_processes, args.steps)
    costs = train(accelerator, model, optimizer, sema, data)
    if accelerator.is_main_process:
        (loss0, cost0), (loss1, cost1) = costs[0], costs[-1]
        print(f"engine {sema.engine.name}, {sema.local_numel} averaged elements on this rank: LM loss {loss0:.4f} -> "
              f"{loss1:.4f}, consistency cost {cost0:.3e} -> {cost1:.3e} over {len(costs)} steps")  # fmt: skip


if __name__ == "__main__":
    main()
