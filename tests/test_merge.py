"""Output folders of one evaluation run in parts, merged into one: the rerun over the merged
folder attacks nothing again, and folders that cannot belong together are refused."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from purifyguard.cli import main
from purifyguard.evaluation import evaluate_models, headline, merge_outputs
from purifyguard.evaluation.harness import _folder_lock
from purifyguard.evaluation.paired import compare_stored


class ReadsTheLabel(nn.Module):
    """Predicts class k from a mean pixel near (k + 0.5) / 10."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = x.mean(dim=(1, 2, 3)) * 10 - 0.5
        return -(level[:, None] - torch.arange(10.0)) ** 2


class Counting(nn.Module):
    """A classifier that counts its forward passes (a rerun that attacks again would call it)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(scale))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return ReadsTheLabel()(x) * self.weight


ATTACK = "pgd:eps=0.07,steps=3,eot=1"


def data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(n) % 10
    images = ((labels.float() + 0.5) / 10).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    noise = 0.02 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    return (images + noise).clamp(0, 1), labels


def evaluate_part(models: dict[str, nn.Module], folder, n: int = 40, batch_size: int = 16):
    return evaluate_models(models, data(n), [ATTACK], n=n, batch_size=batch_size, runs=2,
                           output_dir=folder, progress=False)


def test_parts_merged_are_read_as_one_run_that_attacks_nothing_again(tmp_path):
    first, second = Counting(1.0), Counting(2.0)
    parts = [evaluate_part({"first": first}, tmp_path / "part-a"),
             evaluate_part({"second": second}, tmp_path / "part-b")]
    headline(first, data(), [ATTACK], n=40, batch_size=16, runs=2,
             output_dir=tmp_path / "part-a" / "headline-first", progress=False)

    result = merge_outputs([tmp_path / "part-a", tmp_path / "part-b"], tmp_path / "whole")

    whole = tmp_path / "whole"
    assert sorted(path.name for path in whole.glob("batches-*.jsonl")) == [
        "batches-part-a-0.jsonl", "batches-part-b-0.jsonl"]
    for stored in ("headline-state.safetensors", "headline.json"):  # the verdict is reused
        assert (whole / "headline-first" / stored).read_bytes() == (
            tmp_path / "part-a" / "headline-first" / stored).read_bytes()
    assert not (whole / "report.json").exists()  # the rerun writes it
    alignment = json.loads((whole / "eot-alignment.json").read_text())
    assert len(alignment) == 2 and result["files"] >= 4
    first.calls = 0
    evaluate_part({"first": first}, tmp_path / "part-a")  # a resumed part: the grid's calls only
    resumed_calls, first.calls, second.calls = first.calls, 0, 0
    report = evaluate_part({"first": first, "second": second}, whole)
    assert first.calls == second.calls == resumed_calls <= 2  # every batch was stored by a part
    figures = {(record["model"], record["attack"]["name"]): record["robust_accuracy"]
               for record in report["records"]}
    for part in parts:
        for record in part["records"]:
            assert figures[record["model"], record["attack"]["name"]] == record["robust_accuracy"]
    assert compare_stored(whole, "first", "second", "pgd")["n"] == 40
    assert not (whole / "batches-0.jsonl").exists() or not (whole / "batches-0.jsonl").read_text()

    merge_outputs([tmp_path / "part-a", tmp_path / "part-b"], whole)  # again: replaced, not added
    assert len(list(whole.glob("batches-*.jsonl"))) in (2, 3)
    assert sum(len(path.read_text().splitlines()) for path in whole.glob("batches-part-*")) == \
        sum(len(path.read_text().splitlines())
            for part in ("part-a", "part-b") for path in (tmp_path / part).glob("batches-*"))


def test_folders_of_other_settings_or_the_same_defence_are_refused(tmp_path):
    evaluate_part({"first": Counting(1.0)}, tmp_path / "a")
    evaluate_part({"second": Counting(2.0)}, tmp_path / "b", batch_size=8)
    with pytest.raises(ValueError, match="differ in batch_size"):
        merge_outputs([tmp_path / "a", tmp_path / "b"], tmp_path / "whole")
    evaluate_part({"first": Counting(1.0)}, tmp_path / "c", n=30)
    with pytest.raises(ValueError, match="differ in .*n"):
        merge_outputs([tmp_path / "a", tmp_path / "c"], tmp_path / "whole")
    assert not (tmp_path / "whole" / "run.json").exists()  # refused before anything was copied

    evaluate_part({"first": Counting(1.5)}, tmp_path / "d")  # the same name, other weights
    with pytest.raises(ValueError, match="measured the EOT alignment|differ: two sources"):
        merge_outputs([tmp_path / "a", tmp_path / "d"], tmp_path / "whole")


def test_bad_arguments_are_refused_naming_them(tmp_path):
    evaluate_part({"first": Counting(1.0)}, tmp_path / "a")
    (tmp_path / "x").mkdir()
    evaluate_part({"second": Counting(2.0)}, tmp_path / "x" / "a")
    with pytest.raises(ValueError, match="sources must be a list"):
        merge_outputs([], tmp_path / "whole")
    with pytest.raises(ValueError, match="sources must be a list"):
        merge_outputs(str(tmp_path / "a"), tmp_path / "whole")
    with pytest.raises(ValueError, match="not an evaluation output folder"):
        merge_outputs([tmp_path / "a", tmp_path / "nothing"], tmp_path / "whole")
    with pytest.raises(ValueError, match="different folder names"):
        merge_outputs([tmp_path / "a", tmp_path / "x" / "a"], tmp_path / "whole")
    with pytest.raises(ValueError, match="must not be one of the sources"):
        merge_outputs([tmp_path / "a"], tmp_path / "a")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="into must be a folder"):
        merge_outputs([tmp_path / "a"], tmp_path / "file")


def test_a_part_still_running_is_refused(tmp_path):
    from purifyguard.evaluation import OutputFolderInUse

    evaluate_part({"first": Counting(1.0)}, tmp_path / "a")
    with _folder_lock(tmp_path / "a", True), pytest.raises(OutputFolderInUse):
        merge_outputs([tmp_path / "a"], tmp_path / "whole")


def test_the_command_line_merges_and_reports_problems_without_a_traceback(tmp_path, capsys):
    evaluate_part({"first": Counting(1.0)}, tmp_path / "a")
    evaluate_part({"second": Counting(2.0)}, tmp_path / "b")
    main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--into", str(tmp_path / "whole")])
    assert "merged 2 folders" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["merge", str(tmp_path / "nothing"), "--into", str(tmp_path / "whole")])
    assert "not an evaluation output folder" in capsys.readouterr().err
