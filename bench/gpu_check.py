"""The GPU check of sema_hf: what the CPU machines of this project cannot measure or exercise. Run it with
``bash bench/gpu_check.sh`` on a CUDA machine (about 8 minutes at most; it skips what does not fit in ``--budget-s``).

Parts, each recorded in the JSON (``bench/results/gpu_check.json`` by default) with ``"ok"`` and its numbers:

1. ``update_switch``: `bench/ema_update.py`'s update/switch benchmark on the GPU (GPT-2 small and ViT-Base, fp32 and
   bf16 weights with an fp32 average), every call timed with CUDA events (no host timer, no per-call sync), against
   the flat-lerp / flat-copy bound and the installed peers (timm, diffusers, ema-pytorch, torch-ema, swa_utils).
2. ``no_host_sync``: `EMAStore.update` and `EMAStore.switch` on GPT-2 small in fp32 and bf16 run under
   ``torch.cuda.set_sync_debug_mode("error")``: any host synchronisation on that path raises.
3. ``trainer_bf16``: a short `Trainer` job with ``bf16=True`` and `SEMACallback` (tiny GPT-2): the loss falls, the
   average stays fp32, the model ends on the average.
4. ``engines``: world size 1, each in its own ``torchrun`` process: a plain run, DeepSpeed ZeRO-3 with
   ``stage3_param_persistence_threshold: "auto"`` (small parameters stay gathered) and FSDP2 with activation
   checkpointing, each with SEMA and checked against the plain run (losses and the gathered average); plus
   ``shard_under_ddp``'s adapter over NCCL (one rank): update without host sync, switch and swap against a full copy.

5. ``loop``: the hand-written ``accelerate`` loop with `sema_hf.SEMA` once on the GPU: ``mixed_precision="bf16"``,
   gradient accumulation 2, a switch at every epoch end, an evaluation inside ``sema.swapped_in()`` (the raw weights
   come back bit for bit), ``sema.step()`` run under the sync check, and ``accelerator.save_state`` at step 6 loaded
   into a fresh Accelerator whose run ends on the same weights and average as the uninterrupted one.

``--dry-run`` runs parts 2-5 on the CPU with tiny sizes (no sync check, host timers; FSDP through the tests'
CPU shim), to check the script itself on a machine without a GPU. It proves nothing about GPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

DECAY = 0.9
STEPS = 12


# ---- shared pieces -------------------------------------------------------------------------------------------------
def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=97, n_positions=32, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(config)


def pattern_dataset(n: int, seed: int):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 97, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + step * torch.arange(32)) % 97
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def training_args(output_dir: str, dry_run: bool, **overrides):
    from transformers import TrainingArguments

    values = dict(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        num_train_epochs=3,  # 32 sequences: 4 steps per epoch, 12 steps
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        use_cpu=dry_run,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def losses(history: list[dict], key: str) -> list[float]:
    return [h[key] for h in history if key in h]


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| / (|b| + 1e-3) over the names of ``b``."""
    worst = 0.0
    for name, value in b.items():
        x, y = a[name].float().cpu(), value.float().cpu()
        worst = max(worst, ((x - y).abs() / (y.abs() + 1e-3)).max().item())
    return worst


@contextlib.contextmanager
def sync_errors(enabled: bool):
    """Inside: any CUDA host synchronisation raises (``torch.cuda.set_sync_debug_mode("error")``)."""
    if not enabled:
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# ---- part 1: update/switch benchmark with CUDA-event timing -----------------------------------------------------------
def cuda_event_rounds(
    candidates: dict[str, Callable[[], None]], rounds: int, target_s: float, device: torch.device
) -> dict[str, list[list[float]]]:
    """`ema_update.run_rounds` with each call timed by a pair of CUDA events (GPU time; one sync per round)."""
    names = list(candidates)
    reps: dict[str, int] = {}
    for name in names:  # warm up, then size the calls per round from one timed call
        candidates[name]()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        candidates[name]()
        end.record()
        end.synchronize()
        reps[name] = max(5, min(200, round(target_s * 1e3 / max(start.elapsed_time(end), 1e-3))))
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps[name])
            ]
            for start, end in events:
                start.record()
                candidates[name]()
                end.record()
            torch.cuda.synchronize()
            times[name].append([start.elapsed_time(end) for start, end in events])
    return times


