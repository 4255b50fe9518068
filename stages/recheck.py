"""recheck: does the shipped deploy choice still hold on this machine?

The deploy stage times its variants on the machine that builds them, and the right choice depends on the CPU
(static INT8 is slower than FP32 without VNNI and faster with it). On the machine that will serve, run
`python -m stages.recheck` (`make recheck`): it builds, scores and times the variants again from the deploy
stage's own inputs (dvc.yaml's command) under the shipped card's deploy params, in a temporary folder, and says
whether its choice is the shipped one. No output of the pipeline is touched. Exit status 0 when the choice
holds, 1 when this machine would ship another variant.
"""
import shlex
import sys
import tempfile

import yaml

from stages import deploy
from stages.card import read_card
from stages.config import cli, parser
from stages.machine import cpu, describe, differences


def stage_args(dvc_yaml="dvc.yaml"):
    """The deploy stage's command-line options in dvc.yaml, parsed as the stage parses them."""
    cmd = shlex.split(yaml.safe_load(open(dvc_yaml))["stages"]["deploy"]["cmd"])
    return deploy.arguments().parse_args(cmd[cmd.index("stages.deploy") + 1:])


def recheck(card_path, dvc_yaml="dvc.yaml"):
    """(holds, the choice here, its reason, the shipped card)."""
    card = read_card(card_path)
    a = stage_args(dvc_yaml)
    with tempfile.TemporaryDirectory(prefix="recheck-") as out:
        here, _, _ = deploy.run(a.checkpoint, a.onnx, a.pruned, a.manifest, out,
                                deploy.Params(**card["params"]["deploy"]))
    return here["variant"] == card["variant"], here["variant"], here["reason"], card


def main():
    ap = parser(__doc__)
    ap.add_argument("--card", default="outputs/deploy/card.json")
    args = ap.parse_args()
    holds, variant, reason, card = recheck(args.card)
    built = card.get("built_on") or {}
    print(f"recheck: built on {describe(built) if built else 'an unrecorded CPU'}; here {describe()}")
    for d in differences(built, cpu()) if built else []:
        print(f"recheck: CPU difference: {d}")
    print(f"recheck: shipped {card['variant']}; here {variant} ({reason})")
    print(f"recheck: the shipped choice {'holds' if holds else 'does NOT hold'} on this machine")
    sys.exit(0 if holds else 1)


if __name__ == "__main__":
    cli(main)
