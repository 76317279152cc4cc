"""Fine-tune with accelerate: train a classifier, then adapt a purifier to it.

    python examples/fine_tune.py          # tiny setting: a few steps, a tiny network, batch 4
    python examples/fine_tune.py --full   # the setting of docs/training.md (hours on a CPU)

Each routine runs as `accelerate launch -m purifyguard.train <routine> --config <file>.yaml`;
the YAML files are written to --output-dir, so they can be edited and rerun by hand. The same
commands run on one GPU, several GPUs or several machines as accelerate is configured (see
docs/training.md). Needs the Fashion-MNIST IDX files: --data-root <folder>, or found in
$PURIFYGUARD_FASHION_MNIST or /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist);
without them it stops at once, saying so. To adapt a classifier you hold in memory (timm,
torchvision or your own), see examples/own_classifier.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from purifyguard.train.inputs import load_training_data

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--full", action="store_true", help="the real setting (slow)")
parser.add_argument("--output-dir", default="purifyguard-fine-tune")
parser.add_argument("--data-root", help="folder of the Fashion-MNIST IDX files (default: "
                    "$PURIFYGUARD_FASHION_MNIST or /usr/share/datasets/fashion-mnist)")
args = parser.parse_args()
# The data first: a missing data set is one message, before anything runs or is written.
try:
    load_training_data("fashion-mnist", args.data_root)
except ValueError as error:
    sys.exit(f"fine_tune.py: {error}")
out = Path(args.output_dir)
out.mkdir(parents=True, exist_ok=True)

# 1. The classifier to defend, trained by the `guidance` routine. beta 0 and no PGD is plain
#    training (how the bundled classifier was trained); beta 6 with pgd_steps 10 is TRADES, which
#    is how the robust guidance network inside a purifier is trained (docs/training.md).
guidance = {
    "model": "resnet10t", "model_kwargs": '{"channels": [8, 16, 32, 64]}',
    "beta": 0, "pgd_steps": 0, "optimizer_steps": 3, "batch_size": 4,
    "eval_images": 16, "checkpoint_every": 1000, "log_every": 1,
    "output_dir": str(out / "classifier"),
}
# 2. Adaptation: the registered purifier's guidance network and guidance scale, trained end to
#    end against PGD on classifier(purify(x)) for the classifier of step 1. optimizer_steps is the
#    length of the run; sampler_steps the reverse steps of the few-step purifier it trains through.
adapt = {
    "eps": 0.1, "attack_steps": 1, "sampler_steps": 2, "optimizer_steps": 2, "batch_size": 2,
    "checkpoint_every": 1000, "log_every": 1, "output_dir": str(out / "adapted"),
}
if args.full:
    guidance.update(model="resnet18", model_kwargs='{"channels": [16, 32, 64, 128]}',
                    optimizer_steps=4000, batch_size=128, eval_images=10000)
    adapt.update(attack_steps=3, optimizer_steps=500, batch_size=32)
if args.data_root:
    guidance["data_root"] = adapt["data_root"] = str(Path(args.data_root).resolve())

env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
# --purifier and --classifier are required options, which argparse wants on the command line.
adapt_flags = ["--purifier", "fashion-mnist-agdm", "--classifier", str(out / "classifier" / "final")]
for routine, options, flags in [("guidance", guidance, []), ("adapt", adapt, adapt_flags)]:
    config = out / f"{routine}.yaml"
    config.write_text(yaml.safe_dump(options, sort_keys=False))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "purifyguard.train", routine, "--config", str(config), "--no-progress", *flags,
    ]
    print("$ accelerate launch -m purifyguard.train", routine, "--config", config, *flags, flush=True)
    subprocess.run(command, check=True, env=env)

metrics = json.loads((out / "classifier" / "final" / "metrics.json").read_text())
print("classifier:", metrics)
print("adapted purifier:", out / "adapted" / "final")
print("load it with purifyguard.Purifier.from_pretrained"
      f"({str(out / 'adapted' / 'final')!r}) or PurifiedModel(classifier, that folder)")
