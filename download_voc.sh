#!/usr/bin/env bash
# Download PASCAL VOC 2012 with the SBD-augmented labels (SegmentationClassAug) into
#   DEST/VOCdevkit/VOC2012/{JPEGImages,SegmentationClassAug,list/train_aug.txt,list/val.txt}
# (10582 train-aug images, 1449 val). Usage: bash download_voc.sh [DEST=data]
set -euo pipefail
dest=${1:-data}
mkdir -p "$dest"
cd "$dest"
fetch() {  # url file
  if [ -s "$2" ]; then echo "have $2"; else wget -c -O "$2.part" "$1" && mv "$2.part" "$2"; fi
}
fetch http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar VOCtrainval_11-May-2012.tar
[ -d VOCdevkit/VOC2012/JPEGImages ] || tar -xf VOCtrainval_11-May-2012.tar
# SegmentationClassAug: the SBD labels converted to VOC's PNG format (as distributed with DeepLab).
fetch "https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1" SegmentationClassAug.zip
if [ ! -d VOCdevkit/VOC2012/SegmentationClassAug ]; then
  unzip -q SegmentationClassAug.zip -d VOCdevkit/VOC2012/
  rm -rf VOCdevkit/VOC2012/__MACOSX
fi
# The split lists (lines: /JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png).
mkdir -p VOCdevkit/VOC2012/list
for split in train_aug val; do
  fetch "https://raw.githubusercontent.com/xmojiao/deeplab_v2/master/voc2012/list/${split}.txt" \
        "VOCdevkit/VOC2012/list/${split}.txt"
done
n_train=$(grep -c . VOCdevkit/VOC2012/list/train_aug.txt)
n_val=$(grep -c . VOCdevkit/VOC2012/list/val.txt)
echo "VOC ready in $(pwd)/VOCdevkit/VOC2012: $n_train train-aug, $n_val val images (expected 10582 and 1449)"
