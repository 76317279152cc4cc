"""A reduced adaptive check of the bundled purifiers (not the protocol's reference setting).

    python benchmarks/bundled_adaptive_check.py [--n 64] [--steps 10] [--output-dir runs/eval]

The bundled classifier undefended, behind fashion-mnist-ddpm and behind fashion-mnist-agdm, on
the first n bundled test images: PGD with full gradients and BPDA, L-inf 0.1, EOT 1, R = 3,
seed 0. Prints the Markdown table (docs/pretrained.md quotes one run of it).
"""

import argparse

import torch

from purifyguard import PurifiedModel, bundled_classifier, bundled_test_images
from purifyguard.evaluation import evaluate_models, markdown_table
from purifyguard.evaluation.attacks import AttackSpec

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--n", type=int, default=64)
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--output-dir", default="runs/eval/bundled-adaptive")
args = parser.parse_args()

torch.set_num_threads(1)
images, labels, classes = bundled_test_images()
classifier = bundled_classifier()
models = {
    "undefended": PurifiedModel(classifier, purifier=False),
    "ddpm-none": PurifiedModel(classifier, "fashion-mnist-ddpm"),
    "agdm": PurifiedModel(classifier, "fashion-mnist-agdm"),
}
attacks = [
    AttackSpec(kind="pgd", name=f"pgd{args.steps}-full", eps=0.1, steps=args.steps, eot=1),
    AttackSpec(kind="bpda", name=f"bpda{args.steps}", eps=0.1, steps=args.steps, eot=1),
]
report = evaluate_models(models, (images, labels), attacks, n=args.n, batch_size=64, runs=3,
                         seed=0, output_dir=args.output_dir, class_names=classes)
print(markdown_table(report))
