"""docs/benchmarks.md from a benchmark.json written by fashion_mnist.py: every figure on the page
comes from that file, so the page is regenerated, never edited. benchmarks/cifar10.py builds its
page from the same sections (headline, attacks, results, sanity) and the guidance-scale sweep's.
It also holds what the benchmark scripts share: their NAME=CLASSIFIER arguments (a classifier
folder or a bundled name), checked and loaded the same way by fronts.py and unseen_classifiers.py.

    python benchmarks/fashion_mnist.py --from-json runs/benchmark-fashion-mnist/benchmark.json
    python benchmarks/benchmark_page.py runs/benchmark-fashion-mnist/benchmark.json  # to stdout
    python benchmarks/benchmark_page.py benchmark.json --output docs/benchmarks.md
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from purifyguard.evaluation.paired import format_p_value
from purifyguard.evaluation.stats import difference_tolerance

PRIMARY = "pgd-eot"  # the primary attack of runs whose benchmark.json does not name one
OURS = ("ours", "ours-adapted")
TARGET_MARGIN_OVER_DIFFPURE = 5.0  # points of robust accuracy under the primary attack
MARGIN_TARGETS = (("diffpure", "DiffPure-style"), ("trades", "TRADES"))  # ours >= X points over
SIGNIFICANCE = 0.05
TARGET_CLEAN_GAP = 3.0  # points of clean accuracy below the undefended classifier
TARGET_FEW_NFE_GAP = 2.0  # points between ours at <= 10 NFE and ours at t* NFE
# The plug-in defence's targets, judged on the headline: ours non-inferior to the TRADES
# classifier alone (the one-sided 95% lower bound of ours minus TRADES >= -3 points) at a clean
# accuracy at least 4 points higher; its worst of R within 8 points of its mean; and a clean
# cost of at most 4 points against the bare classifier (--clean-n, the whole test set).
TARGET_NON_INFERIORITY = 3.0
TARGET_CLEAN_OVER_TRADES = 4.0
TARGET_WORST_GAP = 8.0
TARGET_CLEAN_COST = 4.0


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def with_interval(accuracy: dict[str, Any]) -> str:
    low, high = accuracy["ci95_mean"]
    return f"{percent(accuracy['mean'])} [{percent(low)}, {percent(high)}]"


def records_by_model(report: dict[str, Any]) -> dict[str, dict[str, dict]]:
    table: dict[str, dict[str, dict]] = {}
    for record in report["records"]:
        table.setdefault(record["model"], {})[record["attack"]["name"]] = record
    return table


HEADLINE_RULE = (
    "The headline: for each image, the worst adversarial example over the attacks listed (given "
    "cheap first, each run only on the images that survived the ones before; an attack that "
    "crafts on the guidance network only against defences that have one), chosen on {selection} "
    "selection purifications and re-judged on R = {runs} fresh purifications whose seeds the "
    "selection never used; an image is robust in a run when its clean image and its chosen "
    "example are both classified right. {threat}, n = {n}. Robust accuracy is the mean over the "
    "R runs [95% Wilson interval]; \"worst of R\" counts an image only if it is robust in every "
    "run; \"within N\" counts it only if it is robust in all of N submissions (an attacker who "
    "may resubmit it N times wins if one is fooled; purifyguard.evaluation.verdict estimates it "
    "without bias from the R runs). "
    "It is meant to be a figure no choice among these attacks can lower, an upper bound on "
    "robustness that leads this page; the table after the paired tests checks that against the "
    "primary attack alone, and the per-attack tables below are single attacks."
)


def paired_counts(first: Any, second: Any, runs: int, samples: int,
                  seed: int) -> dict[str, Any]:
    """Two defences' per-image correct-run counts (of `runs`) on the same images, paired:
    the bootstrap of the per-image share and McNemar's exact test on "right in every run"."""
    from purifyguard.evaluation.paired import mcnemar_exact, paired_bootstrap

    return {"mean": paired_bootstrap(first / runs, second / runs, samples=samples, seed=seed),
            "worst_case": mcnemar_exact(first == runs, second == runs)}


