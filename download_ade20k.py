"""Download ADE20K (the SceneParsing 150-class release) into DEST/ADEChallengeData2016.

    python download_ade20k.py [DEST=data]

Result: ADEChallengeData2016/{images,annotations}/{training,validation}
(20210 training and 2000 validation images), plus objectInfo150.txt with the class names.
"""
from __future__ import annotations

import argparse
import sys
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
EXPECTED = {"training": 20210, "validation": 2000}


def download(url: str, target: Path) -> None:
    if target.is_file() and zipfile.is_zipfile(target):
        print(f"have {target}")
        return
    partial = target.with_suffix(".part")
    with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
        total = int(response.headers.get("Content-Length", 0)) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    partial.replace(target)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", nargs="?", default="data")
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "ADEChallengeData2016.zip"
    download(URL, archive)
    base = dest / "ADEChallengeData2016"
    if not (base / "images" / "training").is_dir():
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    for split, expected in EXPECTED.items():
        found = len(list((base / "images" / split).glob("*.jpg")))
        print(f"{split}: {found} images (expected {expected})")
        if found != expected:
            print(f"error: {base / 'images' / split} holds {found} images, expected {expected}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
