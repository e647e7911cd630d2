"""Run metrics: one JSON object per step in ``metrics.jsonl`` (the source of truth), mirrored to
the trackers named in ``loop.report_to`` (TRL's names): ``tensorboard`` (event files under
``output_dir/tensorboard``) and ``wandb`` (Weights & Biases: online when logged in, a local run
folder under ``output_dir/wandb`` when ``WANDB_MODE=offline``).

``check_report_to`` runs when the config is built, so a missing package or a W&B run with no login
is one clear error before the model loads, not a crash after step 1.  The writers themselves are
opened on the first ``log``, so a run that fails its checks (e.g. a fresh run into an
``output_dir`` that holds checkpoints) leaves no event file behind in somebody else's run.  After
a resume, TensorBoard is told to purge the events of the steps being redone (``purge_step``), the
counterpart of ``truncate_after`` for ``metrics.jsonl``, and W&B continues the same run (its id is
kept in ``output_dir/wandb_run_id``).
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import secrets
import string
from pathlib import Path
from urllib.parse import urlparse

from tracerl.errors import ConfigError, OutputError
from tracerl.files import write_text

REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # report_to name -> the package it needs
WANDB_LOCAL_MODES = ("offline", "disabled", "dryrun")  # WANDB_MODE values that need no login


def check_report_to(report_to, field: str = "loop.report_to") -> list[str]:
    """The tracker names of ``report_to`` (a name or a list; ``none`` = metrics.jsonl only), each
    with its package installed; anything else is a ``ConfigError`` naming ``field``."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if names == ["all"]:  # TRL's "all": every tracker that is installed
        return [n for n, pkg in REPORTERS.items() if importlib.util.find_spec(pkg) is not None]
    if "none" in names:
        if names != ["none"]:
            raise ConfigError(f"{field}: 'none' cannot be combined with other trackers, got {names}")
        return []
    for name in names:
        if name not in REPORTERS:
            raise ConfigError(f"{field}: unknown tracker {name!r}; valid: {', '.join(REPORTERS)}, all, none")
        if importlib.util.find_spec(REPORTERS[name]) is None:
            extra = "pip install 'tracerl[wandb]'" if name == "wandb" else f"pip install {REPORTERS[name]}"
            raise ConfigError(f"{field}: {name} is not installed ({extra}, or drop it from {field})")
    return list(dict.fromkeys(names))


def wandb_login_problem() -> str | None:
    """Why an online W&B run would fail to start here (None: it can start).  Offline modes need
    nothing; online needs an API key from WANDB_API_KEY, an identity-token file or the netrc entry
    that ``wandb login`` writes for the W&B host."""
    if os.environ.get("WANDB_MODE", "").lower() in WANDB_LOCAL_MODES:
        return None
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        if netrc.netrc(path).authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return (f"wandb: not logged in to {host} (run `wandb login` or set WANDB_API_KEY; WANDB_MODE=offline "
            "keeps the run in a local folder to `wandb sync` later)")


def check_reporting(report_to, field: str = "loop.report_to") -> list[str]:
    """``check_report_to`` plus the W&B login: everything a run's trackers need, checked up front."""
    names = check_report_to(report_to, field)
    if "wandb" in names and (problem := wandb_login_problem()):
        raise ConfigError(f"{field}: {problem}")
    return names


def _new_run_id() -> str:
    """An id in W&B's own alphabet (lowercase letters and digits, 8 characters)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class MetricsLogger:
    def __init__(self, output_dir: str | Path, *, report_to=("tensorboard",), wandb_project: str = "tracerl",
                 run_config: dict | None = None, enabled: bool = True) -> None:
        self.enabled = enabled  # False on ranks other than 0: one writer per run
        self.dir = Path(output_dir)
        self.path = self.dir / "metrics.jsonl"
        self.report_to = check_reporting(report_to)
        self.wandb_project = wandb_project
        self.run_config = run_config
        self._opened = False
        self._purge_step: int | None = None
        self._tb = None
        self._wandb = None

    def _open(self) -> None:
        self._opened = True
        self.dir.mkdir(parents=True, exist_ok=True)
        if "tensorboard" in self.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=self._purge_step)
        if "wandb" in self.report_to:
            import wandb as wandb_lib

            # One W&B run per tracerl run: a resume continues it instead of starting another.
            id_file = self.dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.exists() else _new_run_id()
            write_text(id_file, run_id + "\n")
            self._wandb = wandb_lib.init(project=self.wandb_project, dir=str(self.dir), id=run_id, resume="allow",
                                         name=self.dir.name, config=self.run_config or {})

    def truncate_after(self, step: int) -> None:
        """Drop rows written after ``step`` (rows of a run killed after its last checkpoint).

        A run killed during a write can leave a half-written last line; it is dropped too.
        """
        self._purge_step = step + 1 if step > 0 else None
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn write of a killed run
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(line)
        write_text(self.path, "".join(line + "\n" for line in kept))

    def last_logged(self, prefix: str) -> dict:
        """``{key less prefix: value}`` of the last row holding ``prefix*`` keys ({} if none): after a
        resume, e.g. the latest evaluation (``eval_``), which a run resumed at its last step reports
        without evaluating again."""
        rows = read_metrics(self.path) if self.path.exists() else []
        for row in reversed(rows):
            found = {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)}
            if found:
                return found
        return {}

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        if not self._opened:
            self._open()
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a torn last line is dropped on resume (truncate_after)
            raise OutputError(f"{self.path}: cannot write the metrics row of step {row.get('step')} "
                              f"({e.strerror or e})") from None
        step = row.get("step", 0)
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
