"""Frozen teacher wrappers (installed as ``xmodal.teachers``)."""
