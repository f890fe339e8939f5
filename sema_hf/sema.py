"""`SEMA`: Switch EMA for hand-written training loops (``accelerate`` or plain PyTorch), and the run's core state.

The maths (Li et al., "Switch EMA", arXiv 2402.09240). After every optimizer step ``t`` (never a micro-batch of
gradient accumulation, never a step skipped for an fp16 overflow) the fp32 average follows the weights::

    ema <- m_t * ema + (1 - m_t) * theta          m_t: the decay m after warmup (`sema_hf.schedule`)

and at each switch point (the end of every ``switch_every_epochs``-th epoch from ``switch_start_epoch`` on, or
every ``switch_every_steps`` optimizer steps) the average is copied into the weights, ``theta <- ema``, which train
on from there (optimizer state and LR schedule untouched). The horizon ``H = 1 / (1 - m)`` optimizer steps is how
far back the average reaches: 0.9 -> 10 steps, 0.99 -> 100, 0.999 -> 1000. Give it in the unit that matters for
the run (``horizon_steps=200``, ``horizon_epochs=0.3`` with the epoch's length, or ``decay=0.999``); keep it well
under the switch interval, since every switch pulls training back by about H steps of progress (`sema_hf.horizon`).

In a loop::

    from accelerate import Accelerator
    from sema_hf import SEMA

    accelerator = Accelerator(gradient_accumulation_steps=2)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    sema = SEMA(model, optimizer, accelerator, horizon_steps=200)  # any SEMAConfig field, or config=SEMAConfig(...)
    for epoch in range(epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step(); scheduler.step(); optimizer.zero_grad()
            sema.step()                  # averages only when the optimizer really stepped
        sema.epoch_end()                 # the epoch switch point
        with sema.swapped_in():          # evaluate the average; the raw weights always come back
            evaluate(model)
        accelerator.save_state("ckpt")   # carries every rank's EMA shard (load_state restores it bit for bit)
    sema.finalize()                      # the model holds the average (final_weights="ema")

With post-hoc tracking (``posthoc_every_steps``, ``posthoc_dir``) the average can also be chosen after training::

    table = sema.posthoc_sweep(evaluate)  # score the raw weights, the classic EMA, the post-hoc grid (every rank)
    sema.finalize(posthoc=table)         # the model holds the best of them; table.save(dir) writes JSON and plot

Several averages in one run (student and teacher, generator and discriminator, two horizons of one model): one
SEMA each, each with its own ``name``; ``save_state`` then writes each average's files into the subfolder
``sema_<name>/`` of the checkpoint, and ``load_state`` gives each its own (`state_folder`). A mean teacher is the
student's own average: ``with torch.no_grad(), sema.swapped_in(): target = model(x)`` at every step.

Engines: one process, DDP (``shard_under_ddp`` too), FSDP1/FSDP2 and DeepSpeed ZeRO-1/2/3 as prepared by
``accelerate``; each rank averages exactly what its optimizer updates (`sema_hf.engines`), with no communication
per update. Every rank must call every method (``step``, ``epoch_end``, ``swapped_in``, ``ema_state_dict``,
``save``, ``load``, ``finalize``): under sharded engines and ``shard_under_ddp`` they run collectives.

Post-hoc EMA (``posthoc_every_steps=N``, ``posthoc_dir=...``): in the same pass as the classic EMA, each rank also
tracks power-function EMA profiles of its own shard (``posthoc_sigma_rels``, `sema_hf.profiles`) and writes snapshots
of them every N optimizer steps and at `finalize` (`posthoc_snapshot`). After training, `sema_hf.posthoc.reconstruct`
gives the average for any ``sigma_rel`` or exponential horizon in one process from the files of any world size;
inside the run, `posthoc_average` gives each rank its own shard of it, with no gather. The profiles ride in the
checkpoint like the EMA: a resumed run continues the series and replaces the snapshots a killed run wrote later.

This object is the core of a run: engine adapter, store, counters, switch point and the per-rank checkpoint files.
It knows no Trainer; `SEMACallback` is the Trainer's front-end to the same rules.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import posthoc, schedule, selection
from .checkpoint import (
    STATE_NAME,
    has_ema_checkpoint,
    layout_fingerprint,
    load_ema_checkpoint,
    raise_if_any_rank_failed,
    read_ema_state,
)
from .checkpoint import save_ema_checkpoint as _save_ema_checkpoint
from .config import DEFAULT_HORIZON_EPOCHS, SEMAConfig
from .engines import EngineAdapter, detect_engine
from .engines.base import Layout
from .engines.whole_model import whole_model_state_dict
from .horizon import ResolvedHorizon, horizon_warnings, optimizer_steps_per_epoch, resolve_horizon
from .profiles import PowerProfiles
from .store import EMAStore

logger = logging.getLogger(__name__)

#: Seconds `SEMA.swapped_in` waits for the other ranks where entering the swap is a collective (``shard_under_ddp``,
#: ZeRO-1/2) before it raises, instead of hanging: ``if rank == 0: with sema.swapped_in(): ...`` is the usual cause.
SWAP_ENTRY_TIMEOUT_S = 300.0

#: What `SEMA`'s ``name`` may be: it becomes part of a folder name inside every checkpoint.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

#: The names of the `SEMA` objects riding along with each accelerator's ``save_state`` / ``load_state``.
_NAMES_ON_ACCELERATOR: weakref.WeakKeyDictionary[Any, set[str | None]] = weakref.WeakKeyDictionary()


def state_folder(folder: str, name: str | None) -> str:
    """Where the `SEMA` called ``name`` keeps its files inside a checkpoint ``folder``: the folder itself for the
    unnamed one (``sema_state.json`` and ``sema_ema-*.safetensors``, the layout of every checkpoint written before
    names existed, and the Trainer callback's), the subfolder ``sema_<name>/`` (the same two kinds of file) for a
    named one. So each average of a run has files of its own, and an unnamed SEMA reads old checkpoints as before."""
    return folder if name is None else os.path.join(folder, f"sema_{name}")


def _check_name(name: str | None) -> str | None:
    if name is None or (isinstance(name, str) and NAME_PATTERN.fullmatch(name)):
        return name
    raise ValueError(
        f"SEMA: name = {name!r} is invalid: expected None (the default: files sema_state.json and "
        "sema_ema-*.safetensors in the checkpoint folder) or 1-64 characters of letters, digits, '_', '.' and '-', "
        "starting with a letter or digit (files in the subfolder sema_<name>/)."
    )


class SEMA:
    """Switch EMA of ``model`` in a training loop; see the module docstring for the maths and the loop.

    Args:
        model: the model as ``accelerator.prepare`` returned it (DDP / FSDP / DeepSpeed wrapped), or a plain module,
            already on its device and in its dtype: the average follows the tensors the model holds now, so a later
            ``.to(device)`` / ``.half()`` (anything through ``Module._apply``) is refused at the next `step`,
            `epoch_end`, `swapped_in` or `finalize` (checked under one process, DDP and ``shard_under_ddp``; not
            under FSDP and ZeRO, whose prepared models are not moved or cast by hand).
        optimizer: the optimizer as prepared (accelerate's wrapper is fine). Needed under DeepSpeed ZeRO; for the
            other engines it is only used to find the engine.
        accelerator: the run's ``accelerate.Accelerator``. With it, `step` counts only real optimizer steps
            (``accelerator.sync_gradients`` and not ``accelerator.optimizer_step_was_skipped``), and
            ``accelerator.save_state`` / ``load_state`` carry the EMA (every rank's shard) with nothing else to call.
            Without it, every `step` call is an optimizer step, and `save` / `load` write and read the files.
        config: a `SEMAConfig`; omitted, the defaults.
        steps_per_epoch: optimizer steps per epoch (an int), or the training dataloader (its length is divided by
            ``accelerator.gradient_accumulation_steps``, rounding up, as accelerate steps on a last partial
            accumulation). Needed by ``horizon_epochs`` (the default horizon) and by the default decay warmup (one
            epoch); give ``horizon_steps`` or ``decay`` and ``warmup_steps`` otherwise.
        max_steps: optimizer steps of the whole run, if known: only for the warnings about a horizon or a warmup
            longer than the run.
        posthoc_dir: where post-hoc EMA snapshots go (``posthoc_every_steps``; `sema_hf.posthoc`); needed when
            that is set. The Trainer's callback uses ``<output_dir>/sema_posthoc``.
        name: which files of a checkpoint folder are this average's, for runs with several (student and teacher,
            generator and discriminator, two horizons of one model). None (the default): ``sema_state.json`` and
            ``sema_ema-*.safetensors`` in the folder itself, as in every checkpoint written before names existed;
            a name: the same files in the subfolder ``sema_<name>/``. Two SEMA on one accelerator need two
            different names (two unnamed ones are refused); the name is recorded in ``sema_state.json`` and a
            load checks it. Letters, digits, ``_``, ``.``, ``-``.
        **config_fields: any `SEMAConfig` field, e.g. ``SEMA(model, optimizer, accelerator, horizon_steps=200)``.

    ``evaluate_with`` and ``landscape`` are the Trainer's business: in a loop, what is evaluated is what runs
    inside `swapped_in` (the average) or outside it (the raw weights).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: object | None = None,
        accelerator: Any | None = None,
        *,
        config: SEMAConfig | None = None,
        steps_per_epoch: int | Any | None = None,
        max_steps: int | None = None,
        posthoc_dir: str | None = None,
        name: str | None = None,
        **config_fields: Any,
    ) -> None:
        self.name = _check_name(name)
        if accelerator is not None:
            self._refuse_taken_name(accelerator)
        base = config if config is not None else SEMAConfig()
        self.config: SEMAConfig = base.replace(**config_fields) if config_fields else base
        self.accelerator = accelerator
        self.steps_per_epoch = self._steps_per_epoch(steps_per_epoch, accelerator)
        warmup_steps = loop_warmup_steps(self.config, self.steps_per_epoch)
        resolved = resolve_horizon(self.config, self.steps_per_epoch)
        if self.config.evaluate_with != "ema":
            warnings.warn(
                f"SEMA: evaluate_with={self.config.evaluate_with!r} has no effect in a custom loop: evaluate inside "
                "`with sema.swapped_in():` for the average and outside it for the raw weights.",
                UserWarning,
                stacklevel=2,
            )
        engine = detect_engine(
            model,
            optimizer,
            self.config.include_buffers,
            shard_under_ddp=self.config.shard_under_ddp,
            buffers_from_rank0=True,  # the store below calls its before_read
        )
        self._setup(engine, resolved, warmup_steps, posthoc_dir)
        self._model = model
        for message in horizon_warnings(self.config, resolved, max_steps or 0, warmup_steps):
            logger.warning(f"SEMA: {message}")
            warnings.warn(f"SEMA: {message}", UserWarning, stacklevel=2)
        self._hooks: list[Any] = []
        if accelerator is not None:
            self._hooks = [
                accelerator.register_save_state_pre_hook(self._save_state_hook),
                accelerator.register_load_state_pre_hook(self._load_state_hook),
            ]
            _NAMES_ON_ACCELERATOR.setdefault(accelerator, set()).add(self.name)
        logger.info(
            f"SEMA: engine {engine.name}, decay {resolved.decay:.6g} (horizon {resolved.horizon_steps:.4g} optimizer "
            f"steps), warmup {self.config.warmup} over {warmup_steps} steps, {self.store.local_numel} averaged "
            "elements on this rank"
        )

    @classmethod
    def from_engine(
        cls,
        engine: EngineAdapter,
        config: SEMAConfig,
        resolved: ResolvedHorizon,
        warmup_steps: int,
        posthoc_dir: str | None = None,
    ) -> SEMA:
        """The core for a front-end that found the engine and resolved the horizon and warmup itself (the
        Trainer's callback, from `TrainingArguments`): no accelerator, no checks, no hooks. ``posthoc_dir`` is
        used only when ``config.posthoc_every_steps`` is set."""
        core = cls.__new__(cls)
        core.name = None
        core._model = None
        core.config = config
        core.accelerator = None
        core.steps_per_epoch = resolved.steps_per_epoch
        core._hooks = []
        core._setup(engine, resolved, warmup_steps, posthoc_dir if config.posthoc_every_steps is not None else None)
        return core

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        optimizer: object | None,
        config: SEMAConfig,
        resolved: ResolvedHorizon,
        warmup_steps: int,
        posthoc_dir: str | None = None,
    ) -> SEMA:
        """`from_engine` with the engine found here (`sema_hf.engines.detect_engine`, as `SEMA` does): so a
        front-end (the Trainer's callback) reaches the engines only through the core."""
        engine = detect_engine(
            model,
            optimizer,
            config.include_buffers,
            shard_under_ddp=config.shard_under_ddp,
            buffers_from_rank0=True,  # the core's store fills them (DDP with include_buffers: rank 0's statistics)
        )
        return cls.from_engine(engine, config, resolved, warmup_steps, posthoc_dir=posthoc_dir)

    def _setup(
        self, engine: EngineAdapter, resolved: ResolvedHorizon, warmup_steps: int, posthoc_dir: str | None = None
    ) -> None:
        """The run's state: engine, store, counters. Shared by both front-ends."""
        self.engine = engine
        self.resolved = resolved
        self.warmup_steps = warmup_steps
        self.store = EMAStore(
            engine.slots(),
            after_write=engine.after_write,
            backup_forward=getattr(engine, "backup_forward", None),  # DDP-sharded: evaluation gathers once
            before_read=getattr(engine, "before_read", None),  # DDP + include_buffers: rank 0's buffers
        )
        self.run_id = uuid.uuid4().hex
        self._reset_counters()
        self.final_weights_held: str | None = None
        self.posthoc_chosen: str | None = None  # the label finalize(posthoc=...) put in
        self.last_posthoc_sweep: selection.PosthocSweep | None = None
        self._swapped = False
        self._fresh_pending = False
        self._entry_group = _entry_check_group(engine)
        self.swap_entry_timeout_s = SWAP_ENTRY_TIMEOUT_S
        self._setup_posthoc(posthoc_dir)

    def _setup_posthoc(self, posthoc_dir: str | None) -> None:
        """Post-hoc EMA tracking (`sema_hf.profiles`, `sema_hf.posthoc`): the power-function profiles of this
        rank's shard, updated in the same pass as the classic EMA, and the list of snapshots written."""
        cfg = self.config
        self.posthoc_dir = posthoc_dir
        self.profiles: PowerProfiles | None = None
        self.posthoc_series_id = uuid.uuid4().hex  # the run's snapshots; a resumed run adopts its checkpoint's
        self.posthoc_steps: list[int] = []
        self._profiles_fresh_pending = False
        self._posthoc_folder_checked = False
        if cfg.posthoc_every_steps is None:
            if posthoc_dir is not None:
                warnings.warn(
                    "SEMA(posthoc_dir=...) has no effect without posthoc_every_steps: no post-hoc EMA is tracked.",
                    UserWarning,
                    stacklevel=3,
                )
            return
        if posthoc_dir is None:
            raise ValueError(
                f"SEMA: posthoc_every_steps = {cfg.posthoc_every_steps} needs a folder for the snapshots: pass "
                "SEMA(..., posthoc_dir=...) (the Trainer's callback uses <output_dir>/sema_posthoc)."
            )
        if _distributed():  # one series id on every rank: the files of all ranks name the same run
            shared = [self.posthoc_series_id]
            dist.broadcast_object_list(shared, src=0)
            self.posthoc_series_id = shared[0]
        self.posthoc_gammas = [posthoc.sigma_rel_to_gamma(s) for s in cfg.posthoc_sigma_rels]
        self.profiles = PowerProfiles(
            self.store.slots,
            self.posthoc_gammas,
            companion=self.store.state_dict(),
            before_read=getattr(self.engine, "before_read", None),
        )
        logger.info(
            f"SEMA: post-hoc EMA profiles sigma_rel {list(cfg.posthoc_sigma_rels)} (gamma "
            f"{[round(g, 3) for g in self.posthoc_gammas]}), snapshots every {cfg.posthoc_every_steps} optimizer steps "
            f"and at the end into {posthoc_dir!r} ({cfg.posthoc_dtype}); {self.profiles.local_numel} more fp32 "
            "elements on this rank"
        )

    @staticmethod
    def _steps_per_epoch(steps_per_epoch: int | Any | None, accelerator: Any | None) -> int | None:
        if steps_per_epoch is None or isinstance(steps_per_epoch, int):
            if isinstance(steps_per_epoch, bool) or (steps_per_epoch is not None and steps_per_epoch < 1):
                raise ValueError(f"SEMA: steps_per_epoch = {steps_per_epoch!r} is invalid: expected an int >= 1")
            return steps_per_epoch
        try:
            batches = len(steps_per_epoch)
        except TypeError:
            raise ValueError(
                f"SEMA: steps_per_epoch = {steps_per_epoch!r} is neither an int nor a dataloader with a length; pass "
                "the optimizer steps per epoch as an int."
            ) from None
        accumulation = int(getattr(accelerator, "gradient_accumulation_steps", 1) or 1)
        return optimizer_steps_per_epoch(batches, accumulation)

    # ---- what the user reads ----------------------------------------------------------------------------------
    @property
    def decay(self) -> float:
        """The per-step decay m (before warmup and ``update_every``)."""
        return self.resolved.decay

    @property
    def local_numel(self) -> int:
        """Elements of fp32 average held by this process (about total / world size under sharded engines)."""
        return self.store.local_numel

    def ema_state_dict(self, *, whole_model: bool = False) -> dict[str, torch.Tensor]:
        """The full (gathered) averages keyed like ``model.state_dict()``, fp32 copies on CPU (sharded engines) or
        on the weights' device. Sharded engines gather one tensor at a time: every rank must call this, every rank
        receives the full dict.

        By default only what is averaged: the trainable parameters (a LoRA adapter's, under PEFT), a tied weight
        once under its first name. ``whole_model=True``: every key of ``model.state_dict()``, so that
        ``teacher.load_state_dict(sema.ema_state_dict(whole_model=True))`` loads strictly into a plain copy of the
        model: averaged tensors under each of their names (GPT-2's ``lm_head.weight`` too), frozen parameters and
        buffers as the model holds them now, gathered under ZeRO-3 and FSDP2 (not FSDP1). That costs a whole
        model's gather and memory on every rank; the default gathers only the averaged tensors
        (`sema_hf.engines.whole_model`)."""
        self._fresh_if_pending()
        averages = self.engine.full_state_dict(self.store.state_dict())
        if not whole_model:
            return averages
        if self._model is None:
            raise RuntimeError(
                "SEMA.ema_state_dict(whole_model=True) needs the model, and this SEMA was built by a front-end "
                "that did not give it (SEMACallback): call it with whole_model=False."
            )
        # Sharded adapters gather the averages onto the CPU; the local one keeps them on the weights' device.
        return whole_model_state_dict(self._model, averages, self.engine.name, on_cpu=self.engine.name != "local")

    @contextmanager
    def swapped_in(self, averages: Mapping[str, torch.Tensor] | None = None) -> Iterator[None]:
        """Inside the block the model's forward reads the average; the raw weights come back afterwards, bit for
        bit, even when the block raises. The optimizer's fp32 master weights are never touched.

        ``averages``: read these instead of the classic EMA: this rank's tensors keyed like
        ``sema.store.state_dict()`` (a post-hoc average from `posthoc_average`, a checkpoint's from
        `read_averages`).

        Under ``shard_under_ddp`` and DeepSpeed ZeRO-1/2 entering the block is a collective (the average is
        gathered from every rank's shard), as is any forward under FSDP and ZeRO-3: every rank must enter it.
        ``if accelerator.is_main_process: with sema.swapped_in(): ...`` raises after ``swap_entry_timeout_s``
        (300 s) there, naming the ranks that did not come, instead of hanging; evaluate on every rank (or take
        ``ema_state_dict()`` on every rank and use it on one).
        """
        if self._swapped:
            raise RuntimeError("SEMA.swapped_in() is already active: the average is in the model; do not nest it.")
        self._refuse_moved_tensors("swapped_in()")
        self._fresh_if_pending()
        self._check_every_rank_enters("swapped_in()")
        self._swapped = True
        try:
            with self.store.swapped_in(averages):
                yield
        finally:
            self._swapped = False

    def write_weights(self, values: Mapping[str, torch.Tensor]) -> None:
        """Put ``values`` into the model for good, as a switch puts the average: this rank's tensors keyed like
        ``sema.store.state_dict()`` (a post-hoc average from `posthoc_average`), written into what the optimizer
        updates and what the forward reads under every engine. Every rank must call it with its own shards (under
        ``shard_under_ddp`` and ZeRO-1/2 the write ends in a collective). The averages are not changed."""
        self._refuse_while_swapped("write_weights()")
        self._fresh_if_pending()
        self.store.write(values)

    def read_averages(self, folder: str) -> dict[str, torch.Tensor]:
        """This rank's part of the average saved in ``folder`` (by `save`, ``accelerator.save_state`` or the
        callback), keyed like ``sema.store.state_dict()`` and re-sharded to this run's layout, without touching
        this object's state (for `swapped_in` or `write_weights`). Every rank must call it; an error on any rank
        is raised on every rank."""
        averages: dict[str, torch.Tensor] = {}
        error: BaseException | None = None
        try:
            own = state_folder(folder, self.name)
            if not has_ema_checkpoint(own):
                raise FileNotFoundError(f"No SEMA EMA state in {own!r} (no {STATE_NAME}).")
            saved_posthoc = read_ema_state(own).get("posthoc")  # the files may hold the profiles too
            averages, _, _ = self._read_saved(own, len(saved_posthoc["sigma_rels"]) if saved_posthoc else 0)
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, then it is raised
            error = err
        raise_if_any_rank_failed(error, f"read the EMA saved in {folder!r}")
        return averages

    def has_checkpoint(self, folder: str) -> bool:
        """Whether ``folder`` holds EMA state saved by this SEMA (its own files, `state_folder`; this process's
        view, no collective)."""
        return has_ema_checkpoint(state_folder(folder, self.name))

    def posthoc_sweep(
        self,
        evaluate: Callable[[], float | Mapping[str, float]],
        grid: Sequence[str | Mapping[str, Any] | selection.Target] | None = None,
        *,
        metric: str | None = None,
        greater_is_better: bool = False,
        extra: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        descriptions: Mapping[str, str] | None = None,
        data: str = "",
    ) -> selection.PosthocSweep:
        """Score the raw weights, the classic EMA and every post-hoc target of ``grid`` with ``evaluate`` and
        return the table (`sema_hf.selection.PosthocSweep`; ``.chosen`` is the best row's label). Changes nothing:
        the model holds its raw weights afterwards; ``finalize(posthoc=table)`` puts the chosen weights in.

        Args:
            evaluate: a function of no argument that scores what the model holds now: a number, or a dict of
                metrics of which ``metric`` is the score (``Trainer.evaluate``-like; every metric is kept in the
                table). It runs once per candidate, on every rank (give every rank the same numbers:
                ``accelerator.gather_for_metrics``); rank 0's choice is taken by every rank.
            grid: post-hoc targets (``"sigma_rel=0.07"``, ``"horizon_epochs=1"``, ``"horizon_steps=500"``, or
                dicts such as ``{"sigma_rel": 0.07}``); default: ``config.posthoc_grid``, else
                `sema_hf.selection.default_grid` around the tracked profiles.
            metric: the key of ``evaluate``'s dict to rank by (the table's name for a plain number; default
                ``config.posthoc_select``, else ``"score"``).
            greater_is_better: the direction of ``metric`` (lower is better by default).
            extra: further candidates, this rank's tensors by label (e.g. a checkpoint's `read_averages`).
            descriptions: a row's "what it is" by label, replacing the default text.
            data: what the scores were measured on, for the table (e.g. ``"validation split, 2000 examples"``).

        Ties go to the raw weights, then the classic EMA, then the grid in order: an average is chosen only when
        it scores strictly better. A target the snapshots do not reach (`sema_hf.posthoc`: fit error over 5%, too
        few snapshots) is left out of the default grid; one the caller listed stays in the table, with no score
        (NaN) and the reason in ``fit["error"]``, and a warning. Every rank must call this (each candidate is swapped in, a collective under
        sharded engines).
        """
        self._refuse_while_swapped("posthoc_sweep()")
        self._fresh_if_pending()
        metric = metric or self.config.posthoc_select or "score"
        chosen_grid = grid is not None or self.config.posthoc_grid is not None
        targets = self._posthoc_targets(grid)
        texts = dict(descriptions or {})
        rows: list[selection.SweepRow] = []

        def score(label: str, kind: str, description: str, **row: Any) -> None:
            found = evaluate()
            metrics = {k: float(v) for k, v in found.items()} if isinstance(found, Mapping) else {}
            if isinstance(found, Mapping):
                if metric not in metrics:
                    raise KeyError(
                        f"SEMA.posthoc_sweep ranks by metric = {metric!r}, but evaluate() returned no such key; "
                        f"available: {sorted(metrics)}. Pass metric= (posthoc_select) naming one of them."
                    )
                value = metrics[metric]
            else:
                value = float(found)
            rows.append(selection.SweepRow(label, kind, value, texts.get(label, description), metrics=metrics, **row))

        score(selection.RAW, selection.RAW, "the weights the model holds (the raw training weights)")
        with self.swapped_in():
            score(
                selection.EMA,
                selection.EMA,
                f"the classic EMA (decay {self.resolved.decay:.6g})",
                horizon_steps=self.resolved.horizon_steps,
            )
        for label, averages in (extra or {}).items():
            with self.swapped_in(averages):
                score(label, "average", "an average given to the sweep")
        for target in targets:
            try:
                averages, report = self.posthoc_average(**target.as_kwargs())
            except ValueError as err:  # out of the snapshots' reach (the same on every rank: the fit is global)
                if not chosen_grid:
                    logger.info(f"SEMA: the default post-hoc grid's {target.label} is out of reach: {err}")
                    continue
                message = f"SEMA: posthoc_grid's {target.label} cannot be reconstructed, so it is not compared: {err}"
                logger.warning(message)
                warnings.warn(message, UserWarning, stacklevel=2)
                rows.append(
                    selection.SweepRow(
                        target.label,
                        target.kind,
                        math.nan,
                        f"post-hoc average, {target.kind} {target.value:g}: out of reach",
                        value=target.value,
                        fit={"error": str(err)},
                    )
                )
                continue
            with self.swapped_in(averages):
                score(
                    target.label,
                    target.kind,
                    f"post-hoc average, {target.kind} {target.value:g}",
                    value=target.value,
                    horizon_steps=selection.horizon_steps_of(target, self.global_step, self.steps_per_epoch),
                    fit=report.to_dict(),
                )
            del averages
        best = _rank0_index(selection.choose([row.score for row in rows], greater_is_better))
        sweep = selection.PosthocSweep(
            metric=metric,
            greater_is_better=greater_is_better,
            rows=rows,
            chosen=rows[best].label,
            step=self.global_step,
            data=data,
            steps_per_epoch=self.steps_per_epoch,
        )
        self.last_posthoc_sweep = sweep
        return sweep

    def _posthoc_targets(self, grid: Any) -> list[selection.Target]:
        if grid is None:
            grid = self.config.posthoc_grid
        if grid is not None:
            return selection.parse_grid(grid)
        total = self.global_step or None
        return selection.default_grid(
            getattr(self.config, "posthoc_sigma_rels", None) or (), self.steps_per_epoch, total
        )

    def state_dict(self) -> dict[str, Any]:
        """The counters (no tensors). For ``accelerator.register_for_checkpointing(sema)``, which pickles it from
        the main process only: that is harmless but not needed, since ``SEMA(..., accelerator)`` already rides
        along with ``save_state`` / ``load_state`` (the averages of every rank, in safetensors files)."""
        return {"format": "sema-hf-loop/1", **self._counters()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The counterpart of `state_dict` for ``register_for_checkpointing``: accelerate calls it after the
        load-state hook has restored the averages and counters, so it only checks that both agree."""
        if not self._hooks:
            raise RuntimeError(
                "SEMA.load_state_dict: the averages cannot be restored from accelerate's pickled custom state "
                "(it is written by the main process only). Pass the accelerator, SEMA(model, optimizer, accelerator), "
                "so that accelerator.load_state restores them from their safetensors files."
            )
        saved = {k: v for k, v in state.items() if k != "format"}
        if not self._fresh_pending and saved != self._counters():
            raise RuntimeError(
                f"SEMA: the registered checkpoint's counters {saved} differ from those restored with the averages "
                f"{self._counters()}; the folder mixes files of two saves."
            )

    # ---- the loop's events ------------------------------------------------------------------------------------
    def step(
        self,
        *,
        score_raw: float | None = None,
        score_average: float | None = None,
        evaluate: Callable[[], float] | None = None,
        greater_is_better: bool = False,
    ) -> bool:
        """Call after every iteration of the loop (after ``optimizer.step()``). Returns whether this iteration was
        an optimizer step. With an accelerator it is one when ``accelerator.sync_gradients`` (the last micro-batch
        of an accumulation); a step that ``accelerator.optimizer_step_was_skipped`` (fp16 overflow) counts as a
        step but does not update the average, as in the Trainer. The scores are used only at a step-counted switch
        point (``switch_every_steps``) under ``switch_policy="if_better"``; see `epoch_end`."""
        self._refuse_while_swapped("step()")
        self._refuse_moved_tensors("step()")
        accelerator = self.accelerator
        if accelerator is not None and not accelerator.sync_gradients:
            return False
        skipped = accelerator is not None and bool(accelerator.optimizer_step_was_skipped)
        self.advance(self.global_step + 1, stepped=not skipped)
        if self.config.switch and schedule.should_switch_at_step(
            self.global_step, self.config.switch_every_steps, self.config.update_after_step
        ):
            self._switch_point(score_raw, score_average, evaluate, greater_is_better)
        return True

    def epoch_end(
        self,
        score_raw: float | None = None,
        score_average: float | None = None,
        evaluate: Callable[[], float] | None = None,
        *,
        greater_is_better: bool = False,
    ) -> bool:
        """Call once at the end of every epoch: the epoch switch point. Returns whether the average was copied in.

        With ``switch_policy="if_better"`` the average is copied in only when it scores better: give both scores
        (``score_raw`` of the raw weights, ``score_average`` of the average, e.g. evaluation losses; lower is better
        unless ``greater_is_better``) or ``evaluate``, a function of no argument returning the score of whatever the
        model holds (called once as is and once inside `swapped_in`). Under several processes rank 0's decision is
        taken by every rank (one broadcast), so give every rank the same scores (``accelerator.gather_for_metrics``).
        """
        self._refuse_while_swapped("epoch_end()")
        self._refuse_moved_tensors("epoch_end()")
        self.epochs_completed += 1
        cfg = self.config
        if not (
            cfg.switch
            and cfg.switch_every_steps is None
            and schedule.should_switch_at_epoch_end(
                self.epochs_completed, cfg.switch_every_epochs, cfg.switch_start_epoch
            )
        ):
            return False
        return self._switch_point(score_raw, score_average, evaluate, greater_is_better)

    def finalize(
        self,
        score_raw: float | None = None,
        score_average: float | None = None,
        evaluate: Callable[[], float] | None = None,
        *,
        greater_is_better: bool = False,
        posthoc: selection.PosthocSweep | selection.SweepRow | str | None = None,
    ) -> str:
        """At the end of training: leave in the model the weights ``final_weights`` names, and return which
        (``"ema"`` or ``"model"``). Under ``switch_policy="if_better"`` the average stays out unless it won: the last
        switch point's decision when no step followed it, else give scores or ``evaluate`` as for `epoch_end`.

        ``posthoc``: put the weights a post-hoc selection chose in instead, and ignore ``final_weights`` and
        ``if_better``: a `posthoc_sweep` table (its chosen row), one of its rows, or a label (``"raw"`` keeps the
        raw weights and returns ``"model"``, ``"ema"`` switches the classic EMA in, a target such as
        ``"sigma_rel=0.07"`` writes its post-hoc average and returns ``"posthoc"``). ``posthoc_chosen`` records
        the label."""
        self._refuse_while_swapped("finalize()")
        self._refuse_moved_tensors("finalize()")
        self._fresh_if_pending()
        self.posthoc_snapshot()  # the last step's snapshot (the profiles follow training, not the final weights)
        if posthoc is not None:
            return self._finalize_posthoc(posthoc)
        final = self.config.final_weights
        if final == "ema" and self.config.switch_policy == "if_better":
            if self.steps_since_decision == 0 and self.last_switch_decision is not None:
                better = self.last_switch_decision
            else:
                better = self._average_wins(score_raw, score_average, evaluate, greater_is_better, "finalize()")
            final = "ema" if better else "model"
        if final == "ema":
            self.write_average()
        self.final_weights_held = final
        return final

    def _finalize_posthoc(self, posthoc: selection.PosthocSweep | selection.SweepRow | str) -> str:
        if isinstance(posthoc, selection.PosthocSweep):
            label = posthoc.chosen
        elif isinstance(posthoc, selection.SweepRow):
            label = posthoc.label
        else:
            label = str(posthoc)
        if label == selection.RAW:
            final = "model"
        elif label == selection.EMA:
            self.write_average()
            final = "ema"
        else:
            try:
                target = selection.parse_target(label)
            except ValueError:
                raise ValueError(
                    f"SEMA.finalize(posthoc={label!r}): not a label finalize can put in: expected 'raw', 'ema' or a "
                    "post-hoc target such as 'sigma_rel=0.07' (a row the sweep got through extra= is the caller's "
                    "to write, with write_weights)."
                ) from None
            averages, _ = self.posthoc_average(**target.as_kwargs())
            self.write_weights(averages)
            del averages
            final = "posthoc"
        self.posthoc_chosen = label
        self.final_weights_held = final
        return final

    # ---- the rules, shared with the Trainer's front-end -------------------------------------------------------
    def advance(self, step: int, stepped: bool) -> None:
        """Optimizer step ``step`` (1 for the first) happened; ``stepped``: it changed the weights (not skipped)."""
        self.global_step = step
        if not stepped:
            if self.profiles is not None:  # the weights after this step are the previous ones: still step ``step``
                self._update_profiles(step, None)
            return
        self._fresh_if_pending()
        cfg = self.config
        action = schedule.ema_action(step, cfg.update_every, cfg.update_after_step)
        ema_weight: float | None = None  # the classic EMA's share in the profiles' pass (None: not updated)
        if action is schedule.EMAAction.COPY:
            self.store.reset()
            self.last_decay = 0.0
        elif action is schedule.EMAAction.UPDATE:
            decay = schedule.effective_decay(
                step, self.resolved.decay, cfg.warmup, self.warmup_steps, cfg.warmup_ratio, cfg.update_every
            )
            if self.profiles is None:
                self.store.update(decay)
            else:  # one pass over the weights for the classic EMA and the profiles
                ema_weight = 1.0 - decay
            self.num_updates += 1
            self.last_decay = decay
        if self.profiles is not None:
            self._update_profiles(step, ema_weight)
        self.steps_since_decision += 1

    def _update_profiles(self, step: int, ema_weight: float | None) -> None:
        assert self.profiles is not None
        if self._profiles_fresh_pending:
            self._profiles_fresh_pending = False
            if step > 1:
                self.profiles.reset(step - 1)
        self.profiles.update(step, ema_weight)
        every = self.config.posthoc_every_steps
        if every is not None and step % every == 0:
            self._posthoc_snapshot(step)

    def write_average(self) -> None:
        """Copy the classic average into the model for good, as a switch does (not counted as one): what `finalize`
        does for ``final_weights="ema"``, for a front-end that decides the final weights itself (the Trainer's
        callback at train end). Every rank must call it."""
        self._refuse_while_swapped("write_average()")
        self._fresh_if_pending()
        self.store.switch()

    def decide_switch(self, better: bool) -> dict[str, float]:
        """Record a switch point's decision; copy the average in when ``better``. Returns what to log."""
        self.last_switch_decision = better
        self.steps_since_decision = 0
        if better:
            self.store.switch()
            self.num_switches += 1
        return {"ema_switches": float(self.num_switches), "ema_switched": float(better)}

    def _switch_point(
        self,
        score_raw: float | None,
        score_average: float | None,
        evaluate: Callable[[], float] | None,
        greater_is_better: bool,
    ) -> bool:
        if self.config.switch_policy == "if_better":
            better = self._average_wins(score_raw, score_average, evaluate, greater_is_better, "a switch point")
        else:
            better = True
        self.decide_switch(better)
        return better

    def _average_wins(
        self,
        score_raw: float | None,
        score_average: float | None,
        evaluate: Callable[[], float] | None,
        greater_is_better: bool,
        where: str,
    ) -> bool:
        if evaluate is not None:
            score_raw = float(evaluate())
            with self.swapped_in():
                score_average = float(evaluate())
        if score_raw is None or score_average is None:
            raise ValueError(
                f"SEMA(switch_policy='if_better') reached {where} (step {self.global_step}, epoch "
                f"{self.epochs_completed}) without the scores it decides on: pass score_raw= and score_average= (the "
                "raw weights' and the average's evaluation, lower is better unless greater_is_better=True), or "
                "evaluate= (a function returning the score of what the model holds)."
            )
        better = score_average > score_raw if greater_is_better else score_average < score_raw
        return _rank0_decision(better)

    # ---- post-hoc EMA -----------------------------------------------------------------------------------------
    def posthoc_snapshot(self) -> int | None:
        """Write a snapshot of the post-hoc profiles at the current step unless one exists (every rank must call
        it: one barrier); `finalize` and the Trainer's train end call it. Returns the step, or None when post-hoc
        EMA is off or no step was taken yet."""
        if self.profiles is None or self.profiles.t < 1:
            return None
        self._posthoc_snapshot(self.profiles.t)
        return self.profiles.t

    def posthoc_average(
        self,
        sigma_rel: float | None = None,
        horizon_steps: float | None = None,
        horizon_epochs: float | None = None,
        *,
        max_fit_error: float | None = posthoc.DEFAULT_MAX_FIT_ERROR,
    ) -> tuple[dict[str, torch.Tensor], posthoc.FitReport]:
        """The post-hoc average for one target (exactly one of ``sigma_rel``, ``horizon_steps``,
        ``horizon_epochs``; `sema_hf.posthoc`) at the current step, from every snapshot written so far (a snapshot
        of the current step is written first): THIS rank's shard only, keyed like ``sema.store.state_dict()``,
        fp32, combined from this rank's own files with the same weights on every rank (nothing is gathered).
        Every rank must call it. Returns the tensors and the `posthoc.FitReport`."""
        if self.profiles is None or self.posthoc_dir is None:
            raise RuntimeError(
                "SEMA.posthoc_average needs post-hoc tracking: set posthoc_every_steps (and posthoc_dir)."
            )
        if self.posthoc_snapshot() is None:
            raise RuntimeError(
                "SEMA.posthoc_average: no optimizer step was taken yet, so there is nothing to average."
            )
        index = self._posthoc_index(self.posthoc_steps)
        target = posthoc.target_of(index, sigma_rel, horizon_steps, horizon_epochs, None)
        report = posthoc.fit_index(index, target, max_fit_error)
        layout = self.engine.layout()
        tensors: dict[str, torch.Tensor] = {}
        error: BaseException | None = None
        try:
            tensors = posthoc.combine(
                self.posthoc_dir, index, report, layout.rank if layout.sharded else 0, self.store.names
            )
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, then it is raised
            error = err
        raise_if_any_rank_failed(error, f"combine the post-hoc snapshots in {self.posthoc_dir!r}")
        logger.info(f"SEMA: post-hoc EMA {report}")
        return tensors, report

    def _posthoc_index(self, steps: list[int]) -> dict[str, Any]:
        layout = self.engine.layout()
        return {
            "series_id": self.posthoc_series_id,
            "engine": layout.engine,
            "sharded": layout.sharded,
            "world_size": layout.world_size,
            "num_shards": layout.world_size if layout.sharded else 1,
            "params": layout.params,
            "fingerprint": layout_fingerprint(layout),
            "steps_per_epoch": self.resolved.steps_per_epoch,
            "dtype": self.config.posthoc_dtype,
            "profiles": [
                {"sigma_rel": s, "gamma": g}
                for s, g in zip(self.config.posthoc_sigma_rels, self.posthoc_gammas, strict=True)
            ],
            "steps": sorted(steps),
        }

    def _posthoc_writer(self, layout: Any) -> bool:
        writer = self._writer()
        return layout.rank == 0 if writer is None else writer

    def _posthoc_snapshot(self, step: int) -> None:
        assert self.profiles is not None and self.posthoc_dir is not None
        if step in self.posthoc_steps:
            return
        layout = self.engine.layout()
        if not self._posthoc_folder_checked:
            error: BaseException | None = None
            try:
                self._check_posthoc_folder()
            except Exception as err:  # noqa: BLE001 - every rank must hear of it, then it is raised
                error = err
            raise_if_any_rank_failed(error, f"write post-hoc snapshots into {self.posthoc_dir!r}")
            self._posthoc_folder_checked = True
        posthoc.write_snapshot(
            self.posthoc_dir,
            step,
            self.profiles.state_dict(),
            layout,
            self._posthoc_index([*self.posthoc_steps, step]),
            dtype=getattr(torch, self.config.posthoc_dtype),
            writer=self._posthoc_writer(layout),
        )
        self.posthoc_steps.append(step)

    def _check_posthoc_folder(self) -> None:
        """Refuse to mix two runs' snapshots in one folder: an index there must be this series'."""
        assert self.posthoc_dir is not None
        path = os.path.join(self.posthoc_dir, posthoc.INDEX_NAME)
        if not os.path.isfile(path):
            return
        index = posthoc.read_index(self.posthoc_dir)
        if index.get("series_id") != self.posthoc_series_id:
            raise ValueError(
                f"SEMA: {self.posthoc_dir!r} already holds the post-hoc snapshots of another run (series "
                f"{index.get('series_id')!r}, steps {index.get('steps')}); this run would mix its snapshots with "
                "them. Give this run its own output_dir / posthoc_dir, remove the old snapshots, or resume that run "
                "from its checkpoint."
            )

    def _posthoc_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The profiles' tensors (named ``posthoc<k>/<slot>``) and the JSON entry for a checkpoint."""
        assert self.profiles is not None
        tensors = {
            posthoc.profile_key(k, name): t
            for k, averages in enumerate(self.profiles.state_dict())
            for name, t in averages.items()
        }
        meta = {
            "series_id": self.posthoc_series_id,
            "t": self.profiles.t,
            "sigma_rels": list(self.config.posthoc_sigma_rels),
            "steps": list(self.posthoc_steps),
        }
        return tensors, meta

    def _restore_posthoc(self, tensors: dict[str, torch.Tensor], saved: dict[str, Any] | None, folder: str) -> None:
        """After a checkpoint's averages were read: restore the profiles and the snapshot list of a resumed run, and
        remove the snapshots a killed run wrote after this checkpoint (they will be written again)."""
        assert self.profiles is not None and self.posthoc_dir is not None
        if self.profiles.t > 0:
            # This core has tracked already (e.g. the Trainer loading the best checkpoint at train end): the
            # classic EMA is restored; the profiles and snapshots of this run stay as they are.
            return
        if saved is None:
            if not self.config.allow_fresh_ema_on_resume:
                raise ValueError(
                    f"SEMA: the checkpoint {folder!r} holds no post-hoc EMA state (saved without "
                    "posthoc_every_steps), so the profiles cannot continue. Resume with posthoc_every_steps=None, or "
                    "pass allow_fresh_ema_on_resume=True to restart them from the restored weights."
                )
            logger.warning(f"SEMA: no post-hoc state in {folder!r}; the profiles restart from the restored weights.")
            self._profiles_fresh_pending = True
            return
        states = [
            {name: tensors[posthoc.profile_key(k, name)] for name in self.store.names}
            for k in range(len(self.posthoc_gammas))
        ]
        self.profiles.load_state_dict(states, int(saved["t"]))
        self.posthoc_series_id = saved["series_id"]
        self.posthoc_steps = [int(s) for s in saved["steps"] if int(s) <= self.profiles.t]
        layout = self.engine.layout()
        writer = self._posthoc_writer(layout)
        removed: list[int] = []
        error: BaseException | None = None
        try:  # a failure on one rank is raised on every rank (no rank waits for it), as for checkpoint writes
            removed = posthoc.remove_snapshots_after(self.posthoc_dir, self.profiles.t, layout, writer=writer)
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, then it is raised
            error = err
        raise_if_any_rank_failed(error, f"remove the post-hoc snapshots written after {folder!r}")
        if writer and os.path.isdir(self.posthoc_dir):
            try:
                posthoc.write_index(self.posthoc_dir, self._posthoc_index(self.posthoc_steps))
            except Exception as err:  # noqa: BLE001 - every rank must hear of it, then it is raised
                error = err
        raise_if_any_rank_failed(error, f"rewrite {posthoc.INDEX_NAME} in {self.posthoc_dir!r}")
        self._posthoc_folder_checked = True
        if removed:
            logger.info(f"SEMA: removed the post-hoc snapshots of steps {removed}, written after {folder!r}.")

    # ---- checkpoints ------------------------------------------------------------------------------------------
    @property
    def checkpoint_id(self) -> str:
        """``"<run id>:<global step>"``: the identity of the EMA saved now (the callback records it in the Trainer's
        state too, to prove on resume that the EMA belongs to the checkpoint; `sema_hf.resume`)."""
        return f"{self.run_id}:{self.global_step}"

    def save(self, folder: str, *, writer: bool | None = None) -> None:
        """Write this rank's average and the counters into ``folder`` (the callback's file format: one safetensors
        file per shard and ``sema_state.json``; in the subfolder ``sema_<name>/`` for a named SEMA, `state_folder`).
        Every rank must call it; ``accelerator.save_state`` does. ``writer``: whether this process writes the files
        needed once (default: accelerate's main process, or each node's first with ``save_on_each_node``; rank 0
        without an accelerator)."""
        self._fresh_if_pending()
        meta = {
            "name": self.name,
            "global_step": self.global_step,
            "checkpoint_id": self.checkpoint_id,
            "checkpoint_dir": os.path.abspath(folder),
            **self._counters(),
            "config": self.config.to_dict(),
        }
        writer = self._writer() if writer is None else writer
        averages, layout = self.store.state_dict(), self.engine.layout()
        if self.profiles is not None:
            tensors, meta["posthoc"] = self._posthoc_checkpoint()
            averages, layout = {**averages, **tensors}, _with_profiles(layout, len(self.posthoc_gammas))
        _save_ema_checkpoint(state_folder(folder, self.name), averages, layout, meta, writer=writer)

    def load(self, folder: str, *, allow_fresh: bool | None = None) -> dict[str, Any]:
        """Restore the average and the counters saved in ``folder`` (by `save`, ``accelerator.save_state`` or the
        callback), re-sharding when the world size or the engine differs. Only this SEMA's own files are read (those
        of its ``name``, `state_folder`), and the name recorded with them must be its own. Every rank must call it.
        An error on any rank (no EMA state, a damaged shard, another model) is raised on every rank.

        A folder without EMA state is an error, unless ``allow_fresh`` (default: ``allow_fresh_ema_on_resume``):
        then SEMA starts over as if it were made at this point: every counter restarts from zero (``global_step``,
        ``epochs_completed``, ``num_updates``, ``num_switches``), so the decay warmup runs again from its first
        step (``m_1``, not ``m_t`` of the step reached before) and the next step-counted switch comes
        ``switch_every_steps`` steps after the load, and the average restarts as a copy of the weights at the next
        `step` (or `swapped_in`, `ema_state_dict`, `save`, whichever comes first: under
        ``accelerator.load_state`` this runs before the weights are loaded). The loop's own step count lives in
        SEMA only, so nothing else could tell it where the loaded run stood.

        Refused inside `swapped_in` (the model holds the average there)."""
        self._refuse_while_swapped("load()")
        allow_fresh = self.config.allow_fresh_ema_on_resume if allow_fresh is None else allow_fresh
        own = state_folder(folder, self.name)
        missing = not has_ema_checkpoint(own)
        if _any_rank(missing):
            if allow_fresh:
                logger.warning(
                    f"SEMA: no EMA state in {own!r}; the average restarts from the weights at the next step, "
                    "with the counters (decay warmup, step-counted switches, epochs) from zero."
                )
                self._reset_counters()
                self._fresh_pending = True
                self._profiles_fresh_pending = self.profiles is not None and self.profiles.t == 0
                return {}
            error: BaseException | None = (
                FileNotFoundError(
                    f"No SEMA EMA state in {own!r} (no {STATE_NAME}){_names_in(folder, self.name)}: it was saved "
                    "without SEMA, before SEMA(..., accelerator) existed, or by a SEMA of another name. Load a "
                    "folder saved with it, or pass allow_fresh_ema_on_resume=True to restart the average from the "
                    "restored weights."
                )
                if missing
                else None
            )
            raise_if_any_rank_failed(error, f"find the EMA state in {own!r}")
        averages: dict[str, torch.Tensor] = {}
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {}
        error = None
        saved_posthoc: dict[str, Any] | None = None
        try:
            saved_posthoc = read_ema_state(own).get("posthoc")
            tracked = self.profiles is not None and saved_posthoc is not None
            if tracked and [float(s) for s in saved_posthoc["sigma_rels"]] != list(self.config.posthoc_sigma_rels):
                raise ValueError(
                    f"SEMA: the checkpoint {own!r} tracked posthoc_sigma_rels {saved_posthoc['sigma_rels']}, "
                    f"this run {list(self.config.posthoc_sigma_rels)}: resume with the same profiles."
                )
            averages, tensors, meta = self._read_saved(own, len(self.posthoc_gammas) if tracked else 0)
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, then it is raised
            error = err
        raise_if_any_rank_failed(error, f"restore the EMA from {folder!r}")
        self.store.load_state_dict(averages)
        self.global_step = meta["global_step"]
        self.num_updates = meta["num_updates"]
        self.num_switches = meta["num_switches"]
        self.last_decay = meta["last_decay"]
        self.last_switch_decision = meta.get("last_switch_decision")
        self.steps_since_decision = meta.get("steps_since_decision", 0)
        self.epochs_completed = meta.get("epochs_completed", 0)
        self._fresh_pending = False
        if self.profiles is not None:
            error = None
            try:
                self._restore_posthoc(tensors, saved_posthoc, folder)
            except Exception as err:  # noqa: BLE001 - every rank must hear of it, then it is raised
                error = err
            raise_if_any_rank_failed(error, f"restore the post-hoc EMA from {folder!r}")
        return meta

    def _read_saved(
        self, own: str, num_profiles: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        """This rank's part of what this SEMA saved in ``own`` (`state_folder`), re-sharded to this run's layout:
        the classic EMA (checked against the store), every tensor read (with those of ``num_profiles`` post-hoc
        profiles saved beside it) and the saved metadata, whose name must be this SEMA's."""
        layout = self.engine.layout()
        if num_profiles:
            layout = _with_profiles(layout, num_profiles)
        tensors, meta = load_ema_checkpoint(own, layout)
        if meta.get("name") != self.name:
            raise ValueError(
                f"SEMA: {os.path.join(own, STATE_NAME)} holds the average named {meta.get('name')!r}, and "
                f"this SEMA is named {self.name!r}: the files were moved or copied between averages."
            )
        averages = {n: t for n, t in tensors.items() if not _PROFILE_KEY.match(n)}
        self.store.check_state_dict(averages)
        return averages, tensors, meta

    def remove_hooks(self) -> None:
        """Stop riding along with ``accelerator.save_state`` / ``load_state`` (e.g. before making another SEMA of
        the same name on the same accelerator)."""
        if self._hooks:
            _NAMES_ON_ACCELERATOR.get(self.accelerator, set()).discard(self.name)
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _refuse_taken_name(self, accelerator: Any) -> None:
        """Two SEMA riding along with one accelerator's ``save_state`` under one name would write the same files,
        and each ``load_state`` would hand both the last one written: refuse the second."""
        if self.name not in _NAMES_ON_ACCELERATOR.get(accelerator, set()):
            return
        which = "an unnamed SEMA" if self.name is None else f"a SEMA named {self.name!r}"
        raise ValueError(
            f"SEMA: this accelerator already has {which}, whose averages accelerator.save_state writes into the "
            f"same files ({state_folder('<folder>', self.name)}/sema_state.json). Give each SEMA its own name, "
            "e.g. SEMA(student, ..., name='student') and SEMA(teacher, ..., name='teacher'), or call "
            "remove_hooks() on the one that is no longer used."
        )

    def _save_state_hook(self, models: list, weights: list, output_dir: str) -> None:
        if self._swapped:
            raise RuntimeError(
                "accelerator.save_state() was called inside sema.swapped_in(): the model holds the average, and the "
                "checkpoint would resume from it as if it were the raw weights. Save outside the block."
            )
        self.save(output_dir)

    def _load_state_hook(self, models: list, input_dir: str) -> None:
        if self._swapped:
            raise RuntimeError(
                "accelerator.load_state() was called inside sema.swapped_in(): the model holds the average there, "
                "and leaving the block would copy the pre-swap raw weights over the loaded ones, while SEMA's "
                "average and counters would be the loaded checkpoint's. Load outside the block."
            )
        self.load(input_dir)

    def _writer(self) -> bool | None:
        """The process that writes what every node needs once: accelerate's main process, or each node's first
        process with ``ProjectConfiguration(save_on_each_node=True)``."""
        accelerator = self.accelerator
        if accelerator is None:
            return None
        project = getattr(accelerator, "project_configuration", None)
        if project is not None and getattr(project, "save_on_each_node", False):
            return bool(accelerator.is_local_main_process)
        return bool(accelerator.is_main_process)

    # ---- internals --------------------------------------------------------------------------------------------
    def _reset_counters(self) -> None:
        self.global_step = 0  # optimizer steps seen (skipped ones included, as the Trainer counts them)
        self.epochs_completed = 0
        self.num_updates = 0
        self.num_switches = 0
        self.last_decay: float | None = None
        self.last_switch_decision: bool | None = None
        self.steps_since_decision = 0

    def _counters(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "epochs_completed": self.epochs_completed,
            "num_updates": self.num_updates,
            "num_switches": self.num_switches,
            "last_decay": self.last_decay,
            "last_switch_decision": self.last_switch_decision,
            "steps_since_decision": self.steps_since_decision,
        }

    def _refuse_while_swapped(self, what: str) -> None:
        if self._swapped:
            raise RuntimeError(
                f"SEMA.{what} was called inside sema.swapped_in(): the model holds the average there, and training "
                "must continue from the raw weights. Leave the block first."
            )

    def _refuse_moved_tensors(self, what: str) -> None:
        """Refuse to go on when the model was moved or cast after SEMA was made (see `sema_hf.engines.local`:
        a metadata check, no kernel, no host sync). Refused rather than followed: the average of the old tensors
        would be re-bound to new ones of another dtype or device, and a switch already written into the old ones
        would be lost; making SEMA after the move is the one order that is right on every engine."""
        check = getattr(self.engine, "moved_tensors", None)
        moved = check() if check is not None else []
        if moved:
            shown = "; ".join(moved[:5]) + (f"; and {len(moved) - 5} more" if len(moved) > 5 else "")
            raise RuntimeError(
                f"SEMA.{what}: {len(moved)} averaged tensor(s) of the model were moved or cast after SEMA was made "
                f"({shown}). SEMA would keep averaging, and switch into, tensors the model no longer uses. Make "
                "SEMA(...) after the model is moved or cast (after accelerator.prepare, .to(device), .half()...)."
            )

    def _fresh_if_pending(self) -> None:
        if self._fresh_pending:
            self._fresh_pending = False
            self.store.reset()

    def _check_every_rank_enters(self, what: str) -> None:
        """Where entering the swap is a collective, make sure every rank came (a gloo monitored barrier with a
        timeout), so that a swap on one rank only fails with this message instead of hanging."""
        if self._entry_group is None:
            return
        try:
            dist.monitored_barrier(
                group=self._entry_group, timeout=timedelta(seconds=self.swap_entry_timeout_s), wait_all_ranks=True
            )
        except RuntimeError as err:
            raise RuntimeError(
                f"SEMA.{what} under {self.engine.name} is a collective (it gathers the average from every rank's "
                f"shard), but not every rank entered it within {self.swap_entry_timeout_s:g} s: call it on every "
                f"rank, not under `if accelerator.is_main_process`. ({err})"
            ) from err


_PROFILE_KEY = re.compile(r"^posthoc\d+/")


def _with_profiles(layout: Layout, num_profiles: int) -> Layout:
    """``layout`` extended by the post-hoc profiles' tensors (``posthoc<k>/<slot>``, placed like their slots), so
    that the checkpoint code saves, checks and re-shards them with the EMA."""
    slots = list(layout.slots) + [
        (posthoc.profile_key(k, name), shape) for k in range(num_profiles) for name, shape in layout.slots
    ]
    extra = dict(layout.extra)
    if "pieces" in extra:
        extra["pieces"] = list(extra["pieces"]) + [
            [posthoc.profile_key(k, name), a, b] for k in range(num_profiles) for name, a, b in extra["pieces"]
        ]
    return dataclasses.replace(layout, slots=slots, extra=extra)


def _names_in(folder: str, name: str | None) -> str:
    """For the error of a load that finds no files of this name: the names whose files the folder holds."""
    try:
        found = [None] if has_ema_checkpoint(folder) else []
        found += sorted(
            entry[len("sema_") :]
            for entry in os.listdir(folder)
            if entry.startswith("sema_") and has_ema_checkpoint(os.path.join(folder, entry))
        )
    except OSError:
        return ""
    if not found:
        return ""
    return f"; the folder holds the averages named {found} (None: unnamed), this SEMA is named {name!r}"


def loop_warmup_steps(config: SEMAConfig, steps_per_epoch: int | None) -> int:
    """The decay warmup's length in optimizer steps: ``warmup_steps``, else one epoch; refuse what needs an epoch's
    length the loop did not give (``ValueError`` naming the fix)."""
    needs_epoch = config.decay is None and config.horizon_steps is None
    if steps_per_epoch is None and needs_epoch:
        epochs = DEFAULT_HORIZON_EPOCHS if config.horizon_epochs is None else config.horizon_epochs
        given = "" if config.horizon_epochs is not None else " (the default, as no decay or horizon was given)"
        raise ValueError(
            f"SEMA: horizon_epochs = {epochs}{given} needs the length of an epoch: pass steps_per_epoch= (the "
            "training dataloader, or its optimizer steps per epoch as an int), or give horizon_steps= or decay=."
        )
    if config.warmup == "none":
        return 0
    if config.warmup_steps is not None:
        return config.warmup_steps
    if steps_per_epoch is None:
        raise ValueError(
            "SEMA's decay warmup defaults to one epoch, but the epoch's length is unknown: pass steps_per_epoch= "
            "(the training dataloader, or an int), set warmup_steps= (optimizer steps), or warmup='none'."
        )
    return steps_per_epoch


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _flag_tensor(value: int) -> torch.Tensor:
    flag = torch.tensor([value], dtype=torch.int64)
    return flag.cuda() if dist.get_backend() == "nccl" else flag


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (one all-reduce of one integer; the local flag in one process)."""
    if not _distributed():
        return flag
    t = _flag_tensor(int(flag))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _rank0_decision(better: bool) -> bool:
    """Rank 0's switch decision on every rank: ranks that switched differently would hold different weights."""
    return bool(_rank0_index(int(better)))


def _rank0_index(index: int) -> int:
    """Rank 0's choice (a row of a sweep, a switch decision) on every rank: one broadcast of one integer; ranks
    that chose differently would hold different weights."""
    if not _distributed():
        return index
    t = _flag_tensor(index)
    dist.broadcast(t, src=0)
    return int(t.item())


def _entry_check_group(engine: EngineAdapter) -> Any | None:
    """A gloo group for `SEMA._check_every_rank_enters`, where swapping the average in is a collective while the
    model's own forward is not (``shard_under_ddp``, ZeRO-1/2). Made at setup, when every rank is here."""
    if not _distributed() or not getattr(engine, "swap_is_collective", False):
        return None
    # Its own group: a monitored barrier that times out closes its connections, which must not be the training's.
    return dist.new_group(backend="gloo")
