"""The ignore label: the one label value no loss and no metric counts (datasets write it, losses skip it)."""

IGNORE_INDEX = 255
