"""
What every run does around its training loop, written once: the run's lifecycle as one object
(start_run -> Run: resume, named sums, the end of a step, log, save, finish), which the train
scripts call in loop order, and what only it uses: the lock and init_from on out_dir, RNG state,
keep_last, metrics.csv (and wandb), stop signals and the per-step stop vote, non-finite update
counting, the ranks' heartbeat, and the speed and memory it logs.

Each function takes what it needs as arguments and reads no script's globals; every error is one
line that names the value and the fix (a SystemExit, so no traceback reaches the user).
"""
import contextlib
import csv
import ctypes
import errno
import glob
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import sys
import threading
import time

from common import (FORMAT, check_writable, checksum, load_checkpoint, load_state,  # (first: its excepthook)
                    lock_out_dir, own_folder, replacing, seeded, write_file)
import numpy as np
import torch
import torch.distributed as dist


# what every kit checkpoint says of a run that went wrong: the one spelling of the fix
FIX = "resume it with a lower lr, grad_clip or dtype='float32'"


def start_run(config, kind, device, inputs=(), fixed=()):
    """Starts the run a train script's config describes, after the script's torchrun setup: a Run.
    Its side effects, here and nowhere else (but the import's excepthook): out_dir is made and
    locked for this process (rank 0), SIGTERM, SIGUSR1, SIGHUP and Ctrl-C ask the loop to stop,
    TF32 matmuls are allowed, and under torchrun a gloo group carries the stop vote and a heartbeat
    watches the ranks.
    kind names what the checkpoints hold ('diffusion', 'gan', ...: what readers ask for); inputs are
    (what, path) pairs of folders the run reads, which out_dir must not be; fixed names the config
    keys that say what the run is, which a resume must not change."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if device.startswith('cuda'):
        torch.cuda.set_device(device)
    return Run(config, kind, device, inputs, fixed)


class Run:
    """One training run around its loop, called by the script in loop order; it never owns the
    loop, calls a model or holds a callback.

        run = bk.start_run(config, 'diffusion', device)  # rank, world_size, micro_batch, slice
        ckpt = run.resume(model=model, ema=ema, optimizer=optimizer, model_args=args)
        for step in range(run.step, max_steps):
            ...                                   # the step; run.add(loss=loss) per micro-step
            run.end_step(bad, flops_per_image)    # sums, skips, stop vote; a log step's host sync
            if run.log_step:
                run.log(lr=lr_now, grad_norm=grad_norm)
            if run.due(ckpt_interval) or run.stop:
                run.save(model=model, ema=ema, optimizer=optimizer, model_args=args)
            if run.stop:
                break
        run.finish()

    The out_dir is held by one run at a time (lock_out_dir); init_from is resolved here ('auto'
    resumes when ckpt.pt exists; 'scratch' never overwrites one); checkpoints are written atomically
    (a temporary file, flushed, renamed over the last one, which stays whole until that moment) by
    rank 0 with every rank's RNG state, the run's kind and script, and a checksum."""

    def __init__(self, config, kind, device, inputs=(), fixed=()):
        self.config, self.kind, self.device, self.fixed = config, kind, device, fixed
        self.device_type = 'cuda' if device.startswith('cuda') else 'cpu'
        self.ddp = dist.is_initialized()
        self.rank = dist.get_rank() if self.ddp else 0
        self.world_size = dist.get_world_size() if self.ddp else 1
        self.master = self.rank == 0
        batch_size, grad_accum = config['batch_size'], config.get('grad_accum', 1)
        if batch_size % (self.world_size * grad_accum):
            raise SystemExit(f"error: batch_size={batch_size} is not divisible by world_size x "
                             f"grad_accum = {self.world_size} x {grad_accum}; pick a batch_size "
                             f"that is a multiple of {self.world_size * grad_accum}")
        self.micro_batch = batch_size // (self.world_size * grad_accum)
        if (self.master and int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', 0))
                and os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'):
            print("warning: with the store torchrun shares by default, a restarted group can fail "
                  "to reconnect (pytorch/pytorch#167288); export "
                  "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun")
        self.out_dir, self.ckpt_path = config['out_dir'], os.path.join(config['out_dir'], 'ckpt.pt')
        self.init_from = self._resolve(config['init_from'], inputs)
        if self.master:
            n = torch.get_num_threads()
            threads = f" ({n} thread{'s' * (n > 1)} each)" if self.device_type == 'cpu' else ''
            print(f"{self.world_size} rank(s) on {self.device_type}{threads}, {self.micro_batch} images "
                  f"per micro-step, {grad_accum} micro-step(s), {batch_size} per optimizer step")
        # the counters a checkpoint carries, and what the log has summed since its last line
        self.step, self.images_seen, self.wandb_id, self.saved_step = 0, 0, None, None
        self.last = self.log_step = self.unsaved = self._told = False
        self.stop, self.averages = None, {}
        self._step_sums, self._sums = {}, {}
        self._steps, self._step_time, self._mark = 0, 0.0, time.time()
        self._metrics = None
        self._stopper = StopSignals(config.get('max_minutes', 0), time.time(), self.ddp)
        self._skips = SkipCounter(device)
        self._writing = threading.Lock()  # (held while a checkpoint is written)
        self._heartbeat = (Heartbeat(self.rank, self.world_size, self._writing, self.last_good)
                           if self.ddp else None)
        # what identifies this run, and each input it reads (checked again on resume)
        self.run_id = os.urandom(8).hex()
        # every path the config names is an input too (a teacher, an encoder's or Inception's weights)
        named = {os.path.realpath(path) for _, path in inputs if path} | {what for what, _ in inputs}
        inputs = [*inputs, *((k, v) for k, v in config.items() if k != 'out_dir' and k not in named
                             and isinstance(v, str) and v and os.path.exists(v)
                             and os.path.realpath(v) not in named)]
        self._hashes = InputHashes(os.path.join(self.out_dir, 'input_hashes.json'))
        found = [{what: (path, self._hashes.fingerprint(path)) for what, path in inputs if path}
                 if self.master else None]
        if self.ddp:  # (rank 0 reads them, once for all: every rank then checks the same)
            dist.broadcast_object_list(found, src=0, group=self._stopper.group)
        self.inputs = found[0]
        self.peak_tflops = (config.get('peak_tflops', 0)
                            or device_peak_tflops(self.device_type, config['dtype']))

    def _resolve(self, init_from, inputs):
        """init_from as 'resume' or 'scratch', out_dir checked and (rank 0) locked."""
        out_dir = self.out_dir
        for what, path in inputs:
            if path and os.path.realpath(path) == os.path.realpath(out_dir):
                raise SystemExit(f"error: out_dir='{out_dir}' is the {what}'s folder, which this "
                                 f"run reads; pass another --out_dir")
        kept = [path for _, path in kept_checkpoints(out_dir)]
        exists = os.path.exists(self.ckpt_path)
        if init_from == 'auto':
            if kept and not exists:
                raise SystemExit(f"error: {out_dir} holds kept checkpoints "
                                 f"({os.path.basename(kept[-1])} the newest) but no ckpt.pt; copy "
                                 f"the one to go on from to ckpt.pt, or start in another --out_dir")
            init_from = 'resume' if exists else 'scratch'
        elif init_from == 'scratch' and (exists or kept):
            raise SystemExit(f"error: {self.ckpt_path if exists else kept[-1]} exists and "
                             f"init_from='scratch' would overwrite it; continue that run with "
                             f"--init_from=auto, or start this one in another --out_dir")
        elif init_from == 'resume' and not exists:
            raise SystemExit(f"error: init_from='resume' but {self.ckpt_path} does not exist; use "
                             f"--init_from=scratch")
        # a new run would write over them or sum them into its own; but those written before their
        # run's first checkpoint (after 0: it was killed) are what the same command writes again
        others = [path for path, meta in history(out_dir) if meta['after']] if init_from == 'scratch' else []
        if others:
            raise SystemExit(f"error: {others[0]} is of a run whose ckpt.pt {out_dir} does not hold; "
                             f"move it away, or start this run in another --out_dir")
        if self.master:
            check_writable(out_dir)  # better to find out now than at the first checkpoint
            lock_out_dir(out_dir)
            for name in os.listdir(out_dir):  # what a killed run was writing
                if STALE.fullmatch(name) and not os.path.isdir(self.path(name)):
                    os.remove(self.path(name))
        return init_from

    def slice(self, micro):
        """This rank's part of the global batch in micro-step `micro`: micro-steps outside, ranks
        inside, so that any world size and grad_accum train on the same images."""
        lo = (micro * self.world_size + self.rank) * self.micro_batch
        return slice(lo, lo + self.micro_batch)

    def rng(self, step, stream, device='cpu'):
        """A generator seeded by (seed, step, stream): the same on every rank, and the same again
        after a resume."""
        return seeded(self.config['seed'], step, stream, device)

    def path(self, name):
        """out_dir/name: the run folder's files (ckpt.pt, best.pt, metrics.csv, grids, phema/...),
        a subfolder made if need be (own_folder)."""
        if os.path.dirname(name):
            own_folder(os.path.join(self.out_dir, os.path.dirname(name)))
        return os.path.join(self.out_dir, name)

    def snapshot(self, name, **state):
        """out_dir/name (rank 0's call), written whole: state with the step and the run's id, by
        which its reader (sample.py, of the phema/ snapshots) keeps to this run's history."""
        state = {'step': self.step, 'run_id': self.run_id, 'after': self.saved_step or 0, **state}
        write_file(self.path(name), lambda f: torch.save(state, f))

    def last_good(self):
        if not self.master:  # (rank 0 writes them: this rank does not see a write end)
            return f"the last checkpoint rank 0 wrote to {self.out_dir} is whole"
        if self.saved_step:
            return f"{self.ckpt_path} (step {self.saved_step}) is intact"
        return f"no checkpoint was written to {self.out_dir}"

    # -------------------------------------------------------------------------
    # resume and save: what a checkpoint holds, by name

    def resume(self, **named):
        """Restores the checkpoint when init_from resolved to 'resume', and returns it ({} for a
        new run) for what the script keeps itself. Each named object with a state dict (a network,
        an optimizer, a GradScaler) gets the one saved under its name, an optimizer with this run's
        betas, weight decay and eps; each plain value (a network's arguments) must equal the saved
        one, and None (a network this run has not) must meet no saved state. Then the step, images
        seen, wandb id, the run of skipped updates and every RNG; one line says what config keys
        changed. Also opens metrics.csv (and wandb) where it stopped."""
        ckpt = {}
        if self.init_from == 'resume':
            ckpt = self._load()
            stateful = {k: v for k, v in named.items() if hasattr(v, 'load_state_dict')}
            # the plain values first: a network of another shape is named as such
            for key, value in named.items():
                saved = ckpt.get(key)
                if value is None and isinstance(saved, dict) and any(  # a state this run lacks
                        torch.is_tensor(v) or isinstance(v, dict) for v in saved.values()):
                    raise SystemExit(f"error: {self.ckpt_path} holds a {key}, which this run has "
                                     f"not; resume with the config it was trained with, or "
                                     f"choose another out_dir")
                if key not in stateful:
                    check_same(key, saved, value, self.ckpt_path)
            for key, value in stateful.items():
                if ckpt.get(key) is None:  # (absent, or saved as None by a run without it)
                    raise SystemExit(f"error: {self.ckpt_path} holds no {key}; resume with the "
                                     f"config it was trained with, or choose another out_dir")
                if isinstance(value, torch.optim.Optimizer):
                    load_optimizer(value, ckpt[key], self.ckpt_path, key)
                else:
                    load_state(value, ckpt[key], self.ckpt_path, key)
            self.step, self.images_seen = ckpt['step'], ckpt['images_seen']
            self._skips.streak.fill_(ckpt.get('nonfinite_streak', 0))
            self.wandb_id, self.run_id = ckpt.get('wandb_id'), ckpt.get('run_id', self.run_id)
            self._check_inputs(ckpt.get('input_sha256', {}))  # (a checkpoint of before: not checked)
            for key in self.fixed:  # (what the run is: a value to start another run with)
                if ckpt['config'].get(key, self.config[key]) != self.config[key]:
                    raise SystemExit(f"error: {key}={self.config[key]!r}, but {self.ckpt_path} (step "
                                     f"{self.step}) is a run of {key}={ckpt['config'][key]!r}, which "
                                     f"a resume keeps; pass that value, or another out_dir")
            changed = changed_keys(ckpt['config'], self.config)
            if self.master:
                print(f"resuming {self.ckpt_path} at step {self.step} "
                      f"({self.images_seen / 1e3:.1f} kimg)"
                      + (f"; changed since: {', '.join(changed)}" if changed else ''))
        restore_rng(ckpt.get('rng'), self.config['seed'], self.rank, self.world_size,
                    self.device_type)
        if self.master and self.step >= self.config['max_steps']:
            print(f"{self.ckpt_path} is at step {self.step} of max_steps="
                  f"{self.config['max_steps']}: nothing to do (raise max_steps to go on)")
        if self.master:
            wandb_run = None
            if self.config.get('wandb_log'):
                import wandb
                wandb_run = wandb.init(project=os.environ.get('WANDB_PROJECT', self.kind),
                                       name=os.environ.get('WANDB_NAME', self.out_dir),
                                       config=self.config, dir=self.out_dir, id=self.wandb_id,
                                       resume='allow')
                self.wandb_id = wandb_run.id
            self._metrics = Metrics(self.path('metrics.csv'), self.step, wandb_run)
        self._mark = time.time()  # the loop's first step starts about now
        return ckpt

    def _check_inputs(self, saved):
        """Stops when an input the run reads changed since the checkpoint (a teacher trained further, a
        dataset prepared or encoded again, any byte of a weights file); init_base counts only at a
        run's start."""
        for what, (path, now) in self.inputs.items():
            if what != 'init_base' and saved.get(what, now) != now:
                raise SystemExit(f"error: the {what} {path} changed since {self.ckpt_path} was written "
                                 f"(its files are not the ones this run trained on); resume with the "
                                 f"{what} it had, or start in another --out_dir")

    def _load(self):
        """ckpt.pt, of this run's kind. Kept copies newer than it belong to another history: the
        run stops rather than mix them with this one's."""
        ckpt = load_checkpoint(self.ckpt_path, "restore a checkpoint this script wrote (keep_last "
                               "keeps ckpt_<step>.pt copies), or start in another --out_dir",
                               self.device, [self.kind])
        newer = [path for step, path in kept_checkpoints(self.out_dir) if step > ckpt['step']]
        if newer:
            raise SystemExit(f"error: {self.out_dir} keeps {os.path.basename(max(newer))}, newer "
                             f"than ckpt.pt (step {ckpt['step']}): another history of this run; "
                             f"move the newer copies away to go on from ckpt.pt")
        for path, meta in history(self.out_dir):
            if meta['run_id'] not in (None, ckpt.get('run_id')) or (meta['after'] or 0) > ckpt['step']:
                raise SystemExit(f"error: {path} (step {meta['step']}) is of another history than "
                                 f"ckpt.pt (step {ckpt['step']}), which would write over it or mix "
                                 f"with it; move it away to go on from ckpt.pt")
        self.saved_step = ckpt['step']
        return ckpt

    def save(self, path=None, **named):
        """Writes the named objects' state dicts and plain values, with the step, images seen,
        config, wandb id and every rank's RNG state, to path (ckpt.pt by default; keep_last keeps
        copies). Collective: every rank calls it. Never saved: weights that are not finite, and
        weights whose last step's loss was not finite on some rank (they may have diverged; the
        next save after a finite loss is made, and the run's last one stops the run instead)."""
        path = path or self.ckpt_path
        weights = [p for v in named.values() if isinstance(v, torch.nn.Module)
                   for p in v.parameters()]
        # the same on every rank
        if weights and not torch.stack([w.isfinite().all() for w in weights]).all():
            raise SystemExit(f"error: the weights are not finite at step {self.step}, "
                             f"so they are not saved; {self.last_good()}: {FIX}")
        unsound = self._skips.unsound.clone()
        if self.ddp:
            dist.all_reduce(unsound, op=dist.ReduceOp.MAX)
        streak, unsound = (int(v) for v in torch.stack([self._skips.streak, unsound]).tolist())
        if unsound:
            why = (f"the loss was not finite in the last {unsound} step(s) to step {self.step}, "
                   f"so the weights they started from are not saved")
            if self.last or self.stop:
                raise SystemExit(f"error: {why}; {self.last_good()}: {FIX}")
            if self.master:
                print(f"{why} (as {os.path.basename(path)}); {self.last_good()}")
            self.unsaved = self.unsaved or path == self.ckpt_path  # (finish() stops on it)
            return
        states = [None] * self.world_size
        if self.ddp:
            dist.all_gather_object(states, rng_state(self.device_type))
        else:
            states = [rng_state(self.device_type)]
        if self.master:
            state = {k: v.state_dict() if hasattr(v, 'state_dict') else v
                     for k, v in named.items()}
            state.update(input_sha256={what: fp for what, (_, fp) in self.inputs.items()},
                         run_id=self.run_id, after=self.saved_step or 0)
            state.update(step=self.step, images_seen=self.images_seen, config=self.config,
                         wandb_id=self.wandb_id, rng=states, nonfinite_streak=streak, kind=self.kind,
                         script=os.path.basename(sys.argv[0]), format=FORMAT)
            state['checksum'] = checksum(state)
            with self._writing:
                self._write(path, state)
            self._hashes.save()
        if path == self.ckpt_path:
            self.saved_step, self.unsaved = self.step, False
        if self.log_step:
            self._mark = time.time()

    def _write(self, path, state):
        try:
            with replacing(path) as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())  # (on disk before it is renamed over the last one)
        # a full disk surfaces from torch.save as a RuntimeError
        except (OSError, RuntimeError) as e:
            why = e.strerror if isinstance(e, OSError) else 'torch.save could not write it'
            free = shutil.disk_usage(self.out_dir).free / 2**30
            raise SystemExit(f"error: writing {path} failed at step {self.step} "
                             f"({why}; {free:.1f} GiB free); "
                             f"{self.last_good()}: make room and re-run the same command")
        # a second name for the same file: no extra space
        keep_last = self.config.get('keep_last', 0)
        if keep_last and path == self.ckpt_path:
            kept = self.path(f'ckpt_{self.step:07d}.pt')
            try:
                if os.path.isdir(kept) and not os.path.islink(kept):
                    raise IsADirectoryError(errno.EISDIR, 'a folder is there')
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(kept + '.tmp')
                os.link(path, kept + '.tmp')
                # (over a copy of this step from an abandoned history)
                os.replace(kept + '.tmp', kept)
            except OSError as e:
                raise SystemExit(f"error: keeping {kept} failed ({e.strerror}); {path} is saved at "
                                 f"step {self.step}: move {kept} away and re-run the same command")
            for _, old in kept_checkpoints(self.out_dir)[:-keep_last]:
                os.remove(old)
        print(f"saved {path} at step {self.step}")

    # -------------------------------------------------------------------------
    # the loop's tail: sums, the end of a step, the log

    def add(self, **named):
        """Adds values (a micro-step's loss terms: device tensors, no host sync) to the step's
        named sums; the log shows each one's mean over the additions of the steps since its last
        line that were not skipped."""
        for name, value in named.items():
            value = torch.as_tensor(value, device=self.device).detach().float()
            total, count = self._step_sums.get(name, (0, 0))
            self._step_sums[name] = (total + value, count + 1)

    def end_step(self, bad, flops_per_image):
        """After the update: the step's sums count unless its update was skipped (bad, a device
        bool), the skip counter, the step and images counters, and the stop vote (run.stop: None or
        why every rank stops now). On a log step (every log_interval-th, every ckpt_interval-th, the
        last, one that stops) the one host sync of the loop: the sums' means over ranks as
        run.averages, the skipped updates (max_nonfinite in a row stop the run), and the speed of
        the steps since the last log line."""
        bad = torch.as_tensor(bad, device=self.device)
        for name, (total, count) in self._step_sums.items():
            s, n = self._sums.get(name, (0, 0))
            kept = torch.where(bad, 0, torch.full_like(total, count))  # (per element of total)
            self._sums[name] = (s + torch.where(bad, 0, total), n + kept)
        self._skips.add(bad, torch.stack([~total.isfinite().all() for total, _ in
                                          self._step_sums.values()]).any()
                        if self._step_sums else False)
        self._step_sums = {}
        self._steps += 1
        self.step += 1
        self.images_seen += self.config['batch_size']  # (true when a resumed run changes it)
        self.last = self.step == self.config['max_steps']
        self.stop = self._stopper.vote()
        # (a checkpoint's step ends a log window: a resumed run's windows are the uninterrupted one's)
        self.log_step = (self.due(self.config['log_interval']) or bool(self.stop)
                         or self.due(self.config.get('ckpt_interval') or self.config['max_steps']))
        if self.log_step and self.device_type == 'cuda':
            torch.cuda.synchronize(self.device)  # the steps' time is the GPU's, not the launches'
        now = time.time()
        self._step_time, self._mark = self._step_time + now - self._mark, now
        self.averages = self._sync(flops_per_image) if self.log_step else {}
        if self.master and not self._told and not self.log_step:  # (something on the screen at once)
            print(f"step {self.step}/{self.config['max_steps']} took {self._step_time:.1f} s (the "
                  f"first of this process, any compiling included); a log line every "
                  f"{self.config['log_interval']} steps", flush=True)
        self._told = True

    def _sync(self, flops_per_image):
        """The log step's averages: one all-reduce of the sums and one read of them and the skip
        counter (the same on every rank: the gradients are all-reduced)."""
        names = list(self._sums)  # (the order they came in: the same on every rank)
        flat = [torch.cat([v.reshape(-1) for v in self._sums[k]]) for k in names]
        sums = torch.cat(flat) if flat else torch.zeros(0, device=self.device)
        if self.ddp and flat:
            dist.all_reduce(sums, op=dist.ReduceOp.AVG)
        values = torch.cat([sums, self._skips.counts()]).tolist()
        skipped = self._skips.read(values[-2:], self.config['max_nonfinite'], self.step,
                                   self.last_good())
        averages, at = {}, 0
        for name, part in zip(names, flat):
            k = len(part) // 2
            total, count = values[at:at + k], values[at + k:at + 2 * k]
            means = [t / c if c else float('nan') for t, c in zip(total, count)]
            averages[name] = means[0] if k == 1 else means
            at += 2 * k
        averages['skipped'] = skipped
        averages.update(speed(self._step_time / self._steps, self.config['batch_size'],
                              flops_per_image, self.peak_tflops, self.world_size, self.device_type))
        self._sums, self._steps, self._step_time = {}, 0, 0.0
        return averages

    def due(self, interval):
        """Whether this is every interval-th step, or the last."""
        return self.step % interval == 0 or self.last

    def log(self, quiet=None, **named):
        """One row of metrics.csv (and wandb) for this step, and rank 0's log line: the named
        values (tensors are read), on a log step after run.averages, and quiet's values in the row
        only. On a log step, what comes after end_step (evaluations, grids, this line, a
        checkpoint) is not counted as step time."""
        row = {'step': self.step, 'kimg': self.images_seen / 1e3}
        if self.log_step:
            row.update({k: v for k, v in self.averages.items() if not isinstance(v, list)})
        row.update({k: v.item() if torch.is_tensor(v) else v for k, v in named.items()})
        shown = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                 if k not in ('step', 'kimg', 'skipped', *SPEED_FIELDS) and v is not None]
        if self.master:
            print(f"step {self.step}/{self.config['max_steps']} | {row['kimg']:.1f} kimg | "
                  + ' | '.join(shown)
                  + (' | ' + speed_text(row, self.config['max_steps'] - self.step)
                     if self.log_step else '')
                  + (f" | {row['skipped']} non-finite update(s) skipped"
                     if row.get('skipped') else ''))
            self._metrics.log({**row, **(quiet or {})})
        if self.log_step:
            self._mark = time.time()

    def finish(self):
        """After the loop: says why it stopped early, closes wandb, and takes the process group
        down once every rank is done with it. A loop that ended after a save that was refused
        (the weights' loss not finite) and before one that was made ends the run with an error."""
        if self.unsaved:
            raise SystemExit(f"error: the run ends at step {self.step} without its checkpoint (its "
                             f"loss was not finite); {self.last_good()}: {FIX}")
        if self.master and self.stop and not self.last:
            print(f"stopped at step {self.step} of {self.config['max_steps']} ({self.stop}); the "
                  f"same command continues the run")
        if self.master and self._metrics and self._metrics.wandb_run:
            self._metrics.wandb_run.finish()
        if self.ddp:
            dist.barrier()  # no rank tears its groups down while another still talks to it
            self._heartbeat.done = True
            dist.destroy_process_group()


