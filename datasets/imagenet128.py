"""ImageNet at 128 x 128 (ILSVRC2012 train, Russakovsky et al. 2015): about 1.28M colour images,
1000 classes, centre-cropped as ADM does (guided-diffusion image_datasets.py center_crop_arr).

Read from a folder written once by `python run_bench.py prepare imagenet128 SRC` (bench/data/prepare.py):
--data-dir is that folder, else the default $DIFFBENCH_CACHE/prepared/imagenet128-128. The images
come back as a read-only memory map, so nothing is decoded or copied here. There is no test split:
evaluation compares against the train split (ref_split = "train").
"""

from pathlib import Path

NAME = "imagenet128"
CHANNELS = 3
RESOLUTION = 128
SOURCE = "ILSVRC2012 train (Russakovsky et al. 2015); python run_bench.py prepare imagenet128 SRC"


def load(split: str, data_dir: str | None, cache_dir: Path):
    from bench.data.prepared import load_prepared, verify_prepared
    from bench.data.sources import default_out

    if split == "test":
        raise FileNotFoundError("imagenet128 has no test split (prepare writes the ILSVRC train split only); "
                                'evaluate against the train split: ref_split = "train"')
    folder = Path(data_dir) if data_dir else default_out("imagenet128")
    if not (folder / "manifest.json").exists():
        raise FileNotFoundError(f"imagenet128 is not prepared at {folder}; run: python run_bench.py prepare "
                                f"imagenet128 /path/to/ILSVRC2012/train --out {folder} (or give the folder of "
                                "imagenet-1k parquet shards as SRC), then pass --data-dir if you chose another --out")
    manifest = verify_prepared(folder)
    if manifest["kind"] != "imagenet128" or manifest["resolution"] != RESOLUTION:
        raise FileNotFoundError(f"{folder} holds {manifest['kind']} at {manifest['resolution']} px, not imagenet128 "
                                f"at {RESOLUTION} px; use --dataset folder --data-dir {folder} for it")
    return load_prepared(folder, split)
