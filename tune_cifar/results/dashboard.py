"""`tune_cifar dashboard EXP`: optuna-dashboard on an experiment's Optuna study (optuna.db), bound to
127.0.0.1, during a search or after it, until Ctrl-C.

The study is read through an Optuna RDBStorage that never creates tables, so pointing the command at
a search that is still running only reads what the search writes.
"""
from __future__ import annotations

import errno
import signal
import socketserver
import sys
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ..core.config import UserError
from .folders import experiment_path

HOST = "127.0.0.1"
DEFAULT_PORT = 8080


class ThreadedWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True                    # Ctrl-C does not wait for a browser's open connections


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:      # no line per request on the terminal
        pass


def open_study(exp: Path):
    """(storage, study id or None) of the experiment's optuna.db; UserError when there is none."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError
    db = exp / "optuna.db"
    if not db.is_file():
        what = "a k-fold experiment" if (exp / "kfold.csv").exists() else "not a TPE search, or not started yet"
        raise UserError(f"{exp} has no Optuna study (optuna.db): {what}; only `search` with the TPE searcher "
                        "keeps one")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}", skip_table_creation=True)
        study_id = storage.get_study_id_from_name(exp.name)
    except KeyError:                          # the search creates its study a moment after the file
        study_id = None
    except (SQLAlchemyError, RuntimeError, ValueError) as e:
        raise UserError(f"{db}: not a readable Optuna study ({type(e).__name__}: {str(e)[:160]})") from None
    return storage, study_id


def bind(app, port: int):
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: not a port number (1-65535, 0: any free one)")
    try:
        return make_server(HOST, port, app, server_class=ThreadedWSGIServer, handler_class=QuietHandler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: {HOST}:{port} is already in use (choose another with --port)") from None
        raise UserError(f"--port {port}: cannot listen on {HOST}:{port} ({e.strerror or e})") from None


def serve(results_dir: Path, name: str, port: int = DEFAULT_PORT) -> None:
    """Serve optuna-dashboard on the study of experiment NAME until Ctrl-C."""
    from optuna_dashboard import wsgi
    exp = experiment_path(results_dir, name)
    storage, study_id = open_study(exp)
    server = bind(wsgi(storage), port)
    url = f"http://{HOST}:{server.server_port}/dashboard"
    url += f"/studies/{study_id}" if study_id is not None else ""
    print(f"optuna-dashboard of {exp.name} ({exp / 'optuna.db'}): {url}", flush=True)
    print("Ctrl-C stops it", file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)       # even where a shell started us ignoring it
    signal.signal(signal.SIGTERM, stop_on_signal)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def stop_on_signal(signum, frame) -> None:
    raise KeyboardInterrupt