def headline_comparisons(results: dict[str, dict[str, Any]], ours: str = "ours",
                         samples: int = 10_000, seed: int = 0,
                         fingerprints: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """Ours against each other defence on the headline, on the same images: the paired
    bootstrap of the per-image robust share (correct runs / R), McNemar's exact test on
    "robust in all R runs" and the one-sided non-inferiority test at TARGET_NON_INFERIORITY
    points. fingerprints: k -> the data fingerprint of the first k test images; a pair judged on
    the first k and the first m of them (both fingerprints listed) is compared on the first
    min(k, m). Pairs judged on other images or another R are left out."""
    import torch

    from purifyguard.evaluation.paired import paired_margin_test

    if ours not in results:
        return []
    first = results[ours]
    comparisons = []
    for other, second in results.items():
        count = min(first["n"], second["n"])
        same_images = first["data_fingerprint"] == second["data_fingerprint"] or all(
            (fingerprints or {}).get(result["n"]) == result["data_fingerprint"]
            for result in (first, second))
        if other == ours or not same_images or second["runs"] != first["runs"]:
            continue
        runs = first["runs"]
        a = torch.tensor(first["per_image"]["correct_runs"][:count], dtype=torch.float64)
        b = torch.tensor(second["per_image"]["correct_runs"][:count], dtype=torch.float64)
        comparisons.append({
            "first": ours, "second": other, "attack": "headline", "n": len(a),
            **paired_counts(a, b, runs, samples, seed),
            "non_inferiority": paired_margin_test(a / runs, b / runs,
                                                  margin=-TARGET_NON_INFERIORITY / 100,
                                                  samples=samples, seed=seed),
        })
    return comparisons


def headline_against_attack(results: dict[str, dict[str, Any]],
                            tables: dict[str, tuple[Any, Any]], attack: str,
                            samples: int = 10_000, seed: int = 0) -> list[dict[str, Any]]:
    """Each defence's headline against `attack` alone on the same images: tables[name] is
    (image indices, (runs, n) boolean table) of that attack, from the evaluation's stored batches
    (paired.correct_table), judged on its own R runs. A positive mean difference means the
    single attack left less than the headline, which a per-image worst should never do beyond
    the noise. Defences without a table covering the headline's images on R runs are left out."""
    import torch

    comparisons = []
    for name, result in results.items():
        if name not in tables:
            continue
        indices, table = tables[name]
        count, runs = result["n"], result["runs"]
        kept = indices < count
        if int(kept.sum()) != count or table.shape[0] != runs:
            continue
        single = table[:, kept][:, indices[kept].argsort()].sum(0).double()
        worst = torch.tensor(result["per_image"]["correct_runs"], dtype=torch.float64)
        comparisons.append({
            "defence": name, "attack": attack, "n": count,
            "headline": float(worst.mean()) / runs, "single": float(single.mean()) / runs,
            **paired_counts(worst, single, runs, samples, seed),
        })
    return comparisons


def headline_check_lines(benchmark: dict[str, Any], n: int) -> list[str]:
    """The table of headline_against_attack and what it says: where the single attack lies
    below the headline beyond the noise, read the lower figure."""
    checks = benchmark.get("headline_against_primary", [])
    if not checks:
        return []
    attack = checks[0]["attack"]
    lines = ["", (f"The headline against {attack} alone, on the same images ({attack}'s examples "
                  "judged on the evaluation's own R runs): a positive difference means the single "
                  "attack left less than the headline."), "",
             (f"| defence | headline % | {attack} alone % | headline minus single, points "
              "[95% CI] | p (bootstrap) | worst case: only headline / only single | p (McNemar) |"),
             "|---|---|---|---|---|---|---|"]
    for item in checks:
        lines.append(f"| {row_label(item['defence'], item['n'], n)} | "
                     f"{percent(item['headline'])} | {percent(item['single'])} | "
                     f"{paired_cells(item)}")
    above = [item["defence"] for item in checks
             if item["mean"]["difference"] > 0 and item["mean"]["p_value"] < SIGNIFICANCE]
    if above:
        lines += ["", (f"**For {', '.join(above)} {attack} alone lies below the headline beyond "
                       "the noise.** The headline chooses each image's example among the attacks "
                       "on the selection purifications, and there an example can look stronger "
                       "than it is (it is the lowest of several noisy counts) and prove weaker on "
                       "fresh purifications: a winner's curse. For these rows read the lower "
                       "figure as the upper bound on robustness.")]
    else:
        lines += ["", f"No headline lies above {attack} alone beyond the noise."]
    return lines


def headline_section(benchmark: dict[str, Any]) -> list[str]:
    """The page's lead when the JSON has a headline: per defence the robust accuracy against
    the per-image worst of the attacks, worst of R, within 1 / 3 / 10 submissions, clean, and
    which attacks provided the chosen examples; then ours paired against each other defence."""
    results = benchmark.get("headline")
    if not results:
        return []
    first = next(iter(results.values()))
    threat = first["threat_model"]
    norm = {"linf": "L-inf", "l2": "L2"}.get(threat["norm"], threat["norm"])
    counts = sorted({key for r in results.values()
                     for key in r["robust_accuracy"]["within_submissions"]}, key=int)
    lines = [
        "### Headline: the per-image worst of the attacks", "",
        HEADLINE_RULE.format(selection=first["selection_runs"], runs=first["runs"],
                             threat=f"{norm} eps = {threat['eps']:g}", n=first["n"]),
        "",
        "| defence | robust % [95% CI] | worst of R % | "
        + " | ".join(f"within {count} %" for count in counts)
        + " | clean % | per-image worst from (images) |",
        "|---|---|---|" + "---|" * len(counts) + "---|---|",
    ]
    for model, result in results.items():
        robust, clean = result["robust_accuracy"], result["clean_accuracy"]
        within = robust["within_submissions"]
        sources = [f"{stats['name']} {stats['provided']}" for stats in result["per_attack"]]
        sources.append(f"clean image {result['clean_unattacked']}")
        lines.append(
            f"| {row_label(model, result['n'], first['n'])} | {with_interval(robust)} | "
            f"{percent(robust['worst_case'])} | "
            + " | ".join(percent(within[c]) if c in within else "-" for c in counts)
            + f" | {percent(clean['mean'])} | {', '.join(sources)} |"
        )
    comparisons = benchmark.get("headline_paired", [])
    if comparisons:
        header = ("| defences | mean difference, points [95% CI] | p (bootstrap) | worst case: "
                  "only first / only second | p (McNemar) |")
        lines += ["", ("Paired tests on the headline, same images: the difference in mean robust "
                       "accuracy (per-image share of the R runs) with its 95% paired-bootstrap "
                       "interval and p-value, and McNemar's exact test on the worst case."),
                  "", header, "|---|---|---|---|---|"]
        lines += [f"| {row_label(item['first'] + ' vs ' + item['second'], item['n'], first['n'])}"
                  f" | {paired_cells(item)}" for item in comparisons]
        lines += [""] + [f"- Headline, {lead_tests(item)}." for item in comparisons]
    lines += headline_check_lines(benchmark, first["n"])
    lines += plug_in_targets(benchmark)
    lines += clean_cost_section(benchmark)
    return [*lines, "", "### Each attack separately", ""]


def plug_in_targets(benchmark: dict[str, Any], ours: str = "ours") -> list[str]:
    """The plug-in defence's targets on the headline: ours non-inferior to TRADES with a
    3-point margin at a clean accuracy 4 points higher, worst of R within 8 points of the mean,
    and the clean cost on --clean-n test images (met / missed / not measured)."""
    results = benchmark.get("headline", {})
    if ours not in results:
        return []
    robust = results[ours]["robust_accuracy"]
    lines = ["", "Targets of the plug-in defence, on the headline:", ""]
    item = next((item for item in benchmark.get("headline_paired", [])
                 if (item["first"], item["second"]) == (ours, "trades")), None)
    if item is None or "non_inferiority" not in item:
        lines.append(f"- {ours} non-inferior to trades ({TARGET_NON_INFERIORITY:g}-point margin): "
                     "not measured in this run (no trades headline)")
    else:
        test = item["non_inferiority"]
        met = test["p_value"] < SIGNIFICANCE
        lines.append(
            f"- {ours} non-inferior to trades ({TARGET_NON_INFERIORITY:g}-point margin): "
            f"{'met' if met else 'missed'} ({100 * item['mean']['difference']:+.1f} points; "
            f"one-sided 95% lower bound {100 * test['ci']['one_sided95']:+.1f}, "
            f"{format_p_value(test['p_value'], test['samples'])} for H0 difference <= "
            f"-{TARGET_NON_INFERIORITY:g}; {worst_case_text(item['worst_case'])}).")
    if "trades" in results:
        gap = 100 * (results[ours]["clean_accuracy"]["mean"]
                     - results["trades"]["clean_accuracy"]["mean"])
        verdict = "met" if gap >= TARGET_CLEAN_OVER_TRADES else "missed"
        lines.append(f"- {ours} clean accuracy at least {TARGET_CLEAN_OVER_TRADES:g} points above "
                     f"trades: {verdict} ({gap:+.1f} points).")
    gap = 100 * (robust["mean"] - robust["worst_case"])
    lines.append(f"- {ours} worst of R within {TARGET_WORST_GAP:g} points of its mean: "
                 f"{'met' if gap <= TARGET_WORST_GAP else 'missed'} ({gap:.1f} points below).")
    standard = benchmark.get("clean_cost", {}).get("standard")
    if standard is None:
        lines.append(f"- clean cost at most {TARGET_CLEAN_COST:g} points against the bare "
                     "classifier: not measured in this run (`--clean-n 10000`).")
    else:
        cost = 100 * standard["cost"]["difference"]
        lines.append(f"- clean cost at most {TARGET_CLEAN_COST:g} points against the bare "
                     f"classifier: {'met' if cost <= TARGET_CLEAN_COST else 'missed'} "
                     f"({cost:.1f} points on {standard['n']} test images).")
    return lines


def clean_cost_section(benchmark: dict[str, Any]) -> list[str]:
    """The clean cost of --clean-n: per classifier bare and purified clean accuracy, one
    purification per image, and the paired difference with its 95% interval."""
    costs = benchmark.get("clean_cost")
    if not costs:
        return []
    lines = ["", ("Clean cost, measured apart on the first test images (one purification per "
                  "image): bare minus purified, in points, with its 95% paired-bootstrap "
                  "interval and McNemar's exact test."), "",
             "| classifier | images | bare % | purified % | cost, points [95% CI] | p (McNemar) |",
             "|---|---|---|---|---|---|"]
    for name, figures in costs.items():
        cost = figures["cost"]
        low, high = (100 * value for value in cost["ci95"])
        lines.append(f"| {name} | {figures['n']} | {percent(figures['bare'])} | "
                     f"{percent(figures['purified'])} | {100 * cost['difference']:.1f} "
                     f"[{low:.1f}, {high:.1f}] | "
                     f"{format_p_value(cost['mcnemar']['p_value'], name='')} |")
    return lines


def row_label(model: str, n: int, total: int) -> str:
    """A table row's name, with its number of images when it ran on fewer than the others."""
    return model if n == total else f"{model} (first {n} images)"


def settings_section(benchmark: dict[str, Any]) -> list[str]:
    settings = benchmark["report"]["settings"]
    minutes = sum(r["seconds"] for r in benchmark["report"]["records"]) / 60
    hardware = (f"- Hardware: {benchmark['hardware']}; {settings['num_processes']} process(es); "
                f"{minutes:.0f} min of attack batches (summed over processes and resumed runs); "
                f"run on {benchmark['date']}")
    data = (f"- Data: the first {settings['n']} Fashion-MNIST test images "
            f"(fingerprint {settings['data_fingerprint']}); seed {settings['seed']}; "
            f"R = {settings['runs']} independent purifications per verdict")
    fewer = settings.get("n_per_model")
    if fewer:
        data += ("; on fewer images (the first of the same, `--plug-in-n`): "
                 + ", ".join(f"{name} {count}" for name, count in fewer.items())
                 + ", paired with the others on those images")
    return [f"- Command: `{benchmark['command']}`", hardware, data,
            f"- purifyguard {benchmark['report']['purifyguard_version']}"]


def attacks_section(report: dict[str, Any]) -> list[str]:
    lines = ["| attack | kind | norm | eps | steps | EOT | step size | gradient | setting |",
             "|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for record in report["records"]:
        attack = record["attack"]
        if attack["name"] in seen:
            continue
        seen.add(attack["name"])
        setting = "**reduced** (below the reference)" if attack["reduced"] else "reference"
        lines.append(
            f"| {attack['name']} | {attack['kind']} | {attack['norm']} | {attack['eps']:g} "
            f"| {attack['steps']} | {attack['eot']} | {step_size_text(attack)} "
            f"| {attack['gradient_mode']} (for purified models) | {setting} |"
        )
    return lines


def step_size_text(attack: dict[str, Any]) -> str:
    """The step size, and apgd-eot's first step on randomised models where it differs."""
    text = f"{attack['step_size']:.4g}"
    randomised = (attack.get("step_schedule") or {}).get("randomised_initial_step")
    if randomised is not None and randomised != attack["step_size"]:
        text += f" ({randomised:.4g} first on randomised models)"
    return text


def primary(benchmark: dict[str, Any]) -> str:
    """The name of the attack whose figures the targets judge."""
    return benchmark.get("primary", PRIMARY)


def results_section(benchmark: dict[str, Any]) -> list[str]:
    report, costs, chosen = benchmark["report"], benchmark["costs"], primary(benchmark)
    table = records_by_model(report)
    attacks = list(next(iter(table.values())))
    lines = [
        "| defence | NFE | images/s | clean % | "
        + " | ".join(f"{name} % [95% CI]" for name in attacks)
        + f" | {chosen} worst % | sanity |",
        "|---|---|---|---|" + "---|" * len(attacks) + "---|---|",
    ]
    for model, records in table.items():
        first = records[attacks[0]]
        sanity = first["sanity"]
        sanity = sanity if sanity in ("passed", "not run") else f"**{sanity}**"
        lines.append(
            f"| {row_label(model, first['n'], report['settings']['n'])} "
            f"| {costs[model]['nfe']} | {costs[model]['images_per_s']:.2f} "
            f"| {percent(first['clean_accuracy']['mean'])} | "
            + " | ".join(with_interval(records[name]["robust_accuracy"]) for name in attacks)
            + f" | {percent(records[chosen]['robust_accuracy']['worst_case'])} | {sanity} |"
        )
    lines += ["", "What each defence is:", ""]
    lines += [f"- **{name}**: {text}" for name, text in benchmark["descriptions"].items()]
    return lines


TARGETS_INTRO = (
    "A target of X points over another defence is met only when the one-sided paired margin "
    "test (purifyguard.evaluation.paired.paired_margin_test) rejects a difference <= X at "
    f"{SIGNIFICANCE:g}, that is when its one-sided 95% lower bound lies above X. A lead states "
    "both paired tests: the bootstrap of the mean and McNemar's exact test on the worst case."
)


def targets_section(benchmark: dict[str, Any]) -> list[str]:
    """The issue's targets, checked against the figures (met / missed / not measured)."""
    table = records_by_model(benchmark["report"])
    chosen = primary(benchmark)
    paired = {(item["first"], item["second"]): item for item in benchmark.get("paired", [])}

    def robust(model: str) -> float | None:
        return 100 * table[model][chosen]["robust_accuracy"]["mean"] if model in table else None

    def clean(model: str) -> float | None:
        return 100 * table[model][chosen]["clean_accuracy"]["mean"] if model in table else None

    def noise(model: str) -> str:
        """How far two accuracies on these n examples may differ by chance (95%)."""
        robust_accuracy = table[model][chosen]["robust_accuracy"]
        tolerance = difference_tolerance(robust_accuracy["mean"], robust_accuracy["n"])
        return f"noise at n = {robust_accuracy['n']}: +-{100 * tolerance:.1f}"

    lines = [TARGETS_INTRO, ""]
    unseen = {row for name in benchmark.get("unseen", []) for row in (name, f"ours-{name}")}
    for ours in (name for name in OURS if name in table):
        others = {name: robust(name) for name in table if name not in (*OURS, *unseen)}
        if others:  # a run of our defences alone has nothing to beat
            best_other = max(others, key=others.get)
            margin = robust(ours) - others[best_other]
            item = paired.get((ours, best_other))
            tests = lead_tests(item) if item else "no paired test in this run"
            lines.append(
                f"- {ours} beats every other defence under {chosen}: "
                f"{'met' if margin > 0 else 'missed'} ({robust(ours):.1f} vs {best_other} "
                f"{others[best_other]:.1f}, {margin:+.1f} points; {noise(ours)}; {tests})."
            )
        for other, label in MARGIN_TARGETS:
            if other in table:
                verdict, details = margin_verdict(robust(ours) - robust(other),
                                                  paired.get((ours, other)))
                lines.append(f"- {ours} >= {TARGET_MARGIN_OVER_DIFFPURE:g} points over {label}: "
                             f"{verdict} ({details}).")
        if "undefended" in table:
            gap = clean("undefended") - clean(ours)
            verdict = "met" if gap <= TARGET_CLEAN_GAP else "missed"
            lines.append(f"- {ours} clean accuracy within {TARGET_CLEAN_GAP:g} points of the "
                         f"undefended classifier: {verdict} ({gap:.1f} points below).")
    if "ours" in table and "ours-5-steps" in table:
        gap = robust("ours") - robust("ours-5-steps")
        verdict = "met" if abs(gap) <= TARGET_FEW_NFE_GAP else "missed"
        lines.append(f"- ours at 5 steps within {TARGET_FEW_NFE_GAP:g} points of ours: {verdict} "
                     f"({-gap:+.1f} points).")
    if "ours" in table and "ours-full-nfe" in table:
        gap = robust("ours-full-nfe") - robust("ours")
        verdict = "met" if gap <= TARGET_FEW_NFE_GAP else "missed"
        lines.append(f"- ours at <= 10 NFE within {TARGET_FEW_NFE_GAP:g} points of ours at t* NFE: "
                     f"{verdict} ({gap:+.1f} points).")
    else:
        lines.append("- ours at <= 10 NFE within 2 points of ours at t* NFE: not measured in this "
                     "run (add `--defences ... ours-full-nfe`; about 30x the cost of ours).")
    reduced = any(r["attack"]["reduced"] for r in benchmark["report"]["records"])
    if reduced:
        lines.append("- Every verdict above is under **reduced** attacks: a stronger attack can "
                     "only lower the robust figures, so a target met here is not yet a claim.")
    return lines


def margin_verdict(difference: float, item: dict[str, Any] | None,
                   target: float = TARGET_MARGIN_OVER_DIFFPURE) -> tuple[str, str]:
    """(verdict, details) of "first >= target points over second", from the difference of the
    means in points and the paired comparison (None when the run has none). Met only when the
    one-sided paired margin test rejects difference <= target at 0.05; a JSON written before
    that test ("margin_test") is judged from the two-sided interval where it decides."""
    details = f"{difference:+.1f} points"
    if item is None:
        if difference < target:
            return "missed", f"{details}; below {target:g} itself; no paired test in this run"
        return "not measured", f"{details}; no paired test in this run, so not shown significant"
    test = item.get("margin_test")
    worst = worst_case_text(item["worst_case"])
    if (test is not None and abs(100 * test["margin"] - target) < 1e-9
            and test.get("alternative", "greater") == "greater"):
        bound = 100 * test["ci"]["one_sided95"]
        met = test["p_value"] < SIGNIFICANCE
        p_text = format_p_value(test["p_value"], test["samples"])
        return ("met" if met else "missed",
                (f"{details}; one-sided paired margin test: 95% lower bound {bound:+.1f}, "
                 f"{p_text} for H0 difference <= {target:g}; {worst}"))
    if difference < target:
        return "missed", f"{details}; below {target:g} itself; {worst}"
    low, high = (100 * value for value in item["mean"]["ci95"])
    interval = f"two-sided 95% interval [{low:+.1f}, {high:+.1f}]"
    if low > target:  # its 2.5% quantile above the margin: the one-sided test rejects too
        return "met", f"{details}; {interval} above {target:g}; {worst}"
    return ("not shown significant",
            (f"{details}; the one-sided margin test was not run for this JSON and the "
             f"{interval} reaches below {target:g}; {worst}"))


def lead_tests(item: dict[str, Any]) -> str:
    """Both paired tests of a lead of item's first defence over its second, and which hold;
    where neither does, the second's lead over the first when one of its tests holds."""
    mean, worst = item["mean"], item["worst_case"]
    holds = {(True, True): "in both tests", (True, False): "in the mean only",
             (False, True): "in the worst case only", (False, False): "in neither test"}

    def lead(sign: int) -> tuple[bool, bool]:  # sign 1: the first leads; -1: the second
        return (sign * mean["difference"] > 0 and mean["p_value"] < SIGNIFICANCE,
                sign * (worst["only_first"] - worst["only_second"]) > 0
                and worst["p_value"] < SIGNIFICANCE)

    leader, tests = item["first"], lead(1)
    if not any(tests) and any(lead(-1)):
        leader, tests = f"{item['second']} over {item['first']}", lead(-1)
    return (f"paired against {item['second']}: mean "
            f"{format_p_value(mean['p_value'], mean.get('samples'))} (bootstrap), "
            f"{worst_case_text(worst)}; a lead of {leader} is significant {holds[tests]}")


def worst_case_text(worst: dict[str, Any]) -> str:
    return (f"worst case {worst['only_first']} / {worst['only_second']} images, McNemar "
            f"{format_p_value(worst['p_value'])}")


def record_checks(report: dict[str, Any], chosen: str = PRIMARY) -> list[str]:
    """The checks the records answer by themselves: perturbations inside the eps-ball, and the
    full gradient (the primary attack `chosen`) at least as strong as BPDA (within the noise of
    n examples)."""
    lines = []
    for model, records in records_by_model(report).items():
        outside = [name for name, r in records.items() if not r["perturbation"]["within_eps"]]
        lines.append(f"- {model}: every perturbation within eps: "
                     + ("passed." if not outside else f"**FAILED** for {', '.join(outside)}."))
        if chosen in records and "bpda-eot" in records and model not in ("undefended", "trades"):
            full = records[chosen]["robust_accuracy"]
            bpda = records["bpda-eot"]["robust_accuracy"]["mean"]
            tolerance = difference_tolerance(full["mean"], full["n"])
            passed = full["mean"] <= bpda + tolerance
            lines.append(f"- {model}: full gradient at least as strong as BPDA: "
                         f"{'passed' if passed else '**FAILED**'} ({percent(full['mean'])} vs "
                         f"{percent(bpda)}, tolerance {percent(tolerance)} points).")
    return lines


def paired_section(benchmark: dict[str, Any]) -> list[str]:
    """Ours against each other defence on the same images (purifyguard.evaluation.paired):
    the paired bootstrap of the mean and McNemar's test on the worst case."""
    comparisons = benchmark.get("paired", [])
    if not comparisons:
        return []
    intro = (f"Under {primary(benchmark)}, on the same images: the difference in mean robust "
             "accuracy with its 95% paired-bootstrap interval and p-value, and McNemar's exact "
             "test on the worst case (images only one of the two keeps in every run). A bootstrap "
             "p below its resolution (1 / resamplings) is shown as \"< 1 / resamplings\".")
    return comparison_table("## Paired tests", intro, "defences", comparisons,
                            benchmark["report"]["settings"]["n"])


def attack_paired_section(benchmark: dict[str, Any]) -> list[str]:
    """Each other attack against the primary on ours, on the same images: whether an attack
    we did not design around (AutoAttack-rand, the EM-weighted APGD) finds more."""
    comparisons = benchmark.get("attack_paired", [])
    if not comparisons:
        return []
    intro = (f"Ours under each other attack against {primary(benchmark)}, on the same images: a "
             "negative difference means the other attack left less robust accuracy (found "
             "more); McNemar's exact test on the worst case counts the images only one of the "
             "two attacks leaves right in every run.")
    return comparison_table("### Attacks against the primary", intro, "attacks", comparisons)


def comparison_table(title: str, intro: str, compared: str,
                     comparisons: list[dict[str, Any]], total: int | None = None) -> list[str]:
    """A titled table of paired comparisons, one row per "first vs second" (with its number of
    images when it is below `total`)."""
    header = (f"| {compared} | mean difference, points [95% CI] | p (bootstrap) | worst case: "
              "only first / only second | p (McNemar) |")
    lines = [title, "", intro, "", header, "|---|---|---|---|---|"]
    for item in comparisons:
        pair = f"{item['first']} vs {item['second']}"
        lines.append(f"| {row_label(pair, item['n'], total or item['n'])} | {paired_cells(item)}")
    return [*lines, ""]


def paired_cells(item: dict[str, Any]) -> str:
    """A paired comparison's table cells: mean difference in points [95% CI], its bootstrap p,
    the worst case's discordant images and McNemar's p."""
    mean, worst = item["mean"], item["worst_case"]
    low, high = mean["ci95"]
    return (f"{100 * mean['difference']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] | "
            f"{format_p_value(mean['p_value'], mean.get('samples'), name='')} | "
            f"{worst['only_first']} / {worst['only_second']} | "
            f"{format_p_value(worst['p_value'], name='')} |")


def sanity_section(report: dict[str, Any], chosen: str = PRIMARY) -> list[str]:
    lines = [*record_checks(report, chosen), ""]
    if not report["sanity"]:
        return [*lines, ("The eps sweep, unbounded-attack, more-steps and zero-gradient checks "
                         "were not run in this benchmark (`--sanity` runs them on the first "
                         "`--sanity-n` images).")]
    for model, checks in report["sanity"].items():
        lines += [f"**{model}**", ""]
        lines += [f"- {c['check']}: {'passed' if c['passed'] else '**FAILED**'}. {c['message']}"
                  for c in checks]
        lines.append("")
    return lines


def figures_section(benchmark: dict[str, Any]) -> list[str]:
    """Image grids the JSON points to (paths relative to the docs folder), if any."""
    figures = benchmark.get("figures", [])
    if not figures:
        return []
    lines = ["## Pictures", ""]
    for figure in figures:
        lines += [f"![{figure['caption']}]({figure['path']})", "", f"*{figure['caption']}*", ""]
    return lines


INTRO = (
    "{count} defences on the same images, attacks and seeds, L-inf eps = 0.1, following the "
    "[evaluation protocol](evaluation.md). Robust accuracy is the mean over R purifications "
    "[95% Wilson interval]; \"worst\" counts an image as robust only if it survives every one "
    "of them. Cost is the number of denoiser evaluations (NFE) per purification and the "
    "throughput of one defended forward pass (purify and classify) on the machine below."
)
REDUCED_NOTE = (
    "**Reduced setting.** The attacks are weaker than the protocol's reference (PGD 200 steps "
    "x EOT 20, see Setting): read every robust figure as an upper bound."
)
FOOTER = (
    "The JSON behind this page holds every record: per-run accuracies, intervals, perturbation "
    "sizes and timings. Regenerate the page from it with "
    "`python benchmarks/fashion_mnist.py --from-json <benchmark.json>`."
)


def benchmark_page(benchmark: dict[str, Any]) -> str:
    report = benchmark["report"]
    reduced = any(r["attack"]["reduced"] for r in report["records"])
    lines = [
        "# Fashion-MNIST benchmark", "",
        "<!-- Generated by benchmarks/fashion_mnist.py from its benchmark.json: do not edit. -->",
        "", INTRO.format(count=len(benchmark["costs"])), "",
    ]
    if reduced:
        lines += [REDUCED_NOTE, ""]
    notes = [f"- {note}" for note in benchmark.get("notes", [])]
    lines += ["## Setting", "", *settings_section(benchmark), *notes, "",
              *attacks_section(report), "",
              "## Results", "", *headline_section(benchmark), *results_section(benchmark), "",
              *paired_section(benchmark), *attack_paired_section(benchmark),
              "## Targets", "", *targets_section(benchmark), "",
              *fronts_page_section(benchmark),
              "## Sanity checks", "", *sanity_section(report, primary(benchmark)), "",
              *figures_section(benchmark), FOOTER, ""]
    return "\n".join(lines)


def fronts_page_section(benchmark: dict[str, Any]) -> list[str]:
    """The two clean/robust fronts (benchmarks/fronts.py's JSON, attached by --fronts), measured
    on held-out images where the settings were chosen; none without it."""
    if "fronts" not in benchmark:
        return []
    from fronts import fronts_section

    return ["## The front, not a point", "",
            ("TRADES over its trade-off beta against ours over its own settings (guidance scale, "
             "t*, class term, votes), on the held-out images where the settings were chosen, not "
             "on the test images above."), "",
            *fronts_section(benchmark["fronts"]), ""]


# The CIFAR-10 page (benchmarks/cifar10.py): the sections above, its setting and its
# guidance-scale sweep on held-out training images.
CIFAR10_BUDGET_NOTES = {
    "reference": "Reference budget: 512 images; APGD-EOT, PGD-EOT and BPDA 200 iterations x EOT "
                 "20; AutoAttack-rand APGD 100 x EOT 20; R = 10.",
    "reduced": "**Reduced budget** (128 images, 20 iterations x EOT 4): weaker than the "
               "protocol's reference (200 x EOT 20 on 512 images), so read every robust figure "
               "as an upper bound.",
    "tiny": "**Tiny check run**: random weights built at run time, a few images, 1 iteration. "
            "It shows that the script runs; its figures mean nothing.",
}
CIFAR10_FOOTER = ("The JSON behind this page holds every record. Regenerate the page from it "
                  "with `python benchmarks/cifar10.py --from-json <benchmark.json>`.")


def cifar10_page(benchmark: dict[str, Any]) -> str:
    """docs/benchmarks-cifar10.md from a benchmark.json of benchmarks/cifar10.py (every figure
    from that file): the headline leads the results, as on the Fashion-MNIST page."""
    report = benchmark["report"]
    recipe = benchmark["settings"]
    threat = "L-inf 8/255" if benchmark["norm"] == "linf" else "L2 0.5"
    intro = (f"{len(benchmark['costs'])} defences on the same images ({benchmark['data']}), "
             f"attacks and seeds, {threat}, following the [evaluation protocol](evaluation.md); "
             f"the purifier is [{recipe['recipe']}](cifar10.md) and the primary attack "
             f"{primary(benchmark)}. Robust accuracy is the mean over R purifications [95% Wilson "
             "interval]; \"worst\" counts an image as robust only if it survives every one of "
             "them.")
    lines = [
        "# CIFAR-10 benchmark", "",
        "<!-- Generated by benchmarks/cifar10.py from its benchmark.json: do not edit. -->", "",
        intro, "", CIFAR10_BUDGET_NOTES[benchmark["budget"]], "",
        "## Setting", "", *cifar10_setting_section(benchmark), "", *attacks_section(report), "",
        "## Results", "", *headline_section(benchmark), *results_section(benchmark), "",
        *scale_sweep_section(benchmark),
        "## Sanity checks", "", *sanity_section(report, primary(benchmark)), "",
        CIFAR10_FOOTER, "",
    ]
    return "\n".join(lines)


def cifar10_setting_section(benchmark: dict[str, Any]) -> list[str]:
    """The command, hardware, test data, guidance scale, purifier settings and version."""
    report, recipe = benchmark["report"], benchmark["settings"]
    settings = report["settings"]
    minutes = sum(r["seconds"] for r in report["records"]) / 60
    return [
        f"- Command: `{benchmark['command']}`",
        (f"- Hardware: {benchmark['hardware']}; {minutes:.0f} min of attack batches; run on "
         f"{benchmark['date']}"),
        (f"- Data: the first {settings['n']} test images of {benchmark['data']} (fingerprint "
         f"{settings['data_fingerprint']}); seed {settings['seed']}; R = {settings['runs']} "
         "purifications per verdict"),
        f"- {guidance_scale_text(benchmark)}",
        (f"- Purifier: t* = {recipe['t_star']}, {recipe['sampler']} with {recipe['n_steps']} "
         f"steps, {recipe['distance']} distance, scale schedule {recipe['scale_schedule']}"),
        f"- purifyguard {report['purifyguard_version']}",
    ]


def guidance_scale_text(benchmark: dict[str, Any]) -> str:
    """Which guidance scale ours used and where it comes from: the held-out sweep, the command
    line or the purifier's recipe."""
    chosen = benchmark.get("guidance_scale") or {"value": benchmark["settings"]["guidance_scale"],
                                                 "source": "recipe"}
    sweep = benchmark.get("scale_sweep")
    if chosen["source"] == "sweep" and sweep:
        return (f"Guidance scale of ours: **{chosen['value']:g}**, the most robust in the sweep "
                "below on held-out images, never the test images above")
    if chosen["source"] == "given":
        return f"Guidance scale of ours: {chosen['value']:g}, as given (not swept in this run)"
    return (f"Guidance scale of ours: {chosen['value']:g}, the recipe's (not swept in this run: "
            "several --guidance-scale values sweep it on held-out training images)")


SWEEP_RULE = (
    "Ours at each guidance scale on {images}, none of them a test image, under {attack} ({steps} "
    "iterations x EOT {eot}), R = {runs}, seed {seed}. Ours on the test images uses the scale "
    "with the highest mean robust accuracy here (ties: the higher clean accuracy): **{chosen:g}**."
)


def sweep_images_text(sweep: dict[str, Any]) -> str:
    """Which images the sweep ran on: held out from the training split, or random ones."""
    held_out = sweep["held_out"]
    if held_out is None:
        return (f"{sweep['n']} random images (no data given; other than the test images; "
                f"fingerprint {sweep['data_fingerprint']})")
    return (f"{sweep['n']} images held out from the training split of {sweep['data']} "
            f"(purifyguard.data.validation_split: {held_out['size']} images, seed "
            f"{held_out['seed']}; fingerprint {sweep['data_fingerprint']})")


def scale_sweep_section(benchmark: dict[str, Any]) -> list[str]:
    """The guidance-scale sweep on held-out training images, when the run has one: per scale
    clean and robust accuracy under the primary attack, the chosen scale marked."""
    sweep = benchmark.get("scale_sweep")
    if not sweep:
        return []
    attack = sweep["attack"]
    lines = [
        "## Guidance scale, chosen on held-out training images", "",
        SWEEP_RULE.format(images=sweep_images_text(sweep), attack=attack["name"],
                          steps=attack["steps"], eot=attack["eot"], runs=sweep["runs"],
                          seed=sweep["seed"], chosen=sweep["chosen"]),
        "",
        "| guidance scale | clean % | robust % [95% CI] | worst of R % | |",
        "|---|---|---|---|---|",
    ]
    for row in sweep["rows"]:
        robust = row["robust_accuracy"]
        mark = "chosen" if row["scale"] == sweep["chosen"] else ""
        lines.append(f"| {row['scale']:g} | {percent(row['clean_accuracy']['mean'])} | "
                     f"{with_interval(robust)} | {percent(robust['worst_case'])} | {mark} |")
    return [*lines, ""]



# ----------------------------------------------------------------------------- shared arguments

CLASSIFIER_FILES = ("config.json", "model.safetensors")


def named_classifiers(option: str, values: list[str]) -> dict[str, str]:
    """NAME=CLASSIFIER pairs given to `option` (--trades, --classifiers) as {name: classifier},
    each checked (SystemExit naming the option and the value) before anything is loaded."""
    from purifyguard.evaluation.arguments import check_name

    sources: dict[str, str] = {}
    for value in values:
        name, equals, source = (part.strip() for part in value.partition("="))
        if not equals or not name or not source:
            raise SystemExit(f"{option} {value!r}: expected NAME=CLASSIFIER (a classifier folder "
                             "or a bundled name)")
        try:
            check_name("the name", name)
        except ValueError as error:
            raise SystemExit(f"{option} {value!r}: {error}") from None
        if name in sources:
            raise SystemExit(f"{option} {value!r}: the name {name!r} is given twice")
        problem = classifier_problem(source)
        if problem:
            raise SystemExit(f"{option} {value!r}: {problem}")
        sources[name] = source
    return sources


def classifier_problem(source: str) -> str | None:
    """Why `source` is neither a bundled classifier nor a classifier folder (None: it is one)."""
    from purifyguard.presets import CLASSIFIERS

    if source in CLASSIFIERS:
        return None
    folder = Path(source)
    if not folder.is_dir():
        return (f"{source} is neither a folder nor a bundled classifier "
                f"({', '.join(sorted(CLASSIFIERS))})")
    missing = [name for name in CLASSIFIER_FILES if not (folder / name).is_file()]
    if missing:
        return f"the folder {source} has no {' or '.join(missing)} (not a classifier folder)"
    return None


def load_classifier(source: str):
    """A bundled classifier by name, or a classifier folder (`purifyguard train guidance`'s
    export)."""
    from purifyguard import bundled_classifier
    from purifyguard.guidance_network_format import load_guidance_network
    from purifyguard.presets import CLASSIFIERS

    if source in CLASSIFIERS:
        return bundled_classifier(source)
    return load_guidance_network(Path(source))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark_json", metavar="BENCHMARK_JSON",
                        help="a benchmark.json written by benchmarks/fashion_mnist.py")
    parser.add_argument("--output", metavar="PAGE", default=None,
                        help="write the Markdown page there (e.g. docs/benchmarks.md); default: "
                        "print it")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    from purifyguard.files import read_json, write_atomic

    try:
        benchmark = read_json(args.benchmark_json, "benchmark results file")
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if not isinstance(benchmark.get("report"), dict) or "costs" not in benchmark:
        parser.error(f"{args.benchmark_json} is not a benchmark.json of benchmarks/"
                     "fashion_mnist.py: it has no 'report' and 'costs'")
    page = benchmark_page(benchmark)
    if args.output is None:
        print(page)
    else:
        write_atomic(args.output, page)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
