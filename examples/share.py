"""Share a purifier like any Hub model: save, push (a dry run here), load back by repo id.

    python examples/share.py                       # offline: dry-run push, a local Hub cache
    python examples/share.py --push user/my-purifier   # a real upload (needs `hf auth login`)

Offline, the example lays the saved folder out as huggingface_hub's cache does
(models--user--name/snapshots/<commit>/ and refs/main) and loads it by repo id with
HF_HUB_OFFLINE=1: exactly the path `from_pretrained("user/name")` takes after a download.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--push", metavar="REPO_ID", help="upload for real to this Hub repo")
parser.add_argument("--output-dir", default="purifyguard-share")
args = parser.parse_args()

repo_id = args.push or "user/fashion-mnist-agdm"
cache = Path(tempfile.mkdtemp(prefix="hub-cache-"))
if not args.push:
    # huggingface_hub reads these at import time: set them before importing purifyguard.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_CACHE"] = str(cache)

import purifyguard

# 1. Save: a folder with purifier_config.json, unet/, scheduler/, guidance/ (safetensors) and a
#    model card (README.md) that records the settings and any metrics given.
purifier = purifyguard.load_purifier("fashion-mnist-agdm").with_settings(n_steps=5)
folder = purifier.save_pretrained(
    Path(args.output_dir) / "purifier",
    card_data={"license": "mit", "datasets": ["fashion_mnist"]},
)
print("saved:", sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()))

# 2. Push: dry_run=True contacts nothing and lists what one commit would upload.
if args.push:
    print("pushed:", purifier.push_to_hub(repo_id))
else:
    for path, size in purifier.push_to_hub(repo_id, dry_run=True).items():
        print(f"would upload {path} ({size} bytes)")

    # What a download leaves in the Hub cache, built by hand.
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)

# 3. Load by repo id, as anyone would, and check it purifies exactly as the original.
loaded = purifyguard.Purifier.from_pretrained(repo_id)
images = purifyguard.bundled_test_images()[0][:4]
same = torch.equal(purifier.purify(images, seed=0), loaded.purify(images, seed=0))
print(f"loaded {repo_id}: {loaded.current_config().sampler}, t*={loaded.current_config().t_star},"
      f" purifies identically: {same}")
# A classifier takes it the same way: purifyguard.PurifiedModel(classifier, repo_id)
if not args.push:
    shutil.rmtree(cache)
