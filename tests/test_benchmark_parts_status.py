"""scripts/benchmark_parts_status.py reads where the parts of a split benchmark stand from their
stored files alone."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from purifyguard.evaluation import evaluate_models, headline

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from benchmark_parts_status import main


class ReadsTheLabel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = x.mean(dim=(1, 2, 3)) * 10 - 0.5
        return -(level[:, None] - torch.arange(10.0)) ** 2


def test_the_status_counts_stored_batches_and_finished_headline_attacks(tmp_path, capsys):
    labels = torch.arange(40) % 10
    images = ((labels.float() + 0.5) / 10).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    part = tmp_path / "fashion-mnist-ours"
    evaluate_models({"reads": ReadsTheLabel()}, (images, labels), ["pgd:eps=0.07,steps=2,eot=1"],
                    n=40, batch_size=16, runs=2, output_dir=part, progress=False)
    headline(ReadsTheLabel(), (images, labels), ["pgd:eps=0.07,steps=2,eot=1,name=weak"], n=40,
             batch_size=16, runs=2, output_dir=part / "headline-reads", progress=False)
    (part / "batches-0.jsonl").open("a").write('{"key": "cut sh')  # an interrupted line

    main([str(tmp_path)])

    printed = capsys.readouterr().out
    assert "fashion-mnist-ours (not finished; 3 batches an attack)" in printed
    assert "reads | pgd: 3/3 batches" in printed and "reads | clean: 3/3 batches" in printed
    assert "headline-reads: 1 attacks done (weak)" in printed


def test_the_status_lists_the_clean_cost_part_per_model(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from unseen_classifiers import clean_pass

    labels = torch.arange(40) % 10
    images = ((labels.float() + 0.5) / 10).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    folder = tmp_path / "fashion-mnist-clean-cost" / "clean-cost"
    clean_pass({"standard-bare": ReadsTheLabel()}, images, labels, 0, 16, folder, "cpu")

    main([str(tmp_path)])

    printed = capsys.readouterr().out
    assert "fashion-mnist-clean-cost: clean cost on 40 images" in printed
    assert "  standard-bare: 3/3 batches" in printed
