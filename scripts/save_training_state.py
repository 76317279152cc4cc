"""Copy what a training run needs to be resumed elsewhere into a small folder (for git or a copy).

    python scripts/save_training_state.py runs/trades-v2 training-state/trades-v2

A run in progress: the newest intact checkpoint (safetensors and JSON only: the model,
optimizer, schedule, EMA and random states, with the manifest written last), metrics.jsonl (the
learning curve a resumed run keeps), the best validated network so far (best/, best.json) and
args.json (the run's options) with the folders of the machine that ran it replaced by
placeholders. Left behind: older checkpoints and tracker logs. To go on: copy the folder back to
a run folder and repeat the run's command with --resume (and the same options).

A finished run (--finished) keeps its record and no weights: args.json, metrics.jsonl,
best.json, and from its export (final/) the model card (model-card.md), its metrics
(final-metrics.json) and learning curve (learning_curve.png). Its weights are the bundled model
or a superseded one; history keeps the latter.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from purifyguard.files import read_json, write_json
from purifyguard.provenance import portable_arguments
from purifyguard.train.run import last_checkpoint


def save_training_state(run: Path, destination: Path, finished: bool = False) -> list[Path]:
    """The copied paths, relative to destination."""
    newest = None if finished else last_checkpoint(run / "checkpoints")
    if finished and not (run / "final").is_dir():
        raise SystemExit(f"{run}: --finished, but the run has no final/ export")
    if newest is None and not finished:
        raise SystemExit(f"{run}: no intact checkpoint to copy")
    if destination.exists():
        shutil.rmtree(destination)
    copies = {name: name for name in ("metrics.jsonl", "best.json")}
    if finished:
        copies |= {"final/README.md": "model-card.md", "final/metrics.json": "final-metrics.json",
                   "final/learning_curve.png": "learning_curve.png"}
    else:
        copies |= {str(newest.relative_to(run)): str(newest.relative_to(run)), "best": "best"}
    copied = []
    for name, copy_name in copies.items():
        source, target = run / name, destination / copy_name
        if not source.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        copied.append(target.relative_to(destination))
    if (run / "args.json").is_file():
        write_json(destination / "args.json", portable_arguments(read_json(run / "args.json")))
        copied.append(Path("args.json"))
    return copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the run's --output-dir")
    parser.add_argument("destination", type=Path, help="folder to write (replaced)")
    parser.add_argument("--finished", action="store_true",
                        help="the run is over: copy its record (options, curve, model card, "
                        "metrics), no weights")
    args = parser.parse_args()
    for path in save_training_state(args.run, args.destination, args.finished):
        print(args.destination / path)


if __name__ == "__main__":
    main()
