"""Experiment tracking: the records of ``metrics.jsonl``, also in TensorBoard and/or Weights & Biases.

``train.report_to`` (:class:`alignshift.config.TrainConfig`) names the trackers:

* ``"jsonl"`` (default): ``<out>/metrics.jsonl`` only. It is always written (the results
  files, plots and notebooks read it), so naming it changes nothing.
* ``"tensorboard"``: event files under ``<out>/tensorboard/``, one TensorBoard run per seed and
  method (``seed_0/sft``, ``seed_0/dpo``, ...) so runs overlay; written with ``tensorboardX``
  (extra ``[tensorboard]``). ``tensorboard --logdir <out>/tensorboard``.
* ``"wandb"``: one W&B run per seed and method, grouped by the experiment (``group`` = the
  output directory's name, ``project`` = ``$WANDB_PROJECT`` or ``alignshift``), files under
  ``<out>/`` unless ``$WANDB_DIR`` says otherwise (extra ``[wandb]``). Offline unless you are
  logged in (``WANDB_API_KEY`` set, or ``wandb login``'s netrc entry), so a run never blocks
  on the network; ``$WANDB_MODE`` (``online``/``offline``/``disabled``), when set, decides.
  Upload an offline run later with ``wandb sync <out>/wandb/offline-run-*``.

Each tracker gets the same scalar names as ``metrics.jsonl`` (``loss``, ``rewards/chosen``,
``rewards/margins``, ``logps/chosen``, ``grad_norm``, ``eval/deploy_pref_acc``, ``time_s``,
...), at the record's ``step``, plus the run's config (TensorBoard: a ``config`` text of the
JSON; W&B: the run config, with ``seed``, ``phase`` and ``method``). Fault events
(``event: "nonfinite_step"``) stay in ``metrics.jsonl`` only; the window records still carry
``nonfinite_steps``. Only JAX process 0 reports, as on a multi-host run every process sees the
same (global) metrics.

Use: :func:`start` once per run (the experiment driver does), after which every record the
training loop (:func:`alignshift.train.loop.train_loop`) writes also goes to :func:`log`;
:func:`stop` (or the end of the process) flushes and closes. A package that is missing is a
:class:`~alignshift.config.ConfigError` naming the extra to install.
"""

from __future__ import annotations

import atexit
import json
import netrc
import os
import urllib.parse

import numpy as np

from alignshift.config import REPORT_TO, ConfigError, report_to_list

__all__ = ["Tracking", "TensorBoardTracker", "WandbTracker", "start", "stop", "active", "log", "wandb_mode",
           "stream_name", "scalars"]

#: record keys that name the stream (run) a record belongs to, not a metric
STREAM_KEYS = ("scenario", "seed", "phase", "method")


def _require(name: str):
    module, extra = REPORT_TO[name]
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(f"config key 'train.report_to' asks for {name!r}, but its package {module!r} is not "
                          f"installed: pip install 'alignshift[{extra}]' (from a clone: pip install -e '.[{extra}]')"
                          ) from None


def stream_name(record: dict) -> str:
    """The run a record belongs to: ``seed_<s>/<method>`` (``train`` without a method)."""
    method = str(record.get("method") or record.get("phase") or "train")
    return f"seed_{record['seed']}/{method}" if record.get("seed") is not None else method


def scalars(record: dict) -> dict[str, float]:
    """The record's numeric metrics under their ``metrics.jsonl`` names (stream keys, ``step``
    and non-scalar values left out; non-finite values kept as ``nan``/``inf``)."""
    out = {}
    for k, v in record.items():
        if k in STREAM_KEYS or k in ("step", "event") or isinstance(v, (str, bool, dict, list, tuple)) or v is None:
            continue
        a = np.asarray(v)
        if a.size == 1 and a.dtype.kind in "fiu":
            out[k] = float(a.reshape(()))
    return out


def _logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """``$WANDB_MODE`` when set, else ``online`` if logged in, else ``offline``."""
    return os.environ.get("WANDB_MODE") or ("online" if _logged_in() else "offline")


