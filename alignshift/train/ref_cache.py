"""On-disk cache of precomputed reference log-probs, reused across runs and methods.

The frozen reference policy's per-sequence log-probs (``reference_{g}_logps [N]``, see
:func:`alignshift.train.phases.precompute_reference_logps`) depend only on (a) the token
arrays, (b) the reference weights and (c) a few settings that are not visible in either
(tokenizer, max lengths, chat template, model architecture hyper-parameters such as
``rope_theta``/``rms_norm_eps``, dtype, library version...). :func:`cache_key` hashes all three;
:class:`ReferenceLogpCache` stores one entry per key::

    <dir>/<key>.npz    the arrays returned by ``compute_fn`` (np.savez, uncompressed)
    <dir>/<key>.json   manifest: key components, shapes/dtypes, sha256 of every array and
                       of the npz file, N, creation time

Usage::

    cache = ReferenceLogpCache(cfg.train.reference_cache_dir)
    ref = cache.get_or_compute(arrays, ref_params,
                               lambda a: precompute_reference_logps(logits_fn, ref_params, a),
                               extra={"tokenizer": ..., "max_prompt_len": 8, ...})
    arrays.update(ref)
    cache.last_hit  # True if served from disk

Guarantees
----------
* Changing any token, mask bit, array shape/dtype, weight element/dtype/tree path, or any
  ``extra`` value changes the key, so a stale entry is never looked up.
* A hit is validated before use: npz and manifest both present and readable, the manifest's
  key components equal the ones just computed, the array names equal the manifest's (and
  ``expected_keys`` if given), every array is 1-D of length N (the token arrays' N), floating,
  finite, and byte-identical to the sha256 recorded at write time. Any failure is reported
  with a :class:`ReferenceCacheWarning` naming the file and the reason, and the entry is
  recomputed and overwritten -- never silently used.
* Writes are atomic: each file is written to a ``.tmp-*`` file in the same directory, fsynced
  and ``os.replace``-d into place; the npz is written before the manifest, and the manifest
  records the npz's sha256, so a crash at any point leaves either no entry, or an
  incomplete entry that is detected (and rebuilt) on the next lookup. If ``compute_fn``
  raises, nothing is written. (Only a hard kill mid-write can leave a ``.tmp-*`` file behind;
  such files are never read and can be deleted.)

Cost of the weight fingerprint
------------------------------
By default the reference weights are fingerprinted by hashing every leaf's bytes (sha256,
~0.5-1.5 GB/s per core, plus a device-to-host copy): negligible for the tiny models, roughly
1-4 s for a 1B-parameter bf16 model (2 GB), proportionally more for larger ones, and it needs
every leaf addressable from this host (single-host; a multi-host sharded tree cannot be
``device_get``-ed). Pass ``weights_id`` to skip the hashing and use a caller-provided identity
instead (e.g. :func:`weights_id_from_files` of an HF folder). The caller is then responsible for
the identity really determining the weights -- e.g. it must NOT be the HF folder of a base model
that is SFT-ed before becoming the reference.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import os
import time
import warnings
from typing import Callable, Iterable, Mapping

import jax
import numpy as np

from alignshift.io import atomic_write

__all__ = [
    "ReferenceCacheWarning",
    "ReferenceLogpCache",
    "arrays_fingerprint",
    "cache_key",
    "key_components",
    "weights_fingerprint",
    "weights_id_from_files",
]

#: Bumped whenever the cache layout or the hashing scheme changes (old entries become misses).
CACHE_FORMAT = 1

#: Token-array suffixes that enter the data fingerprint (``prompt_*`` and ``reference_*`` don't).
TOKEN_SUFFIXES = ("_input_ids", "_attention_mask", "_loss_mask")


class ReferenceCacheWarning(UserWarning):
    """A cache entry was found but rejected (mismatched, corrupt or incomplete) and is rebuilt."""


def _token_keys(arrays: Mapping) -> list[str]:
    return sorted(k for k in arrays if k.endswith(TOKEN_SUFFIXES))


def _update_array(h, name: str, x: np.ndarray) -> None:
    x = np.ascontiguousarray(x)
    header = json.dumps([name, x.dtype.str, list(x.shape)])  # dtype.str includes byte order
    h.update(len(header).to_bytes(8, "little"))
    h.update(header.encode())
    h.update(x.nbytes.to_bytes(8, "little"))
    h.update(x.tobytes())


def arrays_fingerprint(arrays: Mapping) -> str:
    """sha256 over the name, dtype, shape and exact bytes of every ``*_input_ids``,
    ``*_attention_mask``, ``*_loss_mask`` array, in sorted key order."""
    keys = _token_keys(arrays)
    if not keys:
        raise ValueError(f"no token arrays ({', '.join('*' + s for s in TOKEN_SUFFIXES)}) in {sorted(arrays)}")
    h = hashlib.sha256(b"alignshift.ref_cache.arrays\0")
    for k in keys:
        _update_array(h, k, np.asarray(arrays[k]))
    return h.hexdigest()


def weights_fingerprint(params) -> str:
    """sha256 over every leaf of the ``params`` pytree: its key path, dtype, shape and bytes
    (so the tree structure, dtypes and every element enter). Costs one device-to-host copy and
    one pass of sha256 over all parameter bytes (see module docstring)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    h = hashlib.sha256(b"alignshift.ref_cache.weights\0")
    h.update(len(leaves).to_bytes(8, "little"))
    for path, leaf in leaves:
        _update_array(h, jax.tree_util.keystr(path), np.asarray(jax.device_get(leaf)))
    return h.hexdigest()


