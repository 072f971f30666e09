"""The run object of bookkeeping.py, tested as an object in this process: resume by name, the sums and their log
window, skipped updates, due and stop, save and the checkpoint's history checks, the lock and the paths it owns.
What the train scripts do around their loops is these calls; the scripts' own tests run them end to end."""
import csv
import fcntl
import hashlib
import json
import os
import re
import signal

import pytest
import torch
import torch.nn as nn

import bookkeeping as bk
import common


@pytest.fixture(autouse=True)
def own_signal_handlers():
    """A Run takes SIGTERM, SIGUSR1, SIGHUP and SIGINT for its stop vote: pytest gets them back after each test."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def config(out_dir, **changes):
    """The keys a Run reads, as a train script's config has them."""
    return {'batch_size': 4, 'grad_accum': 1, 'dtype': 'float32', 'out_dir': str(out_dir), 'init_from': 'auto',
            'max_steps': 10, 'log_interval': 2, 'ckpt_interval': 5, 'seed': 0, 'max_nonfinite': 3, 'keep_last': 0,
            'max_minutes': 0, 'peak_tflops': 0, **changes}


def net():
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def train(run, model, optimizer, steps, bad=()):
    """The loop's calls around `steps` updates of model; the steps in `bad` are skipped (their loss is NaN)."""
    for _ in range(steps):
        loss = model(torch.ones(run.micro_batch, 3)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        if run.step + 1 in bad:
            loss = loss * float('nan')
        else:
            optimizer.step()
        run.add(loss=loss)
        run.end_step(torch.tensor(run.step + 1 in bad), flops_per_image=0)
        if run.log_step:
            run.log(lr=1e-3)
        if run.due(run.config['ckpt_interval']) or run.stop:
            run.save(model=model, optimizer=optimizer, model_args={'width': 2})
        if run.stop:
            break


def test_resume_restores_each_object_by_name_the_counters_and_the_rngs(tmp_path):
    model = net()
    optimizer = common.adamw(model.parameters(), 1e-2, (0.9, 0.99), 0.0)
    run = bk.Run(config(tmp_path), 'test', 'cpu')
    assert run.resume(model=model, optimizer=optimizer, model_args={'width': 2}) == {} and run.step == 0
    train(run, model, optimizer, 5)
    drawn = torch.rand(3)  # the global RNG right after the save
    assert run.saved_step == 5 and sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'metrics.csv', 'run.lock']
    again = nn.Linear(3, 2)
    again_opt = common.adamw(again.parameters(), 1e-2, (0.9, 0.95), 0.0)  # a changed beta2 is this run's
    resumed = bk.Run(config(tmp_path), 'test', 'cpu')
    ckpt = resumed.resume(model=again, optimizer=again_opt, model_args={'width': 2})
    assert resumed.init_from == 'resume' and ckpt['step'] == resumed.step == 5
    assert resumed.images_seen == 20 and ckpt['kind'] == 'test' and ckpt['run_id'] == run.run_id
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    moments = [s['exp_avg_sq'] for s in optimizer.state.values()], [s['exp_avg_sq'] for s in again_opt.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(*moments)) and len(moments[1]) == 2
    assert again_opt.param_groups[0]['betas'] == (0.9, 0.95)
    assert torch.equal(torch.rand(3), drawn)


def test_resume_refuses_a_run_of_another_shape_kind_parts_or_fixed_key(tmp_path):
    model = net()
    optimizer = common.adamw(model.parameters(), 1e-2, (0.9, 0.99), 0.0)
    run = bk.Run(config(tmp_path, max_steps=2, schedule='flow'), 'test', 'cpu', fixed=['schedule'])
    run.resume(model=model, optimizer=optimizer, model_args={'width': 2})
    train(run, model, optimizer, 2)
    cases = [  # (what this run names, the one line)
        (dict(model=net(), model_args={'width': 3}), "holds another model_args (checkpoint vs config: "
                                                     "{'width': (2, 3)})"),
        (dict(model=None), "holds a model, which this run has not"),
        (dict(model=net(), disc=nn.Linear(2, 1)), "holds no disc"),
        (dict(model=nn.Linear(3, 5)), "'s model does not fit this run"),
    ]
    for named, line in cases:
        with pytest.raises(SystemExit, match=re.escape(line)):
            bk.Run(config(tmp_path), 'test', 'cpu').resume(**named)
    with pytest.raises(SystemExit, match=r"is a test checkpoint, which \S+ writes; this needs a gan checkpoint \(train_gan.py\)"):
        bk.Run(config(tmp_path), 'gan', 'cpu').resume(model=net())
    with pytest.raises(SystemExit, match=re.escape("schedule='edm', but " + str(tmp_path / 'ckpt.pt') + " (step 2) is a "
                                                   "run of schedule='flow', which a resume keeps; pass that value")):
        bk.Run(config(tmp_path, schedule='edm'), 'test', 'cpu', fixed=['schedule']).resume(model=net())
    changed = bk.Run(config(tmp_path, schedule='edm'), 'test', 'cpu')  # (a key not fixed: said, then taken)
    changed.resume(model=net(), optimizer=optimizer, model_args={'width': 2})
    assert changed.step == 2


