"""Checks behind `longcat-convert validate`; `longcat_convert.validate.validate_tree` runs them in order."""
