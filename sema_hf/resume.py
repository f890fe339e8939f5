"""Which EMA state a resumed run restores, and the proof that it belongs to the model checkpoint being resumed.

Every checkpoint the callback writes gets an identity, ``checkpoint_id = "<run id>:<global step>"``, recorded twice:
in the EMA's own ``sema_state.json`` and, through `transformers.trainer_callback.ExportableState`, in the
Trainer's ``trainer_state.json`` (``stateful_callbacks["SEMACallback"]``), which the Trainer reads back on resume.
On resume the EMA folder is the one the Trainer resumed from (``trainer.train(resume_from_checkpoint=PATH)`` or
``True``, found on the call stack); its EMA must carry the identity the restored Trainer state expects. Another
run's EMA at the same step (a copied folder, two runs sharing an ``output_dir``) is refused with an error naming
both folders; a checkpoint without EMA files (a crash between the Trainer's save and the EMA's, a run saved without
SEMA) is refused with what to do instead. Every rank takes the same decision (`agree_across_ranks`): with
``save_on_each_node`` and no shared storage each node reads its own copy, and replicas must never diverge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint import has_ema_checkpoint, read_ema_state

CALLBACK_KEY = "SEMACallback"


def checkpoint_id(run_id: str, global_step: int) -> str:
    return f"{run_id}:{global_step}"


def expected_checkpoint_id(stateful_callbacks: dict[str, Any] | None) -> str | None:
    """The identity the restored ``trainer_state.json`` records for the EMA saved with it (None: not recorded)."""
    entry = (stateful_callbacks or {}).get(CALLBACK_KEY)
    entries = entry if isinstance(entry, list) else [entry]
    for item in entries:
        if isinstance(item, dict) and isinstance(item.get("attributes"), dict):
            found = item["attributes"].get("checkpoint_id")
            if isinstance(found, str):
                return found
    return None


@dataclass(frozen=True)
class ResumeDecision:
    """``folder`` to restore from (None: start a fresh average), or ``error`` to raise on every rank."""

    folder: str | None
    error: str | None = None
    missing: bool = False


def decide_resume(
    resumed_from: str | None,
    fallback_folder: str,
    global_step: int,
    expected_id: str | None,
    allow_fresh: bool,
) -> ResumeDecision:
    """Where this rank restores the EMA from after the Trainer resumed at ``global_step``.

    ``resumed_from`` is the folder the Trainer resumed from (None when it could not be identified: then
    ``fallback_folder``, ``output_dir/checkpoint-<step>``, is the only candidate).
    """
    folder = resumed_from or fallback_folder
    if not has_ema_checkpoint(folder):
        if allow_fresh:
            return ResumeDecision(None, missing=True)
        return ResumeDecision(
            None,
            missing=True,
            error=(
                f"The Trainer resumed from {folder!r}, which holds no SEMA EMA state (no sema_state.json): the "
                "run was saved without SEMACallback, or it stopped between the Trainer's save and the EMA's "
                "(use sema_hf.SEMATrainer, which writes the EMA first). Resume from an earlier checkpoint that "
                "has it, or pass SEMACallback(allow_fresh_ema_on_resume=True) to start a fresh average from the "
                "restored weights."
            ),
        )
    state = read_ema_state(folder)
    saved_id, saved_in = state.get("checkpoint_id"), state.get("checkpoint_dir", "an unknown folder")
    if state.get("global_step") != global_step:
        return ResumeDecision(
            None,
            error=(
                f"EMA state in {folder!r} was saved at step {state.get('global_step')} (in {saved_in!r}) but the "
                f"Trainer resumed at step {global_step}; resume from the checkpoint the EMA was saved with."
            ),
        )
    if expected_id is not None and saved_id != expected_id:
        return ResumeDecision(
            None,
            error=(
                f"The EMA state in {folder!r} belongs to another checkpoint: it was written in {saved_in!r} "
                f"(identity {saved_id}), but the Trainer state resumed from {folder!r} expects identity "
                f"{expected_id}. Two runs wrote to the same place, or EMA files were copied between checkpoints; "
                "resume from the checkpoint whose EMA was saved with it."
            ),
        )
    return ResumeDecision(folder)


def agree_across_ranks(decision: ResumeDecision) -> ResumeDecision:
    """The same decision on every rank: if any rank cannot restore, none does (all raise, or all start fresh
    when each failing rank only misses its files and a fresh start is allowed). One all-reduce of one integer;
    when some rank fails, one all-gather of the errors, so that every rank raises the same error naming them."""
    code = 2 if decision.error is not None else (1 if decision.folder is None else 0)  # error, fresh, restore
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return decision
    flag = torch.tensor([code], dtype=torch.int64)
    if torch.distributed.get_backend() == "nccl":
        flag = flag.cuda()
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    worst = int(flag.item())
    if worst == 2:
        return _same_error_on_every_rank(decision)
    if worst == code:
        return decision
    return ResumeDecision(None, missing=True)  # worst == 1: another rank starts fresh, so every rank does


def _same_error_on_every_rank(decision: ResumeDecision) -> ResumeDecision:
    """Some rank cannot restore: every rank gets one error that quotes each failing rank's reason (with
    ``save_on_each_node`` each node reads its own copy, so the reasons can differ between nodes)."""
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (decision.error, decision.missing))
    failed = [(rank, error, missing) for rank, (error, missing) in enumerate(gathered) if error is not None]
    if len(failed) == len(gathered) and len({error for _, error, _ in failed}) == 1:
        return ResumeDecision(None, error=failed[0][1], missing=failed[0][2])  # one reason, the same everywhere
    by_error: dict[str, list[int]] = {}
    for rank, error, _ in failed:
        by_error.setdefault(error, []).append(rank)
    reasons = " ".join(f"Rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {e}" for e, r in by_error.items())
    restorable = len(gathered) - len(failed)
    return ResumeDecision(
        None,
        missing=all(missing for _, _, missing in failed),
        error=(
            f"SEMA cannot restore the EMA on {len(failed)} of {len(gathered)} ranks ({restorable} could), so no rank "
            f"restores it: the replicas would diverge. {reasons}"
        ),
    )


def folder_to_restore(
    resumed_from: str | None,
    fallback_folder: str,
    global_step: int,
    stateful_callbacks: dict[str, Any] | None,
    allow_fresh: bool,
) -> str | None:
    """The folder whose EMA this rank restores (None: start fresh), the same decision on every rank; raises
    ``FileNotFoundError`` (no EMA state) or ``ValueError`` (another checkpoint's EMA) otherwise."""
    decision = decide_resume(
        resumed_from, fallback_folder, global_step, expected_checkpoint_id(stateful_callbacks), allow_fresh
    )
    decision = agree_across_ranks(decision)
    if decision.error is not None:
        raise (FileNotFoundError if decision.missing else ValueError)(decision.error)
    return decision.folder