def part_update_switch(args: argparse.Namespace) -> dict:
    import ema_update

    ema_update.run_rounds = cuda_event_rounds  # same signature: the benchmark's rounds, timed on the GPU
    bench_args = argparse.Namespace(device="cuda", rounds=7, target_s=0.05, no_profile=False)
    rows = []
    for name in ("gpt2-small", "vit-base"):
        rows += ema_update.bench_model(name, ema_update.MODELS[name], ["fp32", "bf16"], bench_args)
        torch.cuda.empty_cache()
    measured = [
        {
            "model": r.model,
            "dtype": r.dtype,
            "op": r.op,
            "impl": r.impl,
            "median_ms": round(r.median_ms, 4),
            "ratio_to_bound": round(r.ratio, 4),
            "gb_per_s": round(r.gb_per_s, 1),
            "alloc_bytes": r.alloc_bytes,
            "host_syncs": r.host_syncs,
        }
        for r in rows
        if not r.skipped
    ]
    ours = [m for m in measured if m["impl"] == "sema_hf"]
    return {"ok": all(m["host_syncs"] == 0 for m in ours), "rows": measured, "skipped": [
        {"model": r.model, "dtype": r.dtype, "op": r.op, "impl": r.impl, "why": r.skipped} for r in rows if r.skipped
    ]}  # fmt: skip


# ---- part 2: no host sync on the update path ----------------------------------------------------------------------------
def part_no_host_sync(args: argparse.Namespace) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from sema_hf.engines.local import LocalAdapter
    from sema_hf.store import EMAStore

    cuda = not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    config = GPT2Config() if cuda else GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=64)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = GPT2LMHeadModel(config).to(device=device, dtype=dtype)
        store = EMAStore(LocalAdapter(model).slots())
        error = None
        try:
            with sync_errors(cuda):
                for _ in range(3):
                    store.update(0.999)
                store.switch()
            if cuda:
                torch.cuda.synchronize()
        except RuntimeError as e:  # what set_sync_debug_mode("error") raises
            error = str(e).splitlines()[0]
        out[str(dtype).replace("torch.", "")] = {"error": error, "numel": store.local_numel}
        del model, store
    return {"ok": all(v["error"] is None for v in out.values()), "sync_check_enabled": cuda, **out}


# ---- part 3: a short bf16 Trainer job ----------------------------------------------------------------------------------
def part_trainer_bf16(args: argparse.Namespace, workdir: Path) -> dict:
    from transformers import Trainer

    from sema_hf import SEMACallback

    sema = SEMACallback(decay=DECAY, warmup="none")
    model = tiny_gpt2()
    trainer = Trainer(
        model=model,
        args=training_args(str(workdir / "trainer_bf16"), args.dry_run, bf16=True),
        train_dataset=pattern_dataset(32, 1),
        eval_dataset=pattern_dataset(8, 2),
        callbacks=[sema],
    )
    trainer.train()
    ema = sema.ema_state_dict()
    train_losses = losses(trainer.state.log_history, "loss")
    final_vs_ema = max((p.detach().float().cpu() - ema[n]).abs().max().item() for n, p in model.named_parameters())
    epochs = [sum(train_losses[i : i + 4]) / 4 for i in (0, 4, 8)]
    checks = {
        "losses_fall": epochs[0] > epochs[2],
        "finite": all(math.isfinite(x) for x in train_losses),
        "ema_fp32": all(t.dtype == torch.float32 for t in ema.values()),
        "updates": sema.num_updates == STEPS,
        "model_ends_on_ema": final_vs_ema == 0.0,
    }
    return {
        "ok": all(checks.values()),
        **checks,
        "epoch_losses": epochs,
        "eval_losses": losses(trainer.state.log_history, "eval_loss"),
        "local_numel": sema.local_numel,
    }