def test_sums_are_averaged_over_the_log_window_without_the_skipped_updates(tmp_path):
    run = bk.Run(config(tmp_path, grad_accum=2, log_interval=3), 'test', 'cpu')
    run.resume()
    assert run.micro_batch == 2
    for step, (terms, bad) in enumerate([([1.0, 3.0], False), ([100.0, 100.0], True), ([5.0, 7.0], False)], 1):
        for micro, value in enumerate(terms):  # a scalar term and a per-element one, per micro-step
            run.add(loss=torch.tensor(value), per_t=torch.tensor([value, 2 * value]))
        run.end_step(torch.tensor(bad), flops_per_image=1e9)
        assert run.log_step == (step == 3) and run.step == step and run.images_seen == 4 * step
    assert run.averages['loss'] == 4.0 and run.averages['per_t'] == [4.0, 8.0] and run.averages['skipped'] == 1
    assert run.averages['img_per_s'] > 0 and run.averages['tflops'] == pytest.approx(
        4e9 * run.averages['img_per_s'] / 4 / 1e12)
    run.log(lr=0.5, quiet={'extra': 2})
    row, = csv.DictReader(open(tmp_path / 'metrics.csv'))
    assert (row['step'], row['loss'], row['lr'], row['skipped'], row['extra']) == ('3', '4.0', '0.5', '1', '2')
    assert 'per_t' not in row  # (a list goes to the averages only)
    run.add(loss=torch.tensor(9.0))  # the next window starts empty, and ends at the checkpoint's step (5)
    run.end_step(torch.tensor(False), flops_per_image=0)
    run.end_step(torch.tensor(False), flops_per_image=0)
    assert run.log_step and run.averages['loss'] == 9.0 and run.averages['skipped'] == 0


def test_max_nonfinite_skipped_updates_in_a_row_stop_the_run_naming_the_last_good_checkpoint(tmp_path):
    model = net()
    optimizer = common.adamw(model.parameters(), 1e-2, (0.9, 0.99), 0.0)
    run = bk.Run(config(tmp_path, log_interval=1, max_nonfinite=2), 'test', 'cpu')
    run.resume(model=model)
    train(run, model, optimizer, 5)
    with pytest.raises(SystemExit) as stop:
        train(run, model, optimizer, 3, bad=(6, 7))
    assert str(stop.value) == (f"error: 2 updates in a row had a non-finite gradient norm and were skipped "
                               f"(max_nonfinite=2) by step 7; {tmp_path / 'ckpt.pt'} (step 5) is intact: {bk.FIX}")
    model.weight.data[0, 0] = float('inf')
    with pytest.raises(SystemExit, match="the weights are not finite at step 7, so they are not saved"):
        run.save(model=model)
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == 5


