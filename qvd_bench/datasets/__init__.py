"""Procedural datasets with known ground truth (``shapes``: captioned clips of moving shapes)."""