# -----------------------------------------------------------------------------
# the metrics file (and wandb)


class Metrics:
    """Rows of out_dir/metrics.csv, and of wandb when wandb_run is given. Its columns are the names
    logged so far, in the order they came (a new name rewrites the file with a wider header). A
    resumed run first drops the rows logged after its checkpoint (and a row cut short by a crash):
    the file then reads as one uninterrupted run."""

    def __init__(self, path, start_step=0, wandb_run=None):
        self.path, self.wandb_run, self.fields, self.rows = path, wandb_run, [], []
        if start_step and os.path.exists(path):
            try:
                with open(path, newline='') as f:
                    reader = csv.DictReader(f)
                    self.rows = [r for r in reader if None not in r.values()
                                 and r.get('step', '').isdigit() and int(r['step']) <= start_step]
                    self.fields = list(reader.fieldnames or [])
            except (OSError, ValueError) as e:  # (a folder, no permission, bytes that are not text)
                why = e.strerror if isinstance(e, OSError) else 'not a text file'
                raise SystemExit(f"error: cannot read {path} ({why}); move it away and re-run the "
                                 f"same command (the run goes on, logging to a new metrics.csv)")
        try:
            if self.fields:
                self.rewrite()  # the rows up to the checkpoint
            elif os.path.lexists(path):
                os.remove(path)  # (a new run's file comes with its first row)
        except OSError as e:
            raise SystemExit(f"error: writing {path} failed ({e.strerror}); make room (or pass a "
                             f"folder you can write to) and re-run the same command")

    def rewrite(self):
        """The header and every row, as a new file renamed over the old one."""
        with replacing(self.path, 'w') as f:
            writer = csv.DictWriter(f, self.fields, extrasaction='ignore')
            writer.writeheader()
            writer.writerows(self.rows)

    def log(self, row):
        row = {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}
        new = [k for k in row if k not in self.fields]
        try:
            if new:  # (the rows written so far are kept in memory for this)
                self.fields += new
                self.rows.append(row)
                self.rewrite()
            else:
                self.rows.append(row)
                with open(self.path, 'a', newline='') as f:
                    csv.DictWriter(f, self.fields).writerow(row)
        except OSError as e:
            raise SystemExit(f"error: writing {self.path} failed at step {row['step']} "
                             f"({e.strerror}); make room and re-run the same command (the run "
                             f"resumes from its last checkpoint)")
        if self.wandb_run:
            self.wandb_run.log({k: v for k, v in row.items() if v is not None}, step=row['step'])


