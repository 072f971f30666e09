"""
A warm interpreter for the tests' script runs: `python script.py args` without importing torch again.

    python tests/warm.py SOCKET     # the server: imports the kit once, computes nothing, forks a child per run

A run is a child process of its own, as the command would be: its exit status (or the signal that killed it), its
stdout and stderr (the caller's pipes or files; stdin is /dev/null), its environment, working directory, session, signals,
locks and atexit handlers. What it skips is the interpreter's start and the 2-3 s of imports a fresh process pays,
most of a short run's time on a 2-core machine. The server computes nothing before it forks (no thread pool is
started, which a fork could not carry), and each child sets torch's threads from its own OMP_NUM_THREADS. A
command whose environment changes what a library reads at import (TORCH_*, MKL_*, ...), or that is not a script,
runs in a fresh process instead (Popen and run below decide).
"""
import atexit
import json
import os
import resource
import runpy
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# variables a library reads when it is imported: a run that sets one of these to other than the server's value
# needs its own interpreter
AT_IMPORT = ('TORCH', 'PYTORCH', 'OMP_', 'KMP_', 'MKL_', 'CUDA', 'NCCL', 'GLOO', 'PYTHONHASHSEED', 'PYTHONPATH',
             'LD_')


# -----------------------------------------------------------------------------
# the server


def serve(path):
    sys.path.insert(0, REPO)
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import torch
    import torch.distributed  # noqa: F401
    import torch.nn.parallel  # noqa: F401
    import bookkeeping  # noqa: F401
    import common  # noqa: F401
    import dataformat  # noqa: F401
    import diffusion  # noqa: F401
    import model  # noqa: F401
    import pretrained  # noqa: F401
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print('ready', flush=True)
    events = selectors.DefaultSelector()
    events.register(listener, selectors.EVENT_READ)
    events.register(sys.stdin, selectors.EVENT_READ)  # (a pipe from the tests: closed when they end, however)
    running = {}
    while True:
        for key, _ in events.select():
            if key.fileobj is sys.stdin:  # the tests ended: so do their runs
                for pid in running:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                return
            if key.fileobj is listener:
                conn, _ = listener.accept()
                message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    conn.close()
                    events.close()
                    child(json.loads(message), fds, torch)
                for fd in fds:
                    os.close(fd)
                conn.sendall(json.dumps({'pid': pid}).encode() + b'\n')
                running[pid] = conn
                events.register(os.pidfd_open(pid), selectors.EVENT_READ, (pid, conn))
            else:  # a child ended
                pid, conn = key.data
                events.unregister(key.fileobj)
                os.close(key.fileobj)
                _, status = os.waitpid(pid, 0)
                del running[pid]
                with conn:
                    conn.sendall(json.dumps({'returncode': os.waitstatus_to_exitcode(status)}).encode() + b'\n')


def child(request, fds, torch):
    """Runs the script as `python script args` would, in this forked process, and exits with its status."""
    code = 1
    try:
        for fd, std in zip(fds, (0, 1, 2)):
            os.dup2(fd, std)
            os.close(fd)
        if request['new_session']:
            os.setsid()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as `python` in a terminal starts
        if request['file_size_limit']:  # (a write past it fails with EFBIG: Python ignores SIGXFSZ)
            resource.setrlimit(resource.RLIMIT_FSIZE, (request['file_size_limit'],) * 2)
        os.chdir(request['cwd'])
        os.environ.clear()
        os.environ.update(request['env'])
        if os.environ.get('PYTHONUNBUFFERED'):
            sys.stdout.reconfigure(write_through=True)
        if os.environ.get('OMP_NUM_THREADS'):
            torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))
        script = os.path.abspath(request['argv'][0])
        if not os.path.isfile(script):  # (python's own line and status)
            print(f"{sys.executable}: can't open file {script!r}: [Errno 2] No such file or directory",
                  file=sys.stderr)
            code = 2
            return
        sys.argv = list(request['argv'])
        sys.path[0] = os.path.dirname(script)
        code = 0
        try:
            runpy.run_path(script, run_name='__main__')
        except SystemExit as e:
            code = exit_code(e)
        except BaseException:
            try:
                sys.excepthook(*sys.exc_info())  # (the kit's hook may end it with sys.exit)
                code = 1
            except SystemExit as e:
                code = exit_code(e)
        threading._shutdown()  # the interpreter's own end: its threads, then atexit
        atexit._run_exitfuncs()
    finally:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:
                pass
        os._exit(code)


def exit_code(e):
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


# -----------------------------------------------------------------------------
# the client


