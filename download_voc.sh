#!/usr/bin/env bash
# Download PASCAL VOC 2012 trainval and the SBD-augmented labels (SegmentationClassAug) into
#   DEST/VOCdevkit/VOC2012/{JPEGImages,SegmentationClassAug,list/train_aug.txt,list/val.txt}
# (10582 train-aug images, 1449 val; the lists are built from the archives themselves).
# Resumable, checksummed where a checksum is published, and atomic: rerun the same command after
# any interruption. URLs: MBS_VOC_TRAINVAL_URL, MBS_VOC_AUG_URL (or --trainval-url, --aug-url).
# Usage: bash download_voc.sh [DEST=data] [options; see --help]
# `sh download_voc.sh` runs dash on Debian/Ubuntu, which has neither pipefail nor arrays: run under bash instead.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python}" -m datasets.download voc "$@"
