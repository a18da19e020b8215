"""Checkpoint conversion between Hugging Face folders and pipeline layer files (both ways,
streaming one pipe layer at a time). The command line is the top-level `convert_model.py`."""
