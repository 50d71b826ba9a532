"""Data: tasks and class orders, per-step image selection, datasets and transforms."""