def weights_id_from_files(folder: str, patterns: Iterable[str] = ("*.safetensors", "*.bin", "*.msgpack",
                                                                 "config.json")) -> str:
    """A cheap weights identity for a checkpoint folder: its absolute path plus the name, size
    and mtime (ns) of every file matching ``patterns``. Not a content hash: it detects
    replaced/rewritten files, not a same-size in-place edit that preserves mtime."""
    folder = os.path.abspath(folder)
    files = sorted({f for p in patterns for f in glob.glob(os.path.join(folder, p))})
    if not files:
        raise FileNotFoundError(f"no files matching {list(patterns)} in {folder}")
    parts = []
    for f in files:
        st = os.stat(f)
        parts.append([os.path.basename(f), st.st_size, st.st_mtime_ns])
    return json.dumps({"folder": folder, "files": parts}, sort_keys=True, separators=(",", ":"))


def _json_default(o):
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"extra: value of type {type(o).__name__} is not JSON-serialisable; pass a str/number/list/dict")


def _canonical_extra(extra: Mapping) -> str:
    return json.dumps(dict(extra), sort_keys=True, separators=(",", ":"), default=_json_default, allow_nan=True)


def key_components(arrays: Mapping, ref_params, *, extra: Mapping, weights_id: str | None = None) -> dict:
    """The three parts hashed by :func:`cache_key` (recorded in each entry's manifest)."""
    if weights_id is not None:
        if not isinstance(weights_id, str) or not weights_id:
            raise TypeError("weights_id must be a non-empty str or None")
        weights = "id:" + weights_id
    else:
        weights = "sha256:" + weights_fingerprint(ref_params)
    return {"format": CACHE_FORMAT, "arrays": "sha256:" + arrays_fingerprint(arrays), "weights": weights,
            "extra": _canonical_extra(extra)}


