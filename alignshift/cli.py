"""The command-line contract every experiment script shares.

    python experiments/<script>.py --config PATH --out DIR [--seeds N] [--quick] [--resume]
                                   [--methods a,b] [--skip-bad-rows] [--dry-run] [key=value ...]

A script states whether it reads real datasets (``experiment_parser(..., real_data=True)``:
``experiments/preference_hf.py``); the others run the built-in benchmark
(``data.scenario``), and :func:`parse_experiment_args` refuses a config that sets
``data.dataset`` for them (exit status 2) instead of silently ignoring it. ``--dry-run``
plans any config (real-data ones included) whatever the script.

Every entry point runs its ``main`` through :func:`run_main` (from
:mod:`alignshift.experiment.errors`, re-exported here): a data or config error (a
:class:`~alignshift.config.ConfigError`, a :class:`~alignshift.data.DataError` naming the
file/row/field, a bad JSON document, a missing file) ends the process with ONE line
``error: <message>`` on stderr and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil

from alignshift.config import ConfigError, ExperimentConfig, load_config, to_dict
from alignshift.experiment.errors import add_skip_bad_rows, exit_on, run_main, user_errors

REAL_DATA_SCRIPT = "experiments/preference_hf.py"

__all__ = ["experiment_parser", "parse_experiment_args", "prepare_out_dir", "SEED_KEYS", "seedless_config",
           "add_skip_bad_rows", "exit_on", "user_errors", "run_main"]


class _ExperimentParser(argparse.ArgumentParser):
    """``--dry-run`` is acted on at parse time, so every script built on
    :func:`experiment_parser` supports it whatever it does with the parsed arguments: the
    config (with ``--quick``/``--seeds`` and overrides) is planned by
    :func:`alignshift.dryrun.dry_run` and the process exits (0, or 2 on a config error)."""

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        if getattr(ns, "dry_run", False):
            from alignshift.dryrun import run_dry_run

            overrides = list(ns.overrides) + ([f"seeds={ns.seeds}"] if ns.seeds is not None else [])
            raise SystemExit(run_dry_run(ns.config, overrides, quick=ns.quick))
        return ns


def experiment_parser(description: str, default_config: str | None, default_out: str, *,
                      real_data: bool = False) -> argparse.ArgumentParser:
    """The shared parser. ``real_data``: the script reads ``data.dataset`` (a registered real
    dataset); without it :func:`parse_experiment_args` refuses configs that set that key."""
    p = _ExperimentParser(description=description)
    p.real_data = real_data
    p.add_argument("--config", default=default_config, help="YAML config (default: %(default)s)")
    p.add_argument("--out", default=default_out, help="output directory (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (overrides config 'seeds')")
    p.add_argument("--quick", action="store_true", help="reduced run (~1 minute on a CPU), as the tests use")
    p.add_argument("--resume", action="store_true", help="resume from checkpoints in --out (same config only)")
    p.add_argument("--methods", default=None, help="comma-separated subset of the config's method names")
    p.add_argument("--dry-run", action="store_true",
                   help="build model + optimizer state with abstract shapes, print parameter count, per-device "
                        "memory and the sharding plan on the config's mesh, and exit (no weights, no training)")
    p.add_argument("--merge", action="append", metavar="DIR", default=None,
                   help="train nothing: aggregate into --out the seeds already run (in separate processes or on "
                        "other machines) into this output directory; repeat it, one per run of the same config "
                        "with its own seed=S --seeds N; every seed of this config must be in exactly one of them")
    add_skip_bad_rows(p)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=100")
    return p


def parse_experiment_args(parser: argparse.ArgumentParser, argv=None, *, cls=ExperimentConfig,
                          check=None) -> tuple[argparse.Namespace, ExperimentConfig]:
    """Parse ``argv`` and load the config (as ``cls``, an :class:`ExperimentConfig` subclass)
    with ``--quick``/``--seeds``/``--skip-bad-rows``/overrides and ``--methods``, then run the
    script's own ``check(cfg)`` (raises :class:`ConfigError`); a config error is printed and
    exits with status 2."""
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.seeds is not None:
        overrides.append(f"seeds={args.seeds}")
    if getattr(args, "skip_bad_rows", False):
        overrides.append("data.skip_bad_rows=true")
    with exit_on(ConfigError):
        cfg = load_config(args.config, overrides, quick=args.quick, cls=cls)
        if cfg.data.dataset and not getattr(parser, "real_data", False):
            raise ConfigError(f"config key 'data.dataset' is {cfg.data.dataset!r}, but this script runs the "
                              f"built-in benchmark (data.scenario={cfg.data.scenario!r}) and cannot read real "
                              f"datasets; run real-data configs with {REAL_DATA_SCRIPT} (or remove data.dataset)")
        if args.methods:
            wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
            known = [m.name for m in cfg.methods]
            unknown = [m for m in wanted if m not in known]
            if unknown:
                raise ConfigError(f"--methods: unknown method(s) {unknown}; the config has {known}")
            cfg.methods = [m for m in cfg.methods if m.name in wanted]
        if check is not None:
            check(cfg)
    return args, cfg


#: config keys no seed's run depends on (which seeds a run covers, how many): resuming and
#: merging ignore them, so a run can be extended to more seeds or split into seed ranges
SEED_KEYS = ("seed", "seeds")


def seedless_config(cfg_or_dict) -> dict:
    """The config as JSON data without :data:`SEED_KEYS`: what every seed's run is a function of."""
    d = to_dict(cfg_or_dict) if isinstance(cfg_or_dict, ExperimentConfig) else cfg_or_dict
    return {k: v for k, v in json.loads(json.dumps(d)).items() if k not in SEED_KEYS}


def config_fingerprint(cfg: ExperimentConfig) -> str:
    """The hash ``--resume`` checks (:data:`SEED_KEYS` left out: ``--seeds 5 --resume`` extends a
    3-seed run)."""
    return hashlib.sha256(json.dumps(seedless_config(cfg), sort_keys=True).encode()).hexdigest()[:16]


def prepare_out_dir(out: str, cfg: ExperimentConfig, *, resume: bool) -> None:
    """Create ``out``. Without ``--resume`` stale checkpoints there are removed; with it the
    config must match the one the checkpoints were made with."""
    os.makedirs(out, exist_ok=True)
    stamp = os.path.join(out, "config_fingerprint.txt")
    fp = config_fingerprint(cfg)
    if resume and os.path.exists(stamp):
        with open(stamp) as f:
            old = f.read().strip()
        if old != fp:
            raise SystemExit(
                f"error: --resume: {out} was produced by a different config (fingerprint {old} != {fp}); "
                "use a new --out or drop --resume"
            )
    if not resume:
        for name in os.listdir(out):
            path = os.path.join(out, name)
            if name.startswith("seed_") and os.path.isdir(path):
                shutil.rmtree(path)
        if os.path.exists(os.path.join(out, "metrics.jsonl")):
            os.remove(os.path.join(out, "metrics.jsonl"))
    with open(stamp, "w") as f:
        f.write(fp + "\n")