class TensorBoardTracker:
    """One ``tensorboardX.SummaryWriter`` per stream under ``logdir``; each gets the config text."""

    def __init__(self, logdir: str, config: dict):
        self._tbx = _require("tensorboard")
        self.logdir, self.config = logdir, config
        self._writers: dict = {}

    def _writer(self, stream: str, record: dict):
        w = self._writers.get(stream)
        if w is None:
            w = self._tbx.SummaryWriter(os.path.join(self.logdir, stream), flush_secs=30)
            run = {k: record[k] for k in STREAM_KEYS if k in record}
            w.add_text("config", "```json\n" + json.dumps({**run, "config": self.config}, indent=1, default=str)
                       + "\n```", 0)
            self._writers[stream] = w
        return w

    def log(self, record: dict) -> None:
        values = scalars(record)
        if not values or "step" not in record:
            return
        w = self._writer(stream_name(record), record)
        for k, v in values.items():
            w.add_scalar(k, v, int(record["step"]))
        w.flush()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers = {}


class WandbTracker:
    """One W&B run per stream (``reinit="create_new"``), grouped by ``group``."""

    def __init__(self, directory: str, config: dict, *, group: str, project: str | None = None):
        self._wandb = _require("wandb")
        self.directory = os.environ.get("WANDB_DIR") or directory
        self.config, self.group = config, group
        self.project = project or os.environ.get("WANDB_PROJECT") or "alignshift"
        self.mode = wandb_mode()
        self._runs: dict = {}

    def _run(self, stream: str, record: dict):
        r = self._runs.get(stream)
        if r is None:
            os.makedirs(self.directory, exist_ok=True)
            run = {k: record[k] for k in STREAM_KEYS if k in record}
            r = self._wandb.init(project=self.project, group=self.group, name=f"{self.group}/{stream}",
                                 job_type=str(record.get("phase") or "train"), dir=self.directory,
                                 config={**self.config, **run}, mode=self.mode, reinit="create_new",
                                 settings=self._wandb.Settings(quiet=True, console="off"))
            self._runs[stream] = r
        return r

    def log(self, record: dict) -> None:
        values = scalars(record)
        if not values or "step" not in record:
            return
        self._run(stream_name(record), record).log(values, step=int(record["step"]))

    def close(self) -> None:
        for r in self._runs.values():
            r.finish()
        self._runs = {}


class Tracking:
    """The trackers of one run: :meth:`log` sends a record to each."""

    def __init__(self, report_to, out_dir: str, config: dict | None = None, *, name: str | None = None):
        names = report_to_list(report_to)
        config = json.loads(json.dumps(config or {}, default=str))
        name = name or os.path.basename(os.path.normpath(os.path.abspath(out_dir)))
        self.trackers = []
        try:
            if "tensorboard" in names:
                self.trackers.append(TensorBoardTracker(os.path.join(out_dir, "tensorboard"), config))
            if "wandb" in names:
                self.trackers.append(WandbTracker(out_dir, config, group=name))
        except BaseException:
            self.close()
            raise

    def log(self, record: dict) -> None:
        if record.get("event") is not None:
            return
        for t in self.trackers:
            t.log(record)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []


_active: Tracking | None = None


def start(report_to, out_dir: str, config: dict | None = None, *, name: str | None = None) -> Tracking | None:
    """Start the run's trackers (closing any earlier ones); ``None`` when there are none to start
    (``report_to`` is ``jsonl`` only, or this is not JAX process 0)."""
    global _active
    stop()
    names = report_to_list(report_to)
    if not any(REPORT_TO[n][0] for n in names):
        return None
    import jax

    if jax.process_index() != 0:
        return None
    _active = Tracking(names, out_dir, config, name=name)
    return _active


def active() -> Tracking | None:
    return _active


def stop() -> None:
    """Flush and close the active trackers (no-op without any)."""
    global _active
    t, _active = _active, None
    if t is not None:
        t.close()


def log(record: dict) -> None:
    """Send one ``metrics.jsonl`` record (stream keys included) to the active trackers, if any."""
    if _active is not None:
        _active.log(record)


atexit.register(stop)
