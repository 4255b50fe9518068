"""The model card: what the deploy stage chose, and the SHA-256 of the ONNX file that the server may serve.

One writer (`write_card`: the deploy stage, the serving benchmark and the tests call it) and one reader
(`read_card`: the server and the folder predictor). Library: json and `stages.config` only, no stage, no torch.
"""
import json
from pathlib import Path

from stages.config import UserError, atomic_text, sha256

REQUIRED = ("model", "sha256", "variant")


def write_card(path, card, file=None):
    """Write `card` (a dict with at least "model", the ONNX file's path as the server will open it, relative to
    the project root or absolute, and "variant") to `path` as JSON, with "sha256": that of `file` (the bytes
    before they move to "model"; default: "model" itself), unless the card already gives one. Returns the card
    as written: model and sha256 first, then the card's other keys in order."""
    missing = [k for k in REQUIRED if k != "sha256" and k not in card]
    if missing:
        raise ValueError(f"a model card needs {', '.join(missing)}")
    card = {"model": str(card["model"]), "sha256": card.get("sha256") or sha256(file or card["model"]),
            **{k: v for k, v in card.items() if k not in ("model", "sha256")}}
    atomic_text(path, json.dumps(card, indent=2) + "\n")
    return card


def read_card(path):
    """The model card as a dict, after checking that the file it names has the SHA-256 it records."""
    path = Path(path)
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"model card {path} not found: build it with the export stage") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"model card {path} is not JSON: {e}") from None
    missing = [k for k in REQUIRED if not isinstance(card, dict) or k not in card]
    if missing:
        raise UserError(f"model card {path} lacks {', '.join(missing)}")
    model = Path(card["model"])                 # relative to the project root, like every path in dvc.yaml
    if not model.is_file():
        raise UserError(f"model card {path} names {model}, which does not exist (run from the project root)")
    digest = sha256(model)
    if digest != str(card["sha256"]).lower():
        raise UserError(f"{model} has SHA-256 {digest} but the card {path} says {card['sha256']}: "
                        "refusing to serve a model the card does not describe")
    return card
