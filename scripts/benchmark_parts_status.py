"""Where the parts of scripts/benchmark_parts.sh stand: per part and defence, the stored batches
of each evaluated attack and the headline's finished attacks (with the one under way and its
batches); read from the stored files alone, so it runs beside the parts without loading a model.
The plug-in rows (ours-trades-classifier, the unseen classifiers bare and ours-NAME) run on the
first 128 of the 256 images (`--plug-in-n 128`): 4 of the 8 batches are all they need. The
part clean-cost has no attack: its clean-cost folder's batches per model are listed apart.

    python scripts/benchmark_parts_status.py [STATE]     # default STATE: benchmark-state
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from safetensors import safe_open

from purifyguard.evaluation.headline import STATE_FILE


def stored_batches(folder: Path) -> Counter:
    """(defence, attack) -> batches stored in the folder's batches-*.jsonl (keys
    'model@version|attack#settings|batch'; 'clean' for the clean verdicts)."""
    keys = set()
    for path in folder.glob("batches-*.jsonl"):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                keys.add(json.loads(line)["key"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short: its batch runs again
    counts = Counter()
    for key in keys:
        model, attack, _ = key.split("|")
        counts[model.partition("@")[0], attack.partition("#")[0]] += 1
    return counts


def headline_progress(folder: Path) -> str:
    """'k attacks done (names), now NAME: b/B batches' from a headline-state file."""
    with safe_open(str(folder / STATE_FILE), framework="pt") as file:
        meta = json.loads(file.metadata()["headline"])
    done = [item["name"] for item in meta["per_attack"]]
    text = f"{len(done)} attacks done ({', '.join(done) or 'none'})"
    current = meta["current"]
    if current:
        batches = -(-len(current["survivors"]) // meta["settings"]["batch_size"])
        text += (f", now {current['attack'].get('name') or current['attack'].get('kind')}: "
                 f"{current['batches_done']}/{batches} batches of {len(current['survivors'])} "
                 "survivors")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state", nargs="?", default="benchmark-state")
    args = parser.parse_args(argv)
    parts = sorted(Path(args.state).glob("fashion-mnist-*/run.json"))
    clean_costs = sorted(Path(args.state).glob("fashion-mnist-*/clean-cost/run.json"))
    if not parts and not clean_costs:
        raise SystemExit(f"no benchmark parts in {args.state}")
    for run_file in parts:
        folder = run_file.parent
        settings = json.loads(run_file.read_text())
        expected = -(-settings["n"] // settings["batch_size"])
        finished = "finished" if (folder / "benchmark.json").is_file() else "not finished"
        print(f"{folder.name} ({finished}; {expected} batches an attack)")
        for (model, attack), count in sorted(stored_batches(folder).items()):
            print(f"  {model} | {attack}: {count}/{expected} batches")
        for sanity in sorted((folder / "sanity").glob("*/run.json")):
            counts = stored_batches(sanity.parent)
            print(f"  sanity {sanity.parent.name}: {sum(counts.values())} batches stored")
        for state in sorted(folder.glob(f"headline-*/{STATE_FILE}")):
            print(f"  {state.parent.name}: {headline_progress(state.parent)}")
    for run_file in clean_costs:
        settings = json.loads(run_file.read_text())
        expected = -(-settings["n"] // settings["batch_size"])
        print(f"{run_file.parents[1].name}: clean cost on {settings['n']} images")
        for (model, _), count in sorted(stored_batches(run_file.parent).items()):
            print(f"  {model}: {count}/{expected} batches")


if __name__ == "__main__":
    main()
