"""Download ADE20K (the SceneParsing 150-class release) into DEST/ADEChallengeData2016.

    python download_ade20k.py [DEST=data] [options; see --help]

Result: ADEChallengeData2016/{images,annotations}/{training,validation} (20210 training and
2000 validation images) and objectInfo150.txt with the class names. Resumable, SHA1-checked and
atomic: rerun the same command after any interruption. URL: MBS_ADE_URL (or --ade-url).
"""
import sys

from datasets.download import main

if __name__ == "__main__":
    sys.exit(main(["ade", *sys.argv[1:]]))
