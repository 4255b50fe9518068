"""Typed access to `params.yaml`: each stage loads its own section into a frozen dataclass."""
import argparse
import contextlib
import dataclasses
import difflib
import fcntl
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
import typing
from pathlib import Path

import yaml

PARAMS = Path("params.yaml")


class UserError(Exception):
    """Bad input the user can fix; printed as one line, never as a traceback."""


class Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `1e-3` is a string; DVC (ruamel) and YAML 1.2 read it as a number."""


Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                             list("-+0123456789."))


def read_params(path=PARAMS):
    """The whole of `params.yaml` as plain values, numbers as YAML 1.2 reads them (what DVC sees)."""
    return yaml.load(Path(path).read_text(), Loader) or {}


KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", tuple: "a list",
         dict: "a mapping"}


def typed(cls, values, where):
    """`values` checked against the dataclass `cls`'s field types: an integral float is an int, an int is a
    float, a list is a tuple; anything else wrong is a UserError naming `where.key` and the type expected."""
    hints, out = typing.get_type_hints(cls), dict(values)
    for key, value in values.items():
        kind = hints.get(key)
        if kind not in KINDS or isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool):
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            out[key] = float(value)
        elif kind is int and isinstance(value, float) and value.is_integer():
            out[key] = int(value)
        elif kind is tuple and isinstance(value, list):
            out[key] = tuple(value)
        elif kind is dict and value is None:
            out[key] = {}
        else:
            got = f"the string '{value}'" if isinstance(value, str) else f"{value!r} ({type(value).__name__})"
            hint = " (remove the quotes)" if isinstance(value, str) and _number(value) else ""
            raise UserError(f"{where}.{key} must be {KINDS[kind]}, not {got}{hint}")
    return out


def _number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def load_section(cls, section, path=PARAMS):
    """`params.yaml[section]` as a frozen dataclass `cls`; unknown or missing keys fail with the fix."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: run from the project root")
    params = read_params(path)
    if section not in params:
        close = difflib.get_close_matches(section, params, n=1)
        hint = f" (found '{close[0]}': a typo?)" if close else ""
        raise UserError(f"{path}: section '{section}' is missing{hint}")
    values = params[section] or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            raise UserError(f"{path}: unknown key '{section}.{key}'{hint}")
    missing = [n for n, f in fields.items() if n not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{path}: '{section}' lacks {', '.join(missing)}")
    values = typed(cls, values, f"{path}: {section}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: section '{section}': {e}") from None


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(request):
    """'auto' | 'cpu' | 'cuda' -> a torch device string; asking for an absent GPU is a clear error."""
    import torch

    if request not in DEVICES:
        raise UserError(f"device '{request}' is not one of {', '.join(DEVICES)}")
    if request == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is visible here; "
                        "set it to 'auto' or 'cpu' in params.yaml's 'devices' section")
    if request == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return request


@dataclasses.dataclass(frozen=True)
class Devices:
    """params.yaml's `devices` section: where each stage that runs a network runs it (not a DVC param)."""
    train: str = "auto"
    prune: str = "auto"
    evaluate: str = "auto"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) not in DEVICES:
                raise ValueError(f"{f.name} is '{getattr(self, f.name)}', not one of {', '.join(DEVICES)}")


def stage_device(stage, path=PARAMS):
    """The torch device for `stage` from params.yaml's `devices` section, validated like every section (a typo
    names the right key); a file without the section, or a stage it has no key for, gets 'auto'."""
    devices = load_section(Devices, "devices", path) if "devices" in read_params(path) else Devices()
    return resolve_device(getattr(devices, stage, "auto"))


def sha256(path):
    """Hex SHA-256 of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _locked(path):
    """An open, exclusively locked descriptor of `path`: while it is open, `clean_stale` leaves `path` alone."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def clean_stale(path, min_age_s=10):
    """Remove the temporary siblings (`.<name>.*`) that killed runs left behind: only those no live run holds
    locked (every atomic write locks its own) and untouched for `min_age_s` (one just made is not locked yet)."""
    path = Path(path)
    for old in sorted(path.parent.glob(f".{path.name}.*")):
        if old.is_symlink() or time.time() - old.stat().st_mtime < min_age_s:
            continue
        fd = os.open(old, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue                            # a run still writing it
        else:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        finally:
            os.close(fd)


def atomic_write(path, write):
    """Call `write(tmp_path)`, then move the result onto `path`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    lock = _locked(tmp)
    os.chmod(tmp, 0o644)                     # mkstemp makes 0600; outputs are for everyone to read
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(lock)


@contextlib.contextmanager
def atomic_dir(path):
    """Build a folder in a temporary sibling, then swap it in whole: never half a stage's output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    lock = _locked(tmp)
    tmp.chmod(0o755)
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        os.close(lock)
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_text(path, text):
    atomic_write(path, lambda p: p.write_text(text))


def parser(doc, *required):
    """The command line of a stage or tool: described by its module docstring's first line, with the `required`
    options ("--out", or ("--out", "its help")); add the optional ones to what it returns."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    for option in required:
        name, help = (option, None) if isinstance(option, str) else option
        ap.add_argument(name, required=True, help=help)
    return ap


def cli(main):
    """Run a stage's `main()`, turning a UserError into one line on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