# -----------------------------------------------------------------------------
# stop signals, skipped updates, the ranks heartbeat


class StopSignals:
    """SIGTERM (a scheduler, torchrun, or under torchrun its end), SIGUSR1 (SLURM's --signal warning),
    SIGHUP (a closed terminal or a dropped ssh) and Ctrl-C (SIGINT) ask the loop to finish its step,
    save and exit 0; a second Ctrl-C exits at once. vote() says, at every step, whether to stop now:
    the same answer on every rank (a vote on the host, over a gloo group, that does not wait for
    the GPU)."""

    def __init__(self, max_minutes, t_start, ddp):
        self.max_minutes, self.t_start, self.signum = max_minutes, t_start, 0
        self.group = dist.new_group(backend='gloo') if ddp else None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, self.request)
        if 'TORCHELASTIC_RUN_ID' in os.environ and sys.platform == 'linux':
            # a worker outlives no torchrun: its end (even by SIGKILL) sends this process SIGTERM
            parent = os.getppid()
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # (it ended before that)
                self.signum = signal.SIGTERM

    def request(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise SystemExit("error: interrupted twice: stopped at once, without saving; "
                             "the last checkpoint stays as it was")
        self.signum = signum  # before the print: a Ctrl-C that interrupts it is the second
        if signum == signal.SIGINT:
            print("\nCtrl-C: finishing the step, saving and stopping "
                  "(Ctrl-C again: stop at once, no save)", flush=True)

    def vote(self):
        """None, or why every rank stops now."""
        late = self.max_minutes > 0 and time.time() - self.t_start > 60 * self.max_minutes
        stop = torch.tensor([self.signum, late])
        if self.group is not None:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX, group=self.group)
        if stop[0]:
            return signal.Signals(int(stop[0])).name
        return f'max_minutes={self.max_minutes}' if stop[1] else None