def test_weights_whose_loss_was_not_finite_are_not_saved_and_the_run_cannot_end_on_them(tmp_path, capsys):
    """A save after a step whose loss was not finite (an update skipped: the weights could have diverged) writes
    nothing and says so; the next one after a finite loss is written. A float16 overflow (an update skipped, its loss
    finite) saves as usual. A loop that ends after a refused save stops the run with an error."""
    model = net()
    optimizer = common.adamw(model.parameters(), 1e-2, (0.9, 0.99), 0.0)
    run = bk.Run(config(tmp_path, ckpt_interval=2, max_nonfinite=10), 'test', 'cpu')
    run.resume(model=model)
    train(run, model, optimizer, 2)
    train(run, model, optimizer, 2, bad=(4,))  # step 4's save refused
    assert f"the loss was not finite in the last 1 step(s) to step 4, so the weights they started from are not " \
           f"saved (as ckpt.pt); {tmp_path / 'ckpt.pt'} (step 2) is intact" in capsys.readouterr().out
    assert run.unsaved and torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == 2
    run.add(loss=torch.tensor(1.0))  # a float16 overflow: skipped, its loss finite
    run.end_step(torch.tensor(True), flops_per_image=0)
    run.save(model=model)
    assert not run.unsaved and torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == 5
    train(run, model, optimizer, 1, bad=(6,))
    run.save(model=model)
    with pytest.raises(SystemExit, match=re.escape(f"error: the run ends at step 6 without its checkpoint (its loss was "
                                                   f"not finite); {tmp_path / 'ckpt.pt'} (step 5) is intact: {bk.FIX}")):
        run.finish()


def test_every_path_the_config_names_is_an_input_identified_by_its_whole_content(tmp_path):
    """A key whose value names a file is an input: its sha256 goes into the checkpoint, kept by size, mtime and inode
    in input_hashes.json (an unchanged file is not read again), and one byte changed anywhere in it stops the resume
    in one line naming the key."""
    weights = tmp_path / 'encoder.pth'
    weights.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    out = tmp_path / 'out'
    run = bk.Run(config(out, encoder=str(weights)), 'test', 'cpu')
    run.resume()
    run.save()
    assert set(torch.load(out / 'ckpt.pt', weights_only=True)['input_sha256']) == {'encoder'}
    known = json.load(open(out / 'input_hashes.json'))
    assert list(known) == [str(weights)] and known[str(weights)][3] == hashlib.sha256(weights.read_bytes()).hexdigest()
    known[str(weights)][3] = 'f' * 64  # (what the kept hash says is what a resume takes, while the file is the same)
    (out / 'input_hashes.json').write_text(json.dumps(known))
    with pytest.raises(SystemExit, match="the encoder .* changed since"):
        bk.Run(config(out, encoder=str(weights)), 'test', 'cpu').resume()
    (out / 'input_hashes.json').unlink()
    bk.Run(config(out, encoder=str(weights)), 'test', 'cpu').resume()  # read again: the same bytes
    run.save()  # (the hashes kept again)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1  # one bit in the middle: the same size
    weights.write_bytes(data)
    with pytest.raises(SystemExit, match=re.escape(f"error: the encoder {weights} changed since {out / 'ckpt.pt'} "
                                                   f"was written")):
        bk.Run(config(out, encoder=str(weights)), 'test', 'cpu').resume()


def test_due_and_the_log_steps(tmp_path, capsys):
    run = bk.Run(config(tmp_path, max_steps=7, log_interval=3, ckpt_interval=5), 'test', 'cpu')
    run.resume()
    assert f"1 rank(s) on cpu ({torch.get_num_threads()} thread" in capsys.readouterr().out
    due, logged = [], []
    for _ in range(7):
        run.end_step(torch.tensor(False), flops_per_image=0)
        due.append(run.due(4))
        logged.append(run.log_step)
    # every 4th step and the last; a log line every 3rd, at a checkpoint's step (5) and the last
    assert due == [False, False, False, True, False, False, True] and run.last
    assert logged == [False, False, True, False, True, True, True]
    # something on the screen at once: the first step of a process says its time, once (here no log step)
    first = [line for line in capsys.readouterr().out.splitlines() if line.startswith('step ')]
    assert len(first) == 1 and re.match(r"step 1/7 took \d+\.\d s \(the first of this process, any compiling "
                                        r"included\); a log line every 3 steps$", first[0]), first