def _key_from_components(comp: Mapping) -> str:
    blob = json.dumps({k: comp[k] for k in ("format", "arrays", "weights", "extra")}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_key(arrays: Mapping, ref_params, *, extra: Mapping, weights_id: str | None = None) -> str:
    """sha256 (hex) over the token-array fingerprint, the weights fingerprint (or ``"id:" +
    weights_id`` when given; ``ref_params`` is then not read) and ``extra`` as sorted JSON."""
    return _key_from_components(key_components(arrays, ref_params, extra=extra, weights_id=weights_id))


def _n_examples(arrays: Mapping) -> int:
    ns = {k: int(np.shape(arrays[k])[0]) for k in _token_keys(arrays)}
    if len(set(ns.values())) != 1:
        raise ValueError(f"token arrays disagree on N: {ns}")
    return next(iter(ns.values()))


def _sha(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def _file_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: str, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


class _Invalid(Exception):
    pass


class _Absent(Exception):
    pass


class ReferenceLogpCache:
    """Directory of reference log-prob entries keyed by :func:`cache_key`.

    After each :meth:`get_or_compute`: ``last_hit`` (bool: served from disk), ``last_key``,
    ``last_path`` (the npz) and ``last_reason`` (None, ``"miss"``, or why an entry was
    rejected). ``stats`` counts ``hits``, ``misses`` and ``rebuilds`` (rejected entries).
    """

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.last_hit: bool | None = None
        self.last_key: str | None = None
        self.last_path: str | None = None
        self.last_reason: str | None = None
        self.stats = {"hits": 0, "misses": 0, "rebuilds": 0}

    def paths(self, key: str) -> tuple[str, str]:
        """``(npz, manifest)`` paths of ``key``."""
        return os.path.join(self.directory, key + ".npz"), os.path.join(self.directory, key + ".json")

    # -- lookup ---------------------------------------------------------------------------
    def _load(self, key: str, comp: dict, n: int, expected_keys) -> dict[str, np.ndarray]:
        npz_path, man_path = self.paths(key)
        has_npz, has_man = os.path.exists(npz_path), os.path.exists(man_path)
        if not has_npz and not has_man:
            raise _Absent
        if not has_man:
            raise _Invalid("manifest missing (interrupted write?)")
        if not has_npz:
            raise _Invalid("npz missing")
        try:
            with open(man_path) as f:
                man = json.load(f)
        except (OSError, ValueError) as e:
            raise _Invalid(f"unreadable manifest: {e}") from None
        if not isinstance(man, dict) or man.get("key") != key:
            raise _Invalid("manifest key does not match the file name")
        for part in ("format", "arrays", "weights", "extra"):
            if man.get("components", {}).get(part) != comp[part]:
                raise _Invalid(f"manifest component {part!r} differs from the requested one")
        if man.get("n") != n:
            raise _Invalid(f"manifest N={man.get('n')} but the arrays have N={n}")
        try:
            if _file_sha(npz_path) != man.get("npz_sha256"):
                raise _Invalid("npz sha256 differs from the manifest (corrupt or truncated file)")
            with np.load(npz_path, allow_pickle=False) as z:
                out = {k: z[k] for k in z.files}
        except _Invalid:
            raise
        except Exception as e:  # BadZipFile, ValueError, EOFError, OSError, ...
            raise _Invalid(f"unreadable npz: {type(e).__name__}: {e}") from None
        names = sorted(man.get("arrays", {}))
        if sorted(out) != names:
            raise _Invalid(f"npz holds {sorted(out)}, manifest lists {names}")
        if expected_keys is not None and sorted(out) != sorted(expected_keys):
            raise _Invalid(f"npz holds {sorted(out)}, expected {sorted(expected_keys)}")
        for k, v in out.items():
            _check_value(k, v, n)
            if _sha(v) != man["arrays"][k].get("sha256"):
                raise _Invalid(f"{k}: sha256 differs from the manifest")
        return out

    # -- public API -----------------------------------------------------------------------
    def get_or_compute(self, arrays: Mapping, ref_params, compute_fn: Callable[[Mapping], Mapping], *,
                       extra: Mapping, weights_id: str | None = None,
                       expected_keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Reference log-probs for ``arrays``: from ``<dir>/<key>.npz`` if a valid entry exists
        (``self.last_hit = True``), else ``compute_fn(arrays)`` (``{name: [N] float array}``),
        stored atomically and returned (``self.last_hit = False``). A hit returns exactly the
        bytes that were computed and stored. ``expected_keys`` (optional) are the array names
        an entry must hold (by default: the names its manifest records). A result that is not
        1-D/length-N/finite is returned but not cached (with a warning)."""
        comp = key_components(arrays, ref_params, extra=extra, weights_id=weights_id)
        key = _key_from_components(comp)
        n = _n_examples(arrays)
        npz_path, man_path = self.paths(key)
        self.last_key, self.last_path = key, npz_path
        try:
            out = self._load(key, comp, n, expected_keys)
        except _Absent:
            self.last_reason = "miss"
            self.stats["misses"] += 1
        except Exception as e:  # _Invalid, or a malformed manifest / a file vanishing mid-read
            if not isinstance(e, _Invalid):
                e = f"malformed entry: {type(e).__name__}: {e}"
            self.last_reason = str(e)
            self.stats["rebuilds"] += 1
            warnings.warn(f"reference log-prob cache entry {npz_path} rejected ({e}); recomputing",
                          ReferenceCacheWarning, stacklevel=2)
        else:
            self.last_hit, self.last_reason = True, None
            self.stats["hits"] += 1
            return out

        self.last_hit = False
        t0 = time.perf_counter()
        out = {k: np.asarray(v) for k, v in dict(compute_fn(arrays)).items()}
        seconds = time.perf_counter() - t0
        try:
            if not out:
                raise _Invalid("compute_fn returned no arrays")
            if expected_keys is not None and sorted(out) != sorted(expected_keys):
                raise _Invalid(f"compute_fn returned {sorted(out)}, expected {sorted(expected_keys)}")
            for k, v in out.items():
                _check_value(k, v, n)
        except _Invalid as e:
            warnings.warn(f"reference log-probs for key {key} not cached: {e}", ReferenceCacheWarning, stacklevel=2)
            return out
        self._store(key, comp, n, out, seconds)
        return out

    def _store(self, key: str, comp: dict, n: int, out: dict, seconds: float) -> None:
        npz_path, man_path = self.paths(key)
        buf = io.BytesIO()
        np.savez(buf, **out)
        data = buf.getvalue()
        manifest = {
            "key": key,
            "components": comp,
            "extra": json.loads(comp["extra"]),
            "n": n,
            "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype.str, "sha256": _sha(v)} for k, v in out.items()},
            "npz_sha256": hashlib.sha256(data).hexdigest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "created_unix": time.time(),
            "compute_seconds": round(seconds, 3),
        }
        # npz first, manifest last: an entry without a (matching) manifest is never used
        _write_atomic(npz_path, data)
        _write_atomic(man_path, json.dumps(manifest, indent=2).encode())


def _check_value(k: str, v: np.ndarray, n: int) -> None:
    if v.ndim != 1 or v.shape[0] != n:
        raise _Invalid(f"{k}: shape {v.shape}, expected ({n},)")
    if not np.issubdtype(v.dtype, np.floating):
        raise _Invalid(f"{k}: dtype {v.dtype} is not floating")
    if not np.all(np.isfinite(v)):
        raise _Invalid(f"{k}: {int(np.sum(~np.isfinite(v)))} non-finite values")