class SkipCounter:
    """Counts updates skipped for a non-finite gradient norm on the device (no host sync
    until read)."""

    def __init__(self, device):
        self.skipped, self.streak, self.worst, self.unsound = (torch.zeros((), device=device)
                                                               for _ in range(4))

    def add(self, bad, unsound):
        """bad: the update was skipped; unsound: a value the step added (its loss) was not
        finite. Each streak counts the steps in a row (float16's scaler skips updates of a finite
        loss: streak without unsound)."""
        self.skipped += bad
        self.streak = (self.streak + 1) * bad
        self.worst = torch.maximum(self.worst, self.streak)
        self.unsound = (self.unsound + 1) * unsound

    def counts(self):
        """The skipped updates and the longest run of them since the last read, as one tensor."""
        return torch.stack([self.skipped, self.worst]).float()

    def read(self, counts, max_nonfinite, step, last_good):
        """The updates skipped since the last read, given counts() as read; stops the run when
        max_nonfinite came in a row."""
        skipped, worst = (int(v) for v in counts)
        if worst >= max_nonfinite:
            raise SystemExit(f"error: {worst} updates in a row had a non-finite gradient norm and "
                             f"were skipped (max_nonfinite={max_nonfinite}) by step {step}; "
                             f"{last_good}: {FIX}")
        self.skipped.zero_()
        self.worst.zero_()
        return skipped


