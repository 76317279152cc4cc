"""Gradient grafting against plain EOT on a real purifier: cost, direction and attack strength.

    python benchmarks/experiments/grafting.py                       # cost and direction, about 10 minutes
    python benchmarks/experiments/grafting.py --attack-images 16    # plus the attacks (an hour or more)

On the bundled classifier behind a purifier (default fashion-mnist-agdm: latent guidance, full
gradient), for the first --images bundled test images:
1. cost: seconds per image of one attack iteration with --eot draws, plain EOT (eot forward +
   backward passes through the purification) and grafted (one backward pass, eot - 1 forward
   passes without a graph; grafting.py), alternating, medians of --repeats;
2. direction: cosine similarity, per image, of each EOT gradient with a reference gradient
   averaged over --reference-draws independent draws (plain EOT), so that a reader sees what
   grafting's one-draw Jacobian costs in direction;
3. with --attack-images n: apgd-eot with --attack-steps iterations x --eot draws, plain and
   grafted, and grafted with as many iterations as fit in plain's measured time, on n images, R
   purifications (--runs), seed 0: robust accuracy (mean and worst case) and seconds.
Figures are for one thread unless --threads says otherwise; on a shared machine compare ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from purifyguard.option_types import non_negative_int, positive_float, positive_int


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--purifier", default="fashion-mnist-agdm",
                        help="registered name, folder or Hub id of the purifier")
    parser.add_argument("--images", type=positive_int, default=8,
                        help="images for the cost and direction figures")
    parser.add_argument("--eot", type=positive_int, default=4, help="EOT draws per iteration")
    parser.add_argument("--reference-draws", type=positive_int, default=8,
                        help="plain EOT draws of the reference gradient")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--eps", type=positive_float, default=0.1, help="L-inf radius of the attacks")
    parser.add_argument("--attack-images", type=non_negative_int, default=0,
                        help="images attacked in part 3 (0: skip it)")
    parser.add_argument("--attack-steps", type=positive_int, default=10)
    parser.add_argument("--runs", type=positive_int, default=3, help="purifications per verdict")
    args = parser.parse_args(argv)
    if args.eps > 1:
        parser.error(f"--eps must lie in (0, 1] (images are in [0, 1]), got {args.eps}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from purifyguard import PurifiedModel, bundled_classifier, bundled_test_images
    from purifyguard.evaluation import evaluate
    from purifyguard.evaluation.grafting import grafted_draws
    from purifyguard.evaluation.pgd import eot_draws

    torch.set_num_threads(args.threads)
    images, labels, _ = bundled_test_images()
    model = PurifiedModel(bundled_classifier(), args.purifier)
    x, y = images[:args.images], labels[:args.images]
    print(f"{args.purifier}, {args.images} images, EOT {args.eot}, {args.threads} thread(s)")

    def plain() -> torch.Tensor:
        return eot_draws(model, x, y, args.eot).mean_gradient()

    def grafted() -> torch.Tensor:
        return grafted_draws(model, x, y, args.eot)[0]

    seconds = {"plain": [], "grafted": []}
    gradients = {"plain": [], "grafted": []}
    for repeat in range(args.repeats):
        for name, method in (("plain", plain), ("grafted", grafted)):
            torch.manual_seed(repeat)
            start = time.perf_counter()
            gradients[name].append(method())
            seconds[name].append((time.perf_counter() - start) / args.images)
    cost = {name: statistics.median(values) for name, values in seconds.items()}
    print("\n1. Cost of one attack iteration (median of repeats)\n")
    print("| EOT gradient | backward passes | s / image | ratio |")
    print("|---|---|---|---|")
    print(f"| plain | {args.eot} | {cost['plain']:.2f} | 1.00 |")
    print(f"| grafted | 1 | {cost['grafted']:.2f} | {cost['plain'] / cost['grafted']:.2f}x faster |")

    torch.manual_seed(12345)
    reference = eot_draws(model, x, y, args.reference_draws).mean_gradient()
    print(f"\n2. Cosine similarity with a {args.reference_draws}-draw plain EOT gradient "
          "(mean over images and repeats)\n")
    print("| EOT gradient | cosine |")
    print("|---|---|")
    for name, values in gradients.items():
        cosine = [F.cosine_similarity(g.flatten(1), reference.flatten(1)).mean() for g in values]
        print(f"| {name}, {args.eot} draws | {float(torch.stack(cosine).mean()):.3f} |")

    if args.attack_images:
        matched = max(args.attack_steps, round(args.attack_steps * cost["plain"] / cost["grafted"]))
        budget = f"eps={args.eps},eot={args.eot}"
        attacks = [f"apgd-eot:{budget},steps={args.attack_steps},name=plain",
                   f"apgd-eot:{budget},steps={args.attack_steps},graft=true,name=grafted",
                   f"apgd-eot:{budget},steps={matched},graft=true,name=grafted-same-time"]
        data = (images[:args.attack_images], labels[:args.attack_images])
        report = evaluate(model, data, attacks, n=args.attack_images, batch_size=args.attack_images,
                          runs=args.runs, seed=0, progress=True, model_name=args.purifier)
        print(f"\n3. apgd-eot, L-inf eps {args.eps}, {args.attack_images} images, R = {args.runs}, "
              "seed 0\n")
        print("| attack | iterations | backward passes | robust (mean) | robust (worst) | s |")
        print("|---|---|---|---|---|---|")
        for record in report["records"]:
            attack, robust = record["attack"], record["robust_accuracy"]
            print(f"| {attack['name']} | {attack['steps']} | {attack['gradient_evaluations']} "
                  f"| {100 * robust['mean']:.1f} | {100 * robust['worst_case']:.1f} "
                  f"| {record['seconds']:.0f} |")


if __name__ == "__main__":
    main()