@pytest.mark.parametrize('how', ['SIGTERM', 'SIGUSR1', 'SIGHUP', 'SIGINT', 'max_minutes'])
def test_a_signal_or_max_minutes_stops_the_loop_at_the_step_with_a_save(tmp_path, capsys, how):
    model = net()
    optimizer = common.adamw(model.parameters(), 1e-2, (0.9, 0.99), 0.0)
    run = bk.Run(config(tmp_path, max_minutes=1e-9 if how == 'max_minutes' else 0), 'test', 'cpu')
    run.resume(model=model)
    if how != 'max_minutes':
        os.kill(os.getpid(), getattr(signal, how))  # (handled at once: this is the main thread)
    train(run, model, optimizer, 10)
    assert run.stop == ('max_minutes=1e-09' if how == 'max_minutes' else how) and run.step == 1
    assert run.saved_step == 1 and run.log_step
    run.finish()
    assert f"stopped at step 1 of 10 ({run.stop}); the same command continues the run" in capsys.readouterr().out
    if how == 'SIGINT':  # a second Ctrl-C: at once, without saving
        with pytest.raises(SystemExit, match="interrupted twice: stopped at once, without saving"):
            os.kill(os.getpid(), signal.SIGINT)


def test_save_is_whole_checksummed_and_keep_last_keeps_the_newest(tmp_path):
    model = net()
    optimizer = common.adamw(model.parameters(), 1e-2, (0.9, 0.99), 0.0)
    run = bk.Run(config(tmp_path, ckpt_interval=1, keep_last=2, max_steps=4), 'test', 'cpu')
    run.resume(model=model)
    train(run, model, optimizer, 4)
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith('.pt')) == [
        'ckpt.pt', 'ckpt_0000003.pt', 'ckpt_0000004.pt']
    assert os.path.samefile(tmp_path / 'ckpt.pt', tmp_path / 'ckpt_0000004.pt')  # (a second name: no space)
    ckpt = common.load_checkpoint(tmp_path / 'ckpt.pt', 'fix')
    assert ckpt['step'] == 4 and ckpt['format'] == common.FORMAT and ckpt['checksum'] == common.checksum(
        {k: v for k, v in ckpt.items() if k != 'checksum'})
    ckpt['model']['weight'][0, 0] += 1  # one weight changed on disk
    torch.save(ckpt, tmp_path / 'changed.pt')
    with pytest.raises(SystemExit, match="changed.pt is corrupt: its contents do not match the checksum"):
        common.load_checkpoint(tmp_path / 'changed.pt', 'fix')


def test_init_from_never_mixes_histories(tmp_path):
    model = net()
    optimizer = common.adamw(model.parameters(), 1e-2, (0.9, 0.99), 0.0)
    with pytest.raises(SystemExit, match=r"init_from='resume' but .*ckpt.pt does not exist; use --init_from=scratch"):
        bk.Run(config(tmp_path, init_from='resume'), 'test', 'cpu')
    run = bk.Run(config(tmp_path, ckpt_interval=1, keep_last=3, max_steps=3), 'test', 'cpu')
    run.resume(model=model)
    train(run, model, optimizer, 3)
    with pytest.raises(SystemExit, match="exists and init_from='scratch' would overwrite it"):
        bk.Run(config(tmp_path, init_from='scratch'), 'test', 'cpu')
    os.replace(tmp_path / 'ckpt_0000002.pt', tmp_path / 'ckpt.pt')  # ckpt.pt older than a kept copy
    with pytest.raises(SystemExit, match="keeps ckpt_0000003.pt, newer than ckpt.pt \\(step 2\\): another history"):
        bk.Run(config(tmp_path), 'test', 'cpu').resume(model=model)
    os.remove(tmp_path / 'ckpt.pt')
    with pytest.raises(SystemExit, match="holds kept checkpoints \\(ckpt_0000003.pt the newest\\) but no ckpt.pt"):
        bk.Run(config(tmp_path), 'test', 'cpu')
    with pytest.raises(SystemExit, match="is the dataset's folder, which this run reads"):
        bk.Run(config(tmp_path / 'd'), 'test', 'cpu', inputs=[('dataset', str(tmp_path / 'd'))])