class Heartbeat:
    """Under torchrun, no rank waits forever in a collective for one that stopped answering
    (stopped, frozen in the kernel, its machine gone). On each rank one thread beats in the job's
    store every few seconds and reads the next rank's beat; another, which never waits on the
    store, judges: when that beat stays the same for KIT_RANK_TIMEOUT seconds (an environment
    variable; 300 unless set), or the store itself stops answering, it names the rank in the store
    and in one line, and every live rank ends (exit 1) once the checkpoint it is writing, if any,
    is whole. A busy rank (compiling, evaluating, saving) keeps beating: only a process that runs
    no more is named."""

    def __init__(self, rank, world_size, writing, last_good):
        self.rank, self.writing, self.last_good = rank, writing, last_good
        self.neighbour, self.done = (rank + 1) % world_size, False
        value = os.environ.get('KIT_RANK_TIMEOUT', '300')
        try:
            self.timeout = float(value)
        except ValueError:
            self.timeout = float("nan")
        if not self.timeout > 0:
            raise SystemExit(f"error: KIT_RANK_TIMEOUT={value} is not a number of seconds above "
                             f"0; unset it (300 s) or set it to one")
        self.every = min(5.0, self.timeout / 5)
        # (a restarted group starts a clean page of the store)
        self.key = f"kit/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self.store = dist.distributed_c10d._get_default_store()
        # the store is rank 0's own unless torchrun's agent holds it
        self.store_holder = (None if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'
                             else 0)
        self.latest = (time.monotonic(), None, None)  # (when, the neighbour's beat, who is named)
        for watch in (self.beat, self.judge):
            threading.Thread(target=watch, daemon=True).start()

    def beat(self):
        """The store's side: this rank's beat, and what the neighbour and the others say."""
        beats = 0
        with contextlib.suppress(RuntimeError, OSError):  # (the store is gone: the job is ending)
            while not self.done:
                beats += 1
                self.store.set(f"{self.key}beat/{self.rank}", str(beats))
                keys = [f"{self.key}beat/{self.neighbour}", self.key + 'named']
                seen = [self.store.get(k) if self.store.check([k]) else None for k in keys]
                self.latest = (time.monotonic(), *seen)
                time.sleep(self.every)

    def judge(self):
        seen = None
        since = woke = start = time.monotonic()
        while not self.done:
            time.sleep(self.every)
            at, beat, named = self.latest
            if named is not None:
                self.end(None, None)  # (the rank that named it says so)
            now = time.monotonic()
            slept, woke = now - woke, now
            if slept > 3 * self.every:  # this process did not run (suspended, its GIL held long):
                seen, since, start = None, now, now  # it has nothing to judge the others by
            at = max(at, start)
            if beat != seen:
                seen, since = beat, at
            if now - at > self.timeout:  # (then no beat says anything)
                where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
                self.end(self.store_holder, f"the job's store at {where}, held by "
                         + ("it" if self.store_holder is not None else "torchrun's agent")
                         + f", did not answer for {self.timeout:.0f} s")
            elif at - since > self.timeout:
                self.end(self.neighbour, f"no heartbeat for {self.timeout:.0f} s")

    def end(self, rank, why):
        if self.done:
            return
        if why:  # tell the others, waiting a few seconds at most
            name = threading.Thread(target=self.store.set, args=(self.key + 'named', str(rank)),
                                    daemon=True)
            name.start()
            name.join(timeout=5)
        with self.writing:  # (a checkpoint being written is finished first)
            if why:
                who = f"rank {rank}" if rank is not None else "torchrun's agent"
                print(f"error: {who} stopped answering ({why}: stopped, frozen or its machine "
                      f"gone), so the job ends rather than wait for it; {self.last_good()}: the "
                      f"same command resumes the run", flush=True)
            os._exit(1)