# ---- part 5: the hand-written accelerate loop with sema_hf.SEMA ------------------------------------------------------
def _loop_run(dry_run: bool, batches: list[torch.Tensor], workdir: Path, resume_from: str | None, save_at: int | None):
    """12 optimizer steps of 2 micro-batches (4 per epoch) with SEMA; returns the final weights, the average and
    what was checked on the way."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from sema_hf import SEMA

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=dry_run, mixed_precision="no" if dry_run else "bf16", gradient_accumulation_steps=2)
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    sema = SEMA(model, optimizer, accelerator, decay=DECAY, warmup="none", steps_per_epoch=4)
    start = 0
    if resume_from is not None:
        accelerator.load_state(resume_from)
        start = sema.global_step
    checks = {"swap_restores_raw": True, "step_without_host_sync": True}
    cuda = torch.cuda.is_available() and not dry_run
    for k in range(start, STEPS):
        for micro in (batches[k][:4], batches[k][4:]):
            micro = micro.to(accelerator.device)
            with accelerator.accumulate(model):
                loss = model(input_ids=micro, labels=micro).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            try:
                with sync_errors(cuda):
                    sema.step()
            except RuntimeError:
                checks["step_without_host_sync"] = False
                raise
        if (k + 1) % 4 == 0:
            sema.epoch_end()
            raw = {n: p.detach().clone() for n, p in model.named_parameters()}
            with sema.swapped_in(), torch.no_grad():
                model(input_ids=batches[0].to(accelerator.device))
            checks["swap_restores_raw"] &= all(torch.equal(raw[n], p) for n, p in model.named_parameters())
        if save_at is not None and k + 1 == save_at:
            accelerator.save_state(str(workdir / f"loop_step{save_at}"))
    weights = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    ema = {n: t.float().cpu() for n, t in sema.ema_state_dict().items()}
    counters = {"num_updates": sema.num_updates, "num_switches": sema.num_switches, "engine": sema.engine.name}
    sema.remove_hooks()
    return weights, ema, checks, counters


def part_loop(args: argparse.Namespace, workdir: Path) -> dict:
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 97, (8, 1), generator=g) + torch.arange(32)) % 97 for _ in range(STEPS)]
    weights, ema, checks, counters = _loop_run(args.dry_run, batches, workdir, None, save_at=6)
    resumed_weights, resumed_ema, _, resumed_counters = _loop_run(
        args.dry_run, batches, workdir, str(workdir / "loop_step6"), save_at=None
    )
    checks.update(
        {
            "updates": counters["num_updates"] == STEPS,
            "switches": counters["num_switches"] == STEPS // 4,
            "ema_fp32": all(t.dtype == torch.float32 for t in ema.values()),
            "resume_same_weights": all(torch.equal(weights[n], resumed_weights[n]) for n in weights),
            "resume_same_ema": all(torch.equal(ema[n], resumed_ema[n]) for n in ema),
            "resume_same_counters": counters == resumed_counters,
        }
    )
    return {"ok": all(checks.values()), **checks, **counters}


# ---- part 4: engines at world size 1 (one torchrun process each) --------------------------------------------------------
ZERO3 = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": "auto",
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", "torch_adam": True},
    },
}
FSDP2_AC = {
    "version": 2,
    "activation_checkpointing": True,
    "transformer_layer_cls_to_wrap": ["GPT2Block"],
    "reshard_after_forward": True,
    "state_dict_type": "SHARDED_STATE_DICT",
}


def engine_worker(engine: str, out_path: str, dry_run: bool) -> None:
    """Inside torchrun (world size 1): train with SEMA under ``engine`` and write what the check compares."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from transformers import Trainer

    from sema_hf import SEMACallback

    result: dict = {"engine": engine}
    if engine == "ddp-sharded-nccl":
        result.update(ddp_sharded_nccl(dry_run))
    else:
        overrides: dict = {"adam_epsilon": 1e-6}
        trainer_cls = Trainer
        if engine == "zero3":
            overrides["deepspeed"] = ZERO3
        elif engine == "fsdp2-ac":
            overrides.update(fsdp=True, fsdp_config={**FSDP2_AC, "sync_module_states": False})
            if dry_run:  # accelerate drops FSDP on CPU; the tests' shim re-installs it (dry run only)
                sys.path.insert(0, str(ROOT / "tests" / "dist"))
                from fsdp_shim import FSDPTrainer

                trainer_cls = FSDPTrainer
        sema = SEMACallback(decay=DECAY, warmup="none")
        trainer = trainer_cls(
            model=tiny_gpt2(),
            args=training_args(os.path.join(os.environ["GPU_CHECK_WORKDIR"], engine), dry_run, **overrides),
            train_dataset=pattern_dataset(32, 1),
            eval_dataset=pattern_dataset(8, 2),
            callbacks=[sema],
        )
        trainer.train()
        ema = sema.ema_state_dict()
        result.update(
            sema_engine=sema.engine.name,
            local_numel=sema.local_numel,
            num_updates=sema.num_updates,
            num_switches=sema.num_switches,
            losses=losses(trainer.state.log_history, "loss"),
            eval_losses=losses(trainer.state.log_history, "eval_loss"),
            wrapped=type(trainer.model_wrapped).__name__,
            # what makes these runs the ones asked for: activation checkpointing applied, small ZeRO-3 params kept
            checkpoint_wrapped=sum(isinstance(m, CheckpointWrapper) for m in trainer.model.modules()),
            zero3_persistent=sum(bool(getattr(p, "ds_persist", False)) for p in trainer.model.parameters()),
        )
        from safetensors.torch import save_file

        save_file({n: t.contiguous() for n, t in ema.items()}, out_path + ".ema.safetensors")
    Path(out_path).write_text(json.dumps(result))


