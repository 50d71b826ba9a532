"""The top floor: reading finished runs (tables, CSV, published numbers, plots, qualitative figures)."""
