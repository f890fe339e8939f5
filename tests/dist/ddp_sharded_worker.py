"""2-rank worker: DDP with ``SEMACallback(shard_under_ddp=True)``, plus checkpoint re-sharding with real engines.

Usage: ``ddp_sharded_worker.py OUT_DIR SINGLE_CHECKPOINT``. ``SINGLE_CHECKPOINT`` is a ``checkpoint-6`` folder
written by a one-process run of the same training (the test's reference run).

Writes into ``OUT_DIR``, per rank, ``result_rank{r}.json``:

* ``run``: a 2-rank DDP Trainer run of the tiny GPT-2 (global batch 8, 12 steps, switch at each epoch end, EMA
  evaluation every 3 steps, a checkpoint at step 6): the collectives counted inside every ``update``, ``switch``,
  swap-in and swap-out; after each switch, the largest difference between the two ranks' parameters and between
  the parameters and the gathered EMA; at each evaluation, the parameters inside the swap against the gathered
  EMA and the raw parameters after it against those before it; the EMA recomputed from the recorded weights.
* ``resume``: a second run resumed from the run's step-6 checkpoint: its final EMA and weights against the run's.
* ``from_single``: this rank's averages loaded (re-sharded) from ``SINGLE_CHECKPOINT`` against the slices of its
  full average; ``from_fsdp2`` / ``to_fsdp2``: an FSDP2 checkpoint loaded onto the DDP-sharded layout and back.
* ``mixed``: a model with bf16 and fp32 parameters under plain DDP: the sharded store against a full-copy store.

and (rank 0) ``ema.safetensors`` (the run's final gathered EMA), ``run/ema_step6.safetensors``.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]

from sharded_setup import SEMA_KWARGS, eval_dataset, pattern_dataset, reference_ema, tiny_gpt2, training_args  # noqa: E402
from sharded_worker import CollectiveCounter, max_diff  # noqa: E402

from sema_hf import SEMACallback  # noqa: E402
from sema_hf.checkpoint import load_ema_checkpoint, save_ema_checkpoint  # noqa: E402
from sema_hf.engines import LocalAdapter, detect_engine  # noqa: E402
from sema_hf.store import EMAStore  # noqa: E402


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def rank_spread(model) -> float:
    """Largest difference between the ranks' copies of the parameters (0.0: identical replicas)."""
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, flat)
    return max((c - copies[0]).abs().max().item() for c in copies)