# -----------------------------------------------------------------------------
# what a checkpoint carries besides the weights


def rng_state(device_type):
    """This process's global RNGs (for what a fork draws from them; the scripts' own draws are
    seeded)."""
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None,
            'numpy': [np.random.get_state()[1].tolist(), *np.random.get_state()[2:]],
            'python': random.getstate()}


def restore_rng(states, seed, rank, world_size, device_type):
    """The global RNGs as a checkpoint saved them for this rank (same world size), else seeded by
    seed + rank."""
    state = states[rank] if states and len(states) == world_size else None
    if state is None:
        torch.manual_seed(seed + rank)
        np.random.seed(seed + rank)
        random.seed(seed + rank)
        return
    torch.set_rng_state(state['torch'].cpu())
    if device_type == 'cuda' and state['cuda'] is not None:
        torch.cuda.set_rng_state(state['cuda'].cpu())
    np.random.set_state(('MT19937', np.array(state['numpy'][0], dtype=np.uint32),
                         *state['numpy'][1:]))
    random.setstate((state['python'][0], tuple(state['python'][1]), state['python'][2]))


def load_optimizer(optimizer, state, path, key):
    """Restores an optimizer's moments and step counts, then applies this run's hyperparameters
    (betas, weight decay, eps) to them: a key changed since the checkpoint takes effect (lr is set
    at every step anyway)."""
    now = [{k: v for k, v in group.items() if k not in ('params', 'lr', 'initial_lr')}
           for group in optimizer.param_groups]
    load_state(optimizer, state, path, key)
    for group, hyper in zip(optimizer.param_groups, now):
        group.update(hyper)


