"""Typed access to `params.yaml`: each stage loads its own section into a frozen dataclass."""
import contextlib
import dataclasses
import difflib
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

PARAMS = Path("params.yaml")


class UserError(Exception):
    """Bad input the user can fix; printed as one line, never as a traceback."""


def load_section(cls, section, path=PARAMS):
    """`params.yaml[section]` as a frozen dataclass `cls`; unknown or missing keys fail with the fix."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: run from the project root")
    params = yaml.safe_load(path.read_text()) or {}
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
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: section '{section}': {e}") from None


def resolve_device(request):
    """'auto' | 'cpu' | 'cuda' -> a torch device string; asking for an absent GPU is a clear error."""
    import torch

    if request not in ("auto", "cpu", "cuda"):
        raise UserError(f"device '{request}' is not one of auto, cpu, cuda")
    if request == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is visible here; "
                        "set it to 'auto' or 'cpu' in params.yaml's 'devices' section")
    if request == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return request


def stage_device(stage, path=PARAMS):
    """The device for `stage` from params.yaml's `devices` section (not a DVC param: see dvc.yaml)."""
    params = yaml.safe_load(Path(path).read_text()) or {}
    return resolve_device((params.get("devices") or {}).get(stage, "auto"))


def sha256(path):
    """Hex SHA-256 of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write(path, write):
    """Call `write(tmp_path)`, then move the result onto `path`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    os.chmod(tmp, 0o644)                     # mkstemp makes 0600; outputs are for everyone to read
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path):
    """Build a folder in a temporary sibling, then swap it in whole: never half a stage's output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
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
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_text(path, text):
    atomic_write(path, lambda p: p.write_text(text))


def cli(main):
    """Run a stage's `main()`, turning a UserError into one line on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