class Trajectory(TrainerCallback):
    """Placed before SEMACallback: the (replicated) weights at train begin and after every optimizer step."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights.append(params_of(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append(params_of(model))

    def ema(self) -> dict[str, torch.Tensor]:
        return reference_ema(self.weights, SEMA_KWARGS["decay"])


class Recorder(TrainerCallback):
    """Placed after SEMACallback: counts collectives in update, switch, swap-in and swap-out; checks the weights."""

    def __init__(self, sema: SEMACallback, out: dict) -> None:
        self.sema, self.out = sema, out
        out.update(update_collectives=[], switch_collectives=[], switch_checks=[], eval_checks=[])

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        store, sema, out = self.sema.store, self.sema, self.out
        self.state = state
        update, switch, swapped_in = store.update, store.switch, store.swapped_in

        def counted_update(decay: float) -> None:
            with CollectiveCounter() as counter:
                update(decay)
            out["update_collectives"].append(counter.calls)

        def counted_switch() -> None:
            with CollectiveCounter() as counter:
                switch()
            out["switch_collectives"].append(counter.calls)

        @contextmanager
        def counted_swap(averages=None):
            raw = params_of(model)
            swap = swapped_in(averages)
            with CollectiveCounter() as entering:
                swap.__enter__()
            inside = max_diff(params_of(model), sema.ema_state_dict())
            try:
                yield
            finally:
                with CollectiveCounter() as leaving:
                    swap.__exit__(None, None, None)
                out["eval_checks"].append(
                    {
                        "step": self.state.global_step,
                        "swap_in": entering.calls,
                        "swap_out": leaving.calls,
                        "inside_vs_ema": inside,
                        "raw_restored": all(torch.equal(p, raw[n]) for n, p in model.named_parameters()),
                    }
                )

        store.update, store.switch, store.swapped_in = counted_update, counted_switch, counted_swap  # test only
        out["local_numel"] = sema.local_numel
        out["engine"] = sema.engine.name
        out["pieces"] = sema.engine.layout().extra["pieces"]

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if not self.sema.num_switches or state.global_step % 4:
            return
        self.out["switch_checks"].append(
            {
                "step": state.global_step,
                "rank_spread": rank_spread(model),
                "params_vs_ema": max_diff(params_of(model), self.sema.ema_state_dict()),
            }
        )

    def on_save(self, args, state, control, **kwargs):
        ema = self.sema.ema_state_dict()
        if dist.get_rank() == 0:
            save_file(ema, os.path.join(args.output_dir, f"ema_step{state.global_step}.safetensors"))


def train(output_dir: str, out: dict, resume_from: str | None = None, **overrides):
    sema = SEMACallback(**SEMA_KWARGS, shard_under_ddp=True)
    trajectory = Trajectory()
    trainer = Trainer(
        model=tiny_gpt2(),
        args=training_args(output_dir, int(os.environ["WORLD_SIZE"]), **overrides),
        train_dataset=pattern_dataset(),
        eval_dataset=eval_dataset(),
        callbacks=[trajectory, sema, Recorder(sema, out)],
    )
    trainer.train(resume_from_checkpoint=resume_from)
    assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
    return trainer, sema, trajectory


def trainer_runs(out_dir: str, out: dict) -> None:
    run: dict = {}
    trainer, sema, trajectory = train(os.path.join(out_dir, "run"), run, save_strategy="steps", save_steps=6)
    ema = sema.ema_state_dict()
    weights = params_of(trainer.model)
    run["final_params_vs_ema"] = max_diff(weights, ema)  # final_weights="ema"
    run["final_rank_spread"] = rank_spread(trainer.model)
    run["trajectory_vs_ema"] = max_diff(trajectory.ema(), ema)
    run["num_updates"], run["num_switches"] = sema.num_updates, sema.num_switches
    run["log_history"] = trainer.state.log_history
    out["run"] = run
    if dist.get_rank() == 0:
        save_file(ema, os.path.join(out_dir, "ema.safetensors"))

    resumed: dict = {}
    checkpoint = os.path.join(out_dir, "run", "checkpoint-6")
    trainer2, sema2, _ = train(os.path.join(out_dir, "resumed"), resumed, resume_from=checkpoint)
    resumed["ema_diff"] = max_diff(sema2.ema_state_dict(), ema)
    resumed["weights_diff"] = max_diff(params_of(trainer2.model), weights)
    out["resume"] = resumed


def resharding(out_dir: str, single_checkpoint: str, out: dict) -> None:
    from torch.distributed.fsdp import fully_shard

    # one process -> DDP-sharded: this rank's ranges out of the single file
    adapter = detect_engine(tiny_gpt2(), shard_under_ddp=True)
    tensors, meta = load_ema_checkpoint(single_checkpoint, adapter.layout())
    full = load_file(os.path.join(single_checkpoint, "sema_ema-00001-of-00001.safetensors"))
    out["from_single"] = {
        "engine": adapter.name,
        "global_step": meta["global_step"],
        "names": sorted(tensors) == sorted(n for n, _, _ in adapter.layout().extra["pieces"]),
        "equal": all(
            torch.equal(tensors[n], full[n].reshape(-1)[a:b]) for n, a, b in adapter.layout().extra["pieces"]
        ),
    }

    # FSDP2 -> DDP-sharded: a real fully_shard model saves its shards (its weights + 1, so nothing is the init)
    fsdp_model = tiny_gpt2(seed=3)
    for block in fsdp_model.transformer.h:
        fully_shard(block)
    fully_shard(fsdp_model)
    fsdp = detect_engine(fsdp_model, torch.optim.SGD(fsdp_model.parameters(), lr=0.1))
    fsdp_store = EMAStore(fsdp.slots(), after_write=fsdp.after_write)
    for average in fsdp_store.state_dict().values():
        average.add_(1.0)
    folder = os.path.join(out_dir, "fsdp2_ckpt")
    save_ema_checkpoint(folder, fsdp_store.state_dict(), fsdp.layout(), {"global_step": 1})
    plain = tiny_gpt2(seed=3)
    ddp = detect_engine(plain, shard_under_ddp=True)
    loaded, _ = load_ema_checkpoint(folder, ddp.layout())
    expected = {n: p.detach() + 1.0 for n, p in plain.named_parameters()}
    from_fsdp2 = all(torch.equal(loaded[n], expected[n].reshape(-1)[a:b]) for n, a, b in ddp.layout().extra["pieces"])

    # DDP-sharded -> FSDP2: the DDP-sharded ranges (weights + 2) land in FSDP2's row blocks
    ddp_store = EMAStore(ddp.slots(), after_write=ddp.after_write, backup_forward=ddp.backup_forward)
    for average in ddp_store.state_dict().values():
        average.add_(2.0)
    folder = os.path.join(out_dir, "ddp_sharded_ckpt")
    save_ema_checkpoint(folder, ddp_store.state_dict(), ddp.layout(), {"global_step": 2})
    loaded, _ = load_ema_checkpoint(folder, fsdp.layout())
    plus_two = {n: p.detach() + 2.0 for n, p in plain.named_parameters()}
    to_fsdp2 = all(  # FSDP2's averages have the shape of its local row blocks
        torch.equal(loaded[n].reshape(-1), plus_two[n].reshape(-1)[a:b]) for n, a, b in fsdp.layout().extra["pieces"]
    )
    out["fsdp2"] = {"from": from_fsdp2, "to": to_fsdp2, "fsdp_pieces": fsdp.layout().extra["pieces"]}
    out["ddp_sharded_files"] = sorted(f for f in os.listdir(folder) if f.startswith("sema_ema-"))


def mixed_dtypes(out: dict) -> None:
    """bf16 and fp32 parameters under plain DDP: the shared average against every rank's full-copy average."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5).to(torch.bfloat16), torch.nn.Linear(5, 3))
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    sharded = detect_engine(wrapped, shard_under_ddp=True)
    local = LocalAdapter(wrapped)
    shared = EMAStore(sharded.slots(), after_write=sharded.after_write, backup_forward=sharded.backup_forward)
    full = EMAStore(local.slots())
    g = torch.Generator().manual_seed(1)  # same on both ranks: the parameters stay replicas
    calls: list[list[str]] = []
    with torch.no_grad():
        for _ in range(3):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
            with CollectiveCounter() as counter:
                shared.update(0.7)
            calls.append(counter.calls)
            full.update(0.7)
    gathered = sharded.full_state_dict(shared.state_dict())
    reference = local.full_state_dict(full.state_dict())
    raw = params_of(model)
    swap = shared.swapped_in()
    with CollectiveCounter() as entering:
        swap.__enter__()
    inside = all(torch.equal(p, reference[n].to(p.dtype)) for n, p in model.named_parameters())
    with CollectiveCounter() as leaving:
        swap.__exit__(None, None, None)
    restored = all(torch.equal(p, raw[n]) for n, p in model.named_parameters())
    with CollectiveCounter() as counter:
        shared.switch()
    out["mixed"] = {
        "local_numel": shared.local_numel,
        "total": sum(p.numel() for p in model.parameters()),
        "update_collectives": calls,
        "switch_collectives": counter.calls,
        "gathered_vs_full": max_diff(gathered, reference),
        "params_cast_exact": all(torch.equal(p, reference[n].to(p.dtype)) for n, p in model.named_parameters()),
        "rank_spread": rank_spread(model),
        "swap_collectives": [entering.calls, leaving.calls],
        "swap_inside_exact": inside,
        "swap_raw_restored": restored,
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
    }


def main(out_dir: str, single_checkpoint: str) -> None:
    out: dict = {}
    trainer_runs(out_dir, out)
    resharding(out_dir, single_checkpoint, out)
    mixed_dtypes(out)
    with open(os.path.join(out_dir, f"result_rank{dist.get_rank()}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    if torch.distributed.is_initialized():  # end gloo's threads here, not in the interpreter's exit (it aborts)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