def changed_keys(saved, config):
    """'key old -> new' for each config key whose value differs from the checkpoint's config."""
    return [f"{k} {v!r} -> {config[k]!r}" for k, v in saved.items() if config.get(k, v) != v]


def check_same(what, saved, current, path):
    """Stops when a checkpoint's record (model_args and the like, dicts) differs from this run's;
    keys added since it was written take their defaults."""
    if isinstance(saved, dict) and isinstance(current, dict):
        diff = {k: (v, current.get(k)) for k, v in saved.items() if current.get(k, v) != v}
    else:
        diff = (saved, current) if saved != current else None
    if diff:
        raise SystemExit(f"error: {path} holds another {what} (checkpoint vs config: {diff}); "
                         f"resume with the config it was trained with, or choose another out_dir")


class InputHashes:
    """What identifies an input a run reads: the sha256 of its whole content (for a run's folder its
    ckpt.pt; for a prepared dataset each of its arrays, meta.json and its latents' decoder; else the
    file), None where nothing is there. Each file's hash is kept by its path, size, mtime and inode
    in out_dir/input_hashes.json (written with the checkpoints), so a resume reads an unchanged
    input's bytes again only when the file changed."""

    def __init__(self, path):
        self.path, self.known, self.dirty = path, {}, False
        with contextlib.suppress(OSError, ValueError, TypeError):  # (unreadable: hashed again)
            with open(path) as f:
                self.known = {k: v for k, v in json.load(f).items() if isinstance(v, list) and len(v) == 4}

    def fingerprint(self, path):
        if os.path.isfile(os.path.join(path, 'ckpt.pt')):
            files = [os.path.join(path, 'ckpt.pt')]
        elif os.path.isdir(path):
            files = sorted(os.path.join(path, n) for n in os.listdir(path)
                           if re.fullmatch(r'.*\.npy|meta\.json|autoencoder\.pt', n))
        else:
            files = [path] if os.path.isfile(path) else []
        if not files:
            return None
        return hashlib.sha256(' '.join(f"{os.path.basename(name)}:{self.file_hash(name)}"
                                       for name in files).encode()).hexdigest()[:16]

    def file_hash(self, name):
        st = os.stat(name)
        key, stamp = os.path.realpath(name), [st.st_size, st.st_mtime_ns, st.st_ino]
        if self.known.get(key, [None])[:3] != stamp:
            if st.st_size > 2**30:
                print(f"hashing {name} ({st.st_size / 2**30:.1f} GiB), once: a resume reads it again "
                      f"only if it changed", flush=True)
            digest = hashlib.sha256()
            try:
                with open(name, 'rb') as f:
                    for chunk in iter(lambda: f.read(1 << 24), b''):
                        digest.update(chunk)
            except OSError as e:
                raise SystemExit(f"error: cannot read {name} ({e.strerror}), an input of this run; "
                                 f"make it readable, or pass another path")
            self.known[key], self.dirty = [*stamp, digest.hexdigest()], True
        return self.known[key][3]

    def save(self):
        if self.dirty:
            write_file(self.path, lambda f: f.write(json.dumps(self.known, indent=0)), 'w')
            self.dirty = False