class Server:
    """The warm server of this test session, started at its first use."""
    process = path = env = None
    lock = threading.Lock()  # (the tests' shared trainings start runs from a thread of their own)

    @classmethod
    def address(cls, env):
        """The server's socket, or None when this run needs a fresh interpreter."""
        if not (hasattr(os, 'pidfd_open') and hasattr(socket, 'send_fds')) or os.environ.get('KIT_TESTS_COLD'):
            return None
        with cls.lock:
            if cls.process is None:
                cls.env = {**os.environ, 'OMP_NUM_THREADS': env.get('OMP_NUM_THREADS', '')}
                cls.path = os.path.join(tempfile.mkdtemp(prefix='kit-warm-'), 'socket')
                cls.process = subprocess.Popen([sys.executable, __file__, cls.path], env=cls.env, cwd=REPO,
                                               stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
                assert cls.process.stdout.readline() == 'ready\n', 'the warm server did not start'
        differs = {k for k in set(env) | set(cls.env) if env.get(k) != cls.env.get(k)}
        if any(k.startswith(AT_IMPORT) and k != 'OMP_NUM_THREADS' for k in differs):
            return None
        return cls.path

    @classmethod
    def stop(cls):
        if cls.process is not None:
            cls.process.stdin.close()
            cls.process.wait(timeout=30)
            shutil.rmtree(os.path.dirname(cls.path), ignore_errors=True)
            cls.process = None


class Popen:
    """subprocess.Popen([python, script, *args]) run in a fork of the warm server: pid, returncode, stdout (a pipe
    with stdout=subprocess.PIPE), poll, wait, communicate, send_signal, kill."""

    def __init__(self, argv, cwd, env, stdout=None, stderr=None, text=True, start_new_session=False,
                 file_size_limit=None):
        address = Server.address(env)
        assert address, 'check Server.address(env) first'
        self.args, self.returncode = argv, None
        fds, ours = [os.open(os.devnull, os.O_RDONLY)], []  # (the child's stdin, stdout, stderr; pipes' ends)
        for stream in (stdout, stderr):
            if stream == subprocess.PIPE:  # (a pipe: no file size limit applies to it, as to a command's)
                read, write = os.pipe()
                fds.append(write)
                ours.append(os.fdopen(read, 'r' if text else 'rb'))
            else:
                fds.append(fds[1] if stream == subprocess.STDOUT else stream.fileno())
                ours.append(None)
        self.stdout, self.stderr = ours
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(address)
        request = dict(argv=[str(a) for a in argv], cwd=str(cwd), env=env, new_session=start_new_session,
                       file_size_limit=file_size_limit)
        socket.send_fds(self._conn, [json.dumps(request).encode()], fds)
        for fd, pipe in zip(fds, [None, *ours]):
            if pipe is not None or fd == fds[0]:
                os.close(fd)
        self._buffer = b''
        self.pid = json.loads(self._line(None))['pid']

    def _line(self, timeout):
        """The server's next line, waiting at most timeout seconds (None: as long as it takes)."""
        end = None if timeout is None else time.monotonic() + timeout
        while b'\n' not in self._buffer:
            left = None if end is None else max(0.0, end - time.monotonic())
            if not select.select([self._conn], [], [], left)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            chunk = self._conn.recv(4096)
            if not chunk:
                raise RuntimeError('the warm server ended')
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b'\n', 1)
        return line

    def poll(self):
        return self.wait(0) if self.returncode is None and self._ended() else self.returncode

    def _ended(self):
        return b'\n' in self._buffer or bool(select.select([self._conn], [], [], 0)[0])

    def wait(self, timeout=None):
        if self.returncode is None:
            self.returncode = json.loads(self._line(timeout))['returncode']
            self._conn.close()
        return self.returncode

    def communicate(self, timeout=None):
        """(stdout, stderr) read to their ends (None where not piped), once the run ended within timeout."""
        texts, readers = [None, None], []
        for i, pipe in enumerate((self.stdout, self.stderr)):
            if pipe is not None:
                readers.append(threading.Thread(target=lambda i=i, pipe=pipe: texts.__setitem__(i, pipe.read())))
                readers[-1].start()
        self.wait(timeout)
        for reader in readers:
            reader.join()
        return tuple(texts)

    def send_signal(self, sig):
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def run(argv, cwd, env, timeout=None, file_size_limit=None):
    """subprocess.run([python, script, *args], capture_output=True, text=True) in a fork of the warm server."""
    p = Popen(argv, cwd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, file_size_limit=file_size_limit)
    try:
        out, err = p.communicate(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


if __name__ == '__main__':
    serve(sys.argv[1])