def ddp_sharded_nccl(dry_run: bool) -> dict:
    """`DDPShardedAdapter` over the real collective backend (NCCL on a GPU), one rank, against a full-copy store."""
    import torch.distributed as dist

    from sema_hf.engines.ddp_sharded import DDPShardedAdapter
    from sema_hf.engines.local import LocalAdapter
    from sema_hf.store import EMAStore

    device = torch.device("cpu" if dry_run else "cuda", None if dry_run else 0)
    if not dry_run:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("gloo" if dry_run else "nccl")
    model = tiny_gpt2().to(device)
    shared = DDPShardedAdapter(model)
    local = LocalAdapter(model)
    store = EMAStore(shared.slots(), after_write=shared.after_write, backup_forward=shared.backup_forward)
    full = EMAStore(local.slots())
    g = torch.Generator(device=device).manual_seed(0)
    error = None
    with torch.no_grad():
        for _ in range(3):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, device=device))
            try:
                with sync_errors(not dry_run):
                    store.update(0.7)
            except RuntimeError as e:
                error = str(e).splitlines()[0]
            full.update(0.7)
    reference = {n: t.clone() for n, t in full.state_dict().items()}
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    with store.swapped_in():
        inside = all(torch.equal(p, reference[n]) for n, p in model.named_parameters())
    restored = all(torch.equal(p, raw[n]) for n, p in model.named_parameters())
    store.switch()
    switched = all(torch.equal(p, reference[n]) for n, p in model.named_parameters())
    return {
        "backend": dist.get_backend(),
        "update_sync_error": error,
        "swap_inside_exact": inside,
        "swap_raw_restored": restored,
        "switch_exact": switched,
        "ok": error is None and inside and restored and switched,
    }


def launch_engine(engine: str, workdir: Path, dry_run: bool, timeout: float) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = workdir / f"{engine}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={port}", __file__, "--worker", engine, "--worker-out", str(out)]
    cmd += ["--dry-run"] if dry_run else []
    env = {**os.environ, "GPU_CHECK_WORKDIR": str(workdir)}
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not out.is_file():
        return {
            "ok": False,
            "error": f"exit code {proc.returncode}",
            "output_tail": (proc.stdout + proc.stderr)[-3000:],
        }
    result = json.loads(out.read_text())
    result["wall_s"] = round(wall, 1)
    return result