KEPT = re.compile(r'ckpt_(\d{7})\.pt')  # keep_last's copies: ckpt_<step, 7 digits>.pt


def history(out_dir):
    """What a run writes beside ckpt.pt for its readers (sample.py --ckpt=best, --ema_std): best.pt
    and phema/phema-<step>.pt, as (path, {step, run_id, after}): each marks its run and the step of
    the ckpt.pt it follows (after; 0 before the first), as run.save and run.snapshot write them."""
    folder = glob.escape(out_dir)
    found = [*glob.glob(os.path.join(folder, 'best.pt')),
             *glob.glob(os.path.join(folder, 'phema', 'phema-*.pt'))]
    marked = []
    for path in sorted(p for p in found if os.path.isfile(p) and not os.path.islink(p)):
        try:  # (mmap: what the file says of itself, no weight read)
            meta = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except Exception:
            raise SystemExit(f"error: cannot read {path}, which a run reads beside ckpt.pt; move it away")
        meta = meta if isinstance(meta, dict) else {}
        marked.append((path, {k: meta.get(k) for k in ('step', 'run_id', 'after')}))
    return marked


# the temporary files of a run's writes (open_new's path + '.tmp'), left behind by a killed run
STALE = re.compile(r'(input_hashes\.json|(ckpt|best)\.pt|ckpt_\d{7}\.pt|metrics\.csv|(samples|recon)_\d{7}\.png)\.tmp')


def kept_checkpoints(out_dir):
    """keep_last's copies in out_dir as (step, path), oldest first: files of exactly the kit's names
    (a user's ckpt_5.pt, ckpt_20_old.pt or a link is not one, and is never pruned)."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return sorted((int(m[1]), os.path.join(out_dir, name)) for name in names
                  if (m := KEPT.fullmatch(name))
                  and os.path.isfile(os.path.join(out_dir, name))
                  and not os.path.islink(os.path.join(out_dir, name)))


# -----------------------------------------------------------------------------
# speed: the device peak, the step rate and memory, as logged


def device_peak_tflops(device_type, dtype):
    """Known GPUs' dense tensor-core peak (bf16's, SXM unless named; float32 runs at TF32's, half of
    it); 0 when unknown (then pass peak_tflops) and on CPUs."""
    if device_type != 'cuda':
        return 0.0
    name = torch.cuda.get_device_name()
    peaks = {'H100 PCIe': 756.5, 'H100 NVL': 835.5, 'H100': 989.4, 'H200': 989.4, 'A100': 312.0}
    return next((v for k, v in peaks.items() if k in name), 0.0) / (2 if dtype == 'float32' else 1)


def peak_memory_gib(device_type):
    """The most memory this process has held: allocated on the GPU, resident on the CPU."""
    if device_type == 'cuda':
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


SPEED_FIELDS = ['ms_per_step', 'img_per_s', 'tflops', 'mfu', 'peak_mem_gib']


def speed(dt, batch_size, flops_per_image, peak_tflops, world_size, device_type):
    """The SPEED_FIELDS of a row: a step of dt seconds over batch_size images, against world_size
    peaks."""
    tflops = flops_per_image * batch_size / dt / 1e12
    return dict(ms_per_step=dt * 1e3, img_per_s=batch_size / dt, tflops=tflops,
                mfu=tflops / (peak_tflops * world_size) if peak_tflops else float('nan'),
                peak_mem_gib=peak_memory_gib(device_type))


def speed_text(row, steps_left):
    """The log line's tail for a row with SPEED_FIELDS."""
    mfu = f"{row['mfu']:.1%}" if row['mfu'] == row['mfu'] else 'n/a'
    return (f"{row['ms_per_step']:.0f} ms/step | {row['img_per_s']:.0f} img/s | "
            f"{row['tflops']:.2f} TFLOP/s | mfu {mfu} | {row['peak_mem_gib']:.2f} GiB | "
            f"eta {row['ms_per_step'] * steps_left / 6e4:.1f} min")
