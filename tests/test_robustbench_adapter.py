"""RobustBench: the `benchmark` entry point (the protocol's attacks and budgets, figures that
are the report's own, RobustBench's return value) and model-zoo models loaded by name through
robustbench's own loader, offline, from its folder layout."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import warnings
from importlib import metadata

import pytest
import torch

from purifyguard import PurifiedModel, bundled_classifier
from purifyguard.adapters import robustbench as adapter
from purifyguard.adapters.robustbench import (
    EPSILONS,
    BenchmarkResult,
    benchmark,
    load_robustbench_model,
    parse_robustbench_name,
)
from purifyguard.evaluation import validate_report

# A ResNet-18 entry of RobustBench's CIFAR-10 L-inf zoo: small enough to build here.
ZOO_ENTRY = "robustbench:cifar10/Linf/Sehwag2021Proxy_R18"


@pytest.fixture(scope="module")
def undefended() -> PurifiedModel:
    return PurifiedModel(bundled_classifier(), purifier=False)


def test_benchmark_returns_the_reports_clean_and_lowest_robust_accuracy(undefended, tmp_path):
    result = benchmark(
        undefended, "fashion-mnist", "Linf", n_examples=6, batch_size=3, runs=2, steps=1,
        eot=1, n_queries=5, output_dir=tmp_path, progress=False, return_report=True,
    )
    assert isinstance(result, BenchmarkResult)
    clean, robust, report = result

    validate_report(report)
    records = report["records"]
    assert [r["attack"]["kind"] for r in records] == [
        "apgd-eot", "pgd", "autoattack-rand", "bpda", "transfer", "square"
    ]
    assert all(r["attack"]["eps"] == 0.1 and r["attack"]["norm"] == "linf" for r in records)
    assert all(r["attack"]["reduced"] for r in records)
    assert all(r["n"] == 6 and r["runs"] == 2 for r in records)
    assert clean == records[0]["clean_accuracy"]["mean"]
    assert robust == min(r["robust_accuracy"]["mean"] for r in records)
    assert 0 <= robust <= clean <= 1
    assert (tmp_path / "report.json").exists()
    # Without return_report: what RobustBench's benchmark returns, (clean, robust), from the
    # batches stored above; device= as in RobustBench.
    plain = benchmark(
        undefended, "fashion-mnist", "Linf", n_examples=6, batch_size=3, runs=2, steps=1,
        eot=1, n_queries=5, output_dir=tmp_path, progress=False, device="cpu",
    )
    assert type(plain) is tuple and plain == (clean, robust)
    assert json.loads((tmp_path / "report.json").read_text())["settings"]["device"] == "cpu"


def test_benchmark_takes_the_l2_budget_other_statistics_and_chosen_attacks(undefended):
    clean, robust, report = benchmark(
        undefended, threat_model="L2", n_examples=4, batch_size=4, runs=1, progress=False,
        attacks=["pgd:norm=l2,eps=1.5,steps=1,eot=1"], statistic="worst_case",
        return_report=True,
    )

    (record,) = report["records"]
    assert record["attack"]["eps"] == EPSILONS["fashion-mnist", "l2"] == 1.5
    assert clean == record["clean_accuracy"]["worst_case"]
    assert robust == record["robust_accuracy"]["worst_case"]


def test_benchmark_rejects_threat_models_and_data_sets_without_a_budget(undefended):
    with pytest.raises(ValueError, match="'Linf' or 'L2'"):
        benchmark(undefended, threat_model="corruptions", n_examples=1)
    with pytest.raises(ValueError, match="pass eps"):
        benchmark(undefended, dataset="imagefolder", n_examples=1)
    with pytest.raises(ValueError, match="statistic"):
        benchmark(undefended, statistic="median", n_examples=1)
    with pytest.raises(ValueError, match="return_report"):
        benchmark(undefended, return_report="yes", n_examples=1)
    with pytest.raises(ValueError, match="device"):
        benchmark(undefended, device=3, n_examples=1)


# --- model-zoo names and the package check (no robustbench needed) ---------------------------


def test_robustbench_names_are_parsed_in_robustbenchs_spelling():
    name = parse_robustbench_name("robustbench:CIFAR-10/linf/Zhang2019Theoretically")
    assert tuple(name) == ("cifar10", "Linf", "Zhang2019Theoretically")
    assert str(name) == "robustbench:cifar10/Linf/Zhang2019Theoretically"
    assert parse_robustbench_name("cifar100/L2/Some_Model").threat_model == "L2"
    for bad, message in [
        ("robustbench:cifar10/Zhang2019Theoretically", "<dataset>/<threat model>/<model>"),
        ("robustbench:mnist/Linf/X", "data set must be one of"),
        ("robustbench:cifar10/L1/X", "threat model must be one of"),
        ("robustbench:cifar10/Linf/", "<dataset>/<threat model>/<model>"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_robustbench_name(bad)


def test_a_missing_or_stale_robustbench_gives_the_install_command(monkeypatch):
    def no_distribution(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", no_distribution)
    monkeypatch.setattr(metadata, "packages_distributions", dict)
    with pytest.raises(ImportError, match="not installed") as missing:
        load_robustbench_model(ZOO_ENTRY)
    assert adapter.INSTALL_ROBUSTBENCH in str(missing.value)
    assert "--no-deps robustbench==1.1.1" in adapter.INSTALL_ROBUSTBENCH

    # torchattacks' top-level robustbench folder: importable, but no robustbench distribution.
    monkeypatch.setattr(metadata, "packages_distributions",
                        lambda: {"robustbench": ["torchattacks"]})
    with pytest.raises(ImportError, match="installed by torchattacks") as stale:
        load_robustbench_model(ZOO_ENTRY)
    assert adapter.INSTALL_ROBUSTBENCH in str(stale.value)


def test_robustbench_files_overwritten_after_its_install_are_detected(monkeypatch, tmp_path):
    """The real distribution's RECORD, but files on disk that are not the ones it installed
    (as when torchattacks is reinstalled over robustbench)."""
    info = tmp_path / "robustbench-1.1.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: robustbench\nVersion: 1.1.1\n")
    package = tmp_path / "robustbench"
    package.mkdir()
    installed = b"def load_model(): ...\n"
    digest = base64.urlsafe_b64encode(hashlib.sha256(installed).digest()).rstrip(b"=").decode()
    (package / "utils.py").write_bytes(b"# torchattacks' old copy\n")
    (info / "RECORD").write_text(f"robustbench/utils.py,sha256={digest},{len(installed)}\n")
    monkeypatch.setattr(metadata, "distribution",
                        lambda name: metadata.PathDistribution(info))

    with pytest.raises(ImportError, match="--force-reinstall robustbench==1.1.1"):
        adapter.robustbench_modules()


# --- model-zoo models by name, offline -------------------------------------------------------


@pytest.fixture(scope="module")
def rb():
    """robustbench's model zoo, or a skip naming what is missing (robustbench is installed
    apart, with --no-deps: docs/adapters.md)."""
    try:
        return adapter.robustbench_modules()
    except ImportError as error:
        pytest.skip(f"the real robustbench package is not usable here: {error}")


def zoo_architecture(rb, seed: int = 0) -> torch.nn.Module:
    """The zoo entry's own architecture (robustbench's code), with random weights."""
    entry = rb.model_dicts[rb.BenchmarkDataset("cifar10")][rb.ThreatModel("Linf")]
    torch.manual_seed(seed)
    return entry["Sehwag2021Proxy_R18"]["model"]().eval()


def test_a_zoo_model_loads_by_name_from_robustbenchs_folder_layout(rb, tmp_path, monkeypatch):
    reference = zoo_architecture(rb)
    folder = tmp_path / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    # Wrapped as many zoo checkpoints are: a 'state_dict' key, DataParallel's 'module.' prefix.
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 99}, folder / "Sehwag2021Proxy_R18.pt")
    x = torch.rand(2, 3, 32, 32)

    model = load_robustbench_model(ZOO_ENTRY, model_dir=tmp_path)

    assert not model.training
    assert type(model) is type(reference)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    # The weights, saved once as safetensors beside the checkpoint, with its checksum ...
    derived = folder / "Sehwag2021Proxy_R18.safetensors"
    from safetensors import safe_open

    with safe_open(str(derived), "pt") as file:
        recorded = json.loads(file.metadata()["source_sha256"])
    checkpoint_bytes = (folder / "Sehwag2021Proxy_R18.pt").read_bytes()
    assert recorded == [hashlib.sha256(checkpoint_bytes).hexdigest()]

    # ... are what later loads read: no torch.load (no unpickling) at all.
    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called although the safetensors weights are there")

    monkeypatch.setattr(torch, "load", no_unpickling)
    again = load_robustbench_model(ZOO_ENTRY, model_dir=tmp_path)
    (folder / "Sehwag2021Proxy_R18.pt").unlink()
    alone = load_robustbench_model(ZOO_ENTRY, model_dir=tmp_path, download=False)
    with torch.no_grad():
        assert torch.equal(again(x), reference(x)) and torch.equal(alone(x), reference(x))


def test_a_checkpoint_holding_more_than_tensors_is_refused_unless_allowed(rb, tmp_path):
    reference = zoo_architecture(rb, seed=1)
    folder = tmp_path / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    checkpoint = {"state_dict": reference.state_dict(), "args": argparse.Namespace(lr=0.1)}
    torch.save(checkpoint, folder / "Sehwag2021Proxy_R18.pt")

    with pytest.raises(ValueError, match="allow_pickle=True") as refused:
        load_robustbench_model(ZOO_ENTRY, model_dir=tmp_path)
    assert "Namespace" in str(refused.value)
    assert not (folder / "Sehwag2021Proxy_R18.safetensors").exists()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weights_only=False", category=UserWarning)
        model = load_robustbench_model(ZOO_ENTRY, model_dir=tmp_path, allow_pickle=True)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    # From now on the safetensors copy answers, with weights_only back in force.
    assert load_robustbench_model(ZOO_ENTRY, model_dir=tmp_path) is not None
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ


def test_without_the_checkpoint_and_offline_the_error_says_what_to_prefetch(
    rb, tmp_path, monkeypatch
):
    gdrive_id = rb.model_dicts[rb.BenchmarkDataset("cifar10")][rb.ThreatModel("Linf")][
        "Sehwag2021Proxy_R18"]["gdrive_id"]
    target = tmp_path / "cifar10" / "Linf" / "Sehwag2021Proxy_R18.pt"

    with pytest.raises(FileNotFoundError) as not_fetched:
        load_robustbench_model(ZOO_ENTRY, model_dir=tmp_path, download=False)
    message = str(not_fetched.value)
    assert f"https://drive.google.com/uc?id={gdrive_id}" in message
    assert str(target) in message
    assert f"gdown 'https://drive.google.com/uc?id={gdrive_id}' -O '{target}'" in message

    # Offline: robustbench's own downloader fails; the error says the same, and why.
    def offline(file_id, path):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(rb.utils, "download_gdrive_new", offline)
    with pytest.raises(FileNotFoundError, match="download failed: ConnectionError") as failed:
        load_robustbench_model(ZOO_ENTRY, model_dir=tmp_path)
    assert f"https://drive.google.com/uc?id={gdrive_id}" in str(failed.value)
    assert not target.exists()


def test_an_unknown_zoo_model_is_named_with_close_matches(rb, tmp_path):
    with pytest.raises(ValueError, match="did you mean Zhang2019Theoretically"):
        load_robustbench_model("robustbench:cifar10/Linf/Zhang2019Theoreticaly",
                               model_dir=tmp_path)