def test_best_pt_and_snapshots_belong_to_the_history_they_are_resumed_with(tmp_path):
    """best.pt and phema snapshots (run.save and run.snapshot beside ckpt.pt) written after the checkpoint a run
    resumes from (a crash) are its own history; written after a later checkpoint (ckpt.pt put back to an older copy)
    or by another run, the resume (or the new run) stops in one line rather than write over them or mix them in."""
    model = net()
    optimizer = common.adamw(model.parameters(), 1e-2, (0.9, 0.99), 0.0)
    run = bk.Run(config(tmp_path, ckpt_interval=3, keep_last=3), 'test', 'cpu')
    run.resume(model=model)
    train(run, model, optimizer, 4)  # ckpt.pt at 3, then step 4's best.pt and snapshot: a crash
    run.save(run.path('best.pt'), model=model)
    run.snapshot('phema/phema-0000004.pt', ema=[])
    resumed = bk.Run(config(tmp_path, ckpt_interval=3, keep_last=3), 'test', 'cpu')
    assert resumed.resume(model=model)['step'] == 3
    train(resumed, model, optimizer, 4)  # ckpt.pt at 6, best.pt at 7, after it
    resumed.save(resumed.path('best.pt'), model=model)
    os.replace(tmp_path / 'ckpt_0000003.pt', tmp_path / 'ckpt.pt')  # put back: another history from step 3
    for name in ('ckpt_0000006.pt', 'phema/phema-0000004.pt'):
        os.remove(tmp_path / name)
    with pytest.raises(SystemExit, match=re.escape(f"{tmp_path / 'best.pt'} (step 7) is of another history than "
                                                   "ckpt.pt (step 3)")):
        bk.Run(config(tmp_path), 'test', 'cpu').resume(model=model)
    os.remove(tmp_path / 'ckpt.pt')
    with pytest.raises(SystemExit, match=re.escape(f"{tmp_path / 'best.pt'} is of a run whose ckpt.pt")):
        bk.Run(config(tmp_path), 'test', 'cpu')
    killed = bk.Run(config(tmp_path / 'k', ckpt_interval=100), 'test', 'cpu')  # killed before its first checkpoint
    killed.resume(model=model)
    train(killed, model, optimizer, 2)
    killed.save(killed.path('best.pt'), model=model)
    assert bk.Run(config(tmp_path / 'k'), 'test', 'cpu').init_from == 'scratch'  # the same command starts it again


def test_a_resumed_run_logs_on_from_its_checkpoint_and_notices_a_changed_input(tmp_path):
    data = tmp_path / 'data.npy'
    data.write_bytes(b'images')
    out = tmp_path / 'out'
    model = net()
    optimizer = common.adamw(model.parameters(), 1e-2, (0.9, 0.99), 0.0)
    run = bk.Run(config(out, log_interval=1, ckpt_interval=3), 'test', 'cpu', inputs=[('dataset', str(data))])
    run.resume(model=model)
    train(run, model, optimizer, 5)  # logged 1..5, saved at 3
    resumed = bk.Run(config(out, log_interval=1, ckpt_interval=3), 'test', 'cpu', inputs=[('dataset', str(data))])
    resumed.resume(model=model)
    assert [r['step'] for r in csv.DictReader(open(out / 'metrics.csv'))] == ['1', '2', '3']
    train(resumed, model, optimizer, 1)
    assert [r['step'] for r in csv.DictReader(open(out / 'metrics.csv'))] == ['1', '2', '3', '4']
    data.write_bytes(b'other images')
    with pytest.raises(SystemExit, match=f"the dataset {data} changed since"):
        bk.Run(config(out), 'test', 'cpu', inputs=[('dataset', str(data))]).resume(model=model)


def test_the_lock_names_its_holder_and_a_killed_runs_files_are_cleared(tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    holder = open(out / 'run.lock', 'w')  # another process's lock: an flock on its own open file
    holder.write('pid 12345 on elsewhere since 2026-01-01 00:00:00')
    holder.flush()
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(SystemExit, match=f"out_dir='{out}' is in use by pid 12345 on elsewhere since 2026-01-01 "
                                         f"00:00:00; wait for that run to end"):
        bk.Run(config(out), 'test', 'cpu')
    holder.close()  # (that process died: the kernel drops its flock, the file stays)
    for name in ('ckpt.pt.tmp', 'metrics.csv.tmp', 'notes.txt.tmp'):  # two of a killed run's, one of the user's
        (out / name).write_text('')
    run = bk.Run(config(out), 'test', 'cpu')
    assert sorted(os.listdir(out)) == ['notes.txt.tmp', 'run.lock']
    assert open(out / 'run.lock').read().startswith(f'pid {os.getpid()} on ')
    assert run.path('phema/a.pt') == os.path.join(str(out), 'phema', 'a.pt') and os.path.isdir(out / 'phema')
    (out / 'samples').write_text('')
    with pytest.raises(SystemExit, match="samples is a file where this kit makes a folder"):
        run.path('samples/0.png')