def part_engines(args: argparse.Namespace, workdir: Path, deadline: float) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for engine in ("plain", "zero3", "fsdp2-ac", "ddp-sharded-nccl"):
        left = deadline - time.perf_counter()
        if left < 30:
            out[engine] = {"ok": False, "error": "skipped: out of time budget"}
            continue
        out[engine] = launch_engine(engine, workdir, args.dry_run, timeout=min(left, args.engine_timeout_s))
    plain = out["plain"]
    if "losses" in plain:
        plain_ema = load_file(str(workdir / "plain.json.ema.safetensors"))
        for engine in ("zero3", "fsdp2-ac"):
            result = out[engine]
            if "losses" not in result:
                continue
            ema = load_file(str(workdir / f"{engine}.json.ema.safetensors"))
            result["same_names"] = sorted(ema) == sorted(plain_ema)
            result["ema_rel_diff_vs_plain"] = max_rel_diff(ema, plain_ema) if result["same_names"] else None
            result["loss_rel_diff_vs_plain"] = max(
                abs(a - b) / abs(b) for a, b in zip(result["losses"], plain["losses"], strict=True)
            )
            result["ok"] = bool(
                result["same_names"]
                and result["ema_rel_diff_vs_plain"] < 1e-3
                and result["loss_rel_diff_vs_plain"] < 1e-3
                and result["num_updates"] == STEPS
                and result["num_switches"] == 3
                and (result["zero3_persistent"] > 0 if engine == "zero3" else result["checkpoint_wrapped"] > 0)
            )
        plain["ok"] = plain["num_updates"] == STEPS
    return out


# ---- driver --------------------------------------------------------------------------------------------------------------
def environment() -> dict:
    from importlib import metadata

    versions = {}
    for package in (
        "torch",
        "transformers",
        "accelerate",
        "deepspeed",
        "timm",
        "diffusers",
        "ema-pytorch",
        "torch-ema",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"gpu": gpu, "cuda": torch.version.cuda, "python": platform.python_version(), "versions": versions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "results" / "gpu_check.json"))
    parser.add_argument("--budget-s", type=float, default=450, help="skip remaining parts past this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script, not a GPU")
    parser.add_argument("--engine-timeout-s", type=float, default=150, help="limit for each engine's torchrun")
    parser.add_argument("--parts", default="update_switch,no_host_sync,trainer_bf16,engines,loop")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        engine_worker(args.worker, args.worker_out, args.dry_run)
        return
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing was run.")
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    deadline = started + args.budget_s
    workdir = Path(os.environ.get("GPU_CHECK_WORKDIR") or (HERE / "results" / "gpu_check_runs"))
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict = {"dry_run": args.dry_run, "environment": environment(), "parts": {}}
    parts = args.parts.split(",")
    if args.dry_run:
        parts = [p for p in parts if p != "update_switch"]  # CPU figures live in docs/benchmarks.md already
    for part in parts:
        if time.perf_counter() > deadline:
            report["parts"][part] = {"ok": False, "error": "skipped: out of time budget"}
            continue
        t0 = time.perf_counter()
        try:
            if part == "update_switch":
                result = part_update_switch(args)
            elif part == "no_host_sync":
                result = part_no_host_sync(args)
            elif part == "trainer_bf16":
                result = part_trainer_bf16(args, workdir)
            elif part == "engines":
                result = part_engines(args, workdir, deadline)
                result["ok"] = all(r.get("ok") for r in result.values())
            elif part == "loop":
                result = part_loop(args, workdir)
            else:
                raise ValueError(f"unknown part {part!r}")
        except Exception as e:  # noqa: BLE001 - a failing part is recorded and the next one still runs
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        report["parts"][part] = result
        print(f"gpu_check: {part}: {'ok' if result.get('ok') else 'FAILED'} ({result['wall_s']} s)", flush=True)
    report["ok"] = all(p.get("ok") for p in report["parts"].values())
    report["wall_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"gpu_check: {'all parts ok' if report['ok'] else 'SOME PARTS FAILED'}; wrote {args.out}")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
